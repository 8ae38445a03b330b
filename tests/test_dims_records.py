"""The dims file's typed records: written as fields of their own, validated on load, and a version 1
file (records in `extra`) migrated into them; the search registry that config and retrain read."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torchrec import EmbeddingBagConfig

from sharded_mde.config import ConfigError, SearchConfig
from sharded_mde.dims import (FORMAT_VERSION, CandidateCheck, CandidateScore, DimsFile, PlantedAgreement, PmeRecord,
                              RuleRecord, load_dims, save_dims)
from sharded_mde.dims.methods import METHODS, SEARCH_METHODS
from sharded_mde.search.budget import make_dims_file
from sharded_mde.search.registry import compact_builder, search_function
from test_reliability_inputs import FAST, mutated

TABLES = [EmbeddingBagConfig(name="t_A", num_embeddings=50, embedding_dim=8, feature_names=["A"]),
          EmbeddingBagConfig(name="t_B", num_embeddings=20, embedding_dim=8, feature_names=["B"])]


def _dims() -> DimsFile:
    check = CandidateCheck([CandidateScore("ham", {"t_A": 4, "t_B": 4}, 1200, 0.71, 0.52),
                            CandidateScore("uniform", {"t_A": 4, "t_B": 4}, 1200, 0.71, 0.52, same_as="ham")],
                           winner="ham", margin_vs_ham=0.0, rule="best validation AUC",
                           winner_checkpoints="/run/ham/check_ham/checkpoints", winner_trained_as={"train": {"epochs": 1}})
    return make_dims_file("ham", TABLES, {"t_A": [0, 2, 3, 5], "t_B": [1, 2, 3, 4]}, 0.6,
                          extra={"mask_values": {"t_A": [0.1] * 8}}, supernet_checkpoints="/run/ham/checkpoints",
                          trace_file="trace.json", check=check, rule=RuleRecord("a rule", 0.3, 2.5),
                          planted=PlantedAgreement(float("nan"), 2, {"A": 4}, True, {"A": [4, 0], "B": [4, 1]}))


def test_records_are_fields_of_their_own_and_round_trip(tmp_path: Path) -> None:
    dims = _dims()
    save_dims(tmp_path / "dims.json", dims)
    raw = json.loads((tmp_path / "dims.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION == 2
    assert raw["supernet_checkpoints"] == "/run/ham/checkpoints" and raw["check"]["winner"] == "ham"
    assert raw["extra"] == {"mask_values": {"t_A": [0.1] * 8}} and "data_dir" not in raw and "pme" not in raw
    back = load_dims(tmp_path / "dims.json", TABLES)
    assert back.check == dims.check and back.rule == dims.rule and back.extra == dims.extra
    assert back.check.candidate("uniform").same_as == "ham" and math.isnan(back.planted.spearman)
    assert back.data_dir is None and back.pme is None


def test_version_1_extra_records_migrate(tmp_path: Path) -> None:
    """A version 1 file kept its records in `extra`; they load into the typed fields, the rest stays."""
    save_dims(tmp_path / "new.json", _dims())
    raw = json.loads((tmp_path / "new.json").read_text())
    old = {k: v for k, v in raw.items() if k not in ("supernet_checkpoints", "trace_file", "check", "rule", "planted")}
    old["format_version"] = 1
    old["extra"] = {**raw["extra"], "supernet_checkpoints": raw["supernet_checkpoints"], "trace_file": "trace.json",
                    "check": raw["check"], "planted": raw["planted"], "rule": "a rule", "alpha": 0.3, "scale": 2.5,
                    "data_dir": "/run/pme/data", "search": {"budget": 0.6, "combine": "pad"},
                    "pme": {"reserved_sizes": {"t_A": [0, 8]}, "price": 0.5, "floor_size": 4}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    back = load_dims(tmp_path / "old.json", TABLES)
    new = load_dims(tmp_path / "new.json", TABLES)
    assert (back.check, back.rule, back.supernet_checkpoints, back.trace_file) == (new.check, new.rule,
                                                                                    new.supernet_checkpoints, "trace.json")
    assert back.planted.dims_vs_ranks == new.planted.dims_vs_ranks and back.data_dir == "/run/pme/data"
    assert back.pme == PmeRecord(reserved_sizes={"t_A": [0, 8]}, combine="pad", price=0.5)
    # what no record holds stays a note: the settings, and an older writer's PME key
    assert back.extra == {**new.extra, "search": {"budget": 0.6, "combine": "pad"}, "pme": {"floor_size": 4}}
    save_dims(tmp_path / "again.json", back)  # written in the current version, and it reads back the same
    assert json.loads((tmp_path / "again.json").read_text())["format_version"] == FORMAT_VERSION
    assert load_dims(tmp_path / "again.json", TABLES) == back


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(data_dir=3), "data_dir must be str, got int 3"),
    (lambda d: d["check"].pop("winner"), "check is missing key 'winner'"),
    (lambda d: d["check"]["candidates"][0].update(valid_auc="high"), r"check.candidates\[0\].valid_auc must be float"),
    (lambda d: d["check"].update(winner="nobody"), "check.winner 'nobody' is not one of check.candidates"),
    (lambda d: d["rule"].update(shape=1), "rule has an unknown key 'shape'"),
    (lambda d: d.update(pme={"reserved_sizes": {"t_A": ["x"]}}), r"pme.reserved_sizes.t_A\[0\] must be int"),
    (lambda d: d.update(pme={"reserved_sizes": {"t_Z": [4]}}), "pme.reserved_sizes names table t_Z"),
    (lambda d: d.update(planted=[1]), "planted must be an object, got list"),
])
def test_bad_record_names_file_and_key(tmp_path: Path, edit, message: str) -> None:
    save_dims(tmp_path / "dims.json", _dims())
    raw = json.loads((tmp_path / "dims.json").read_text())
    edit(raw)
    (tmp_path / "dims.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message) as e:
        load_dims(tmp_path / "dims.json", TABLES)
    assert str(tmp_path / "dims.json") in str(e.value) and "\n" not in str(e.value)


def test_one_registry_of_search_methods() -> None:
    assert SEARCH_METHODS == ("ham", "uniform", "power_law", "magnitude", "saliency", "pme", "dims", "precision", "joint",
                              "joint_pme")
    for name in SEARCH_METHODS:  # every search resolves, and config accepts exactly these
        assert callable(search_function(name)) and callable(compact_builder(name))
        SearchConfig(method=name).validate()
    assert compact_builder("planted_oracle") is compact_builder("ham") and "planted_oracle" in METHODS
    with pytest.raises(ConfigError, match="method: one of ham, uniform"):
        SearchConfig(method="planted_oracle").validate()  # a dims method only, no search
    with pytest.raises(ValueError, match="search method 'bogus' is not available"):
        search_function("bogus")
    with pytest.raises(ValueError, match="x.json: no retrain builder for method 'bogus'"):
        compact_builder("bogus", "x.json")


@FAST
@given(data=st.data())
def test_damaged_records_load_or_name_the_file(tmp_path: Path, data: st.DataObject) -> None:
    """A record with one value replaced, deleted or added loads as its type or fails with one line naming the file."""
    save_dims(tmp_path / "base.json", dataclasses.replace(_dims(), pme=PmeRecord({"t_A": [0, 4]}, "pad", {"A": {"n": 1}})))
    base = json.loads((tmp_path / "base.json").read_text())
    records = {k: base[k] for k in ("supernet_checkpoints", "trace_file", "rule", "planted", "check", "pme")}
    damaged, _ = data.draw(mutated(records))
    p = tmp_path / "dims.json"
    p.write_text(json.dumps({**base, **damaged}))
    try:
        dims = load_dims(p, TABLES)
    except ValueError as e:
        assert type(e) is ValueError and "\n" not in str(e) and str(e).startswith(str(p)), str(e)
        return
    for name, tp in (("rule", RuleRecord), ("planted", PlantedAgreement), ("check", CandidateCheck), ("pme", PmeRecord)):
        assert getattr(dims, name) is None or isinstance(getattr(dims, name), tp)
    assert dims.supernet_checkpoints is None or isinstance(dims.supernet_checkpoints, str)


def test_per_table_serving_dtype_round_trips_and_is_checked(tmp_path: Path) -> None:
    dims = _dims()
    save_dims(tmp_path / "plain.json", dims)
    assert "dtype" not in json.loads((tmp_path / "plain.json").read_text())["tables"][0]  # none chosen: key left out
    dims.tables[0].dtype = "int4"
    save_dims(tmp_path / "dims.json", dims)
    back = load_dims(tmp_path / "dims.json", TABLES)
    assert [t.dtype for t in back.tables] == ["int4", ""]
    dims.tables[1].dtype = "int3"
    with pytest.raises(ValueError, match="table t_B: dtype 'int3' is not one of"):
        save_dims(tmp_path / "bad.json", dims)
    dims.tables[1].dtype = "int4"
    dims.tables[1].dim, dims.tables[1].kept_columns = 4, [1, 2, 3, 4]
    save_dims(tmp_path / "ok.json", dims)  # int4 rows of 4 columns are whole 2-byte units
