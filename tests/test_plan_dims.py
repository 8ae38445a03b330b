"""Legal dims, the byte model, the dims file (hand-written, validated), table configs and dims rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

import pytest
from torchrec import EmbeddingBagConfig

from sharded_mde.config import ConfigError, RunConfig
from sharded_mde.dims import column_cost, legal_dim, load_dims, round_to_legal, save_dims, table_bytes
from sharded_mde.plan.rules import rule_dims
from sharded_mde.plan.tables import full_table_configs, load_table_preset, plan_tables

REPO = Path(__file__).resolve().parents[1]


def tables(spec: Dict[str, int], dim: int = 32) -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t_{f}", num_embeddings=r, embedding_dim=dim, feature_names=[f]) for f, r in spec.items()]


def write_dims(path: Path, full: List[EmbeddingBagConfig], dims: Dict[str, int], groups=None) -> Path:
    """A hand-written dims file (plain JSON, not save_dims): `dims` per table, optional PME groups [(size, rows)]."""
    groups = groups or {}
    entries = []
    for t in full:
        d = dims[t.name]
        g = [{"size": s, "rows": r, "bytes": table_bytes(r, s).total} for s, r in groups.get(t.name, [])]
        entries.append({"name": t.name, "features": list(t.feature_names), "num_embeddings": t.num_embeddings,
                        "full_dim": t.embedding_dim, "dim": d, "kept_columns": [] if g else list(range(t.embedding_dim - d, t.embedding_dim)),
                        "bytes": sum(x["bytes"] for x in g) if g else table_bytes(t.num_embeddings, d).total,
                        **({"groups": g} if g else {})})
    full_bytes = sum(table_bytes(t.num_embeddings, t.embedding_dim).total for t in full)
    kept = sum(e["bytes"] for e in entries)
    path.write_text(json.dumps({"format_version": 1, "method": "ham", "budget_fraction": 0.5, "budget_bytes": full_bytes // 2,
                                "full_bytes": full_bytes, "kept_bytes": kept, "weight_dtype": "fp32",
                                "optimizer": "rowwise_adagrad", "tables": entries, "extra": {"trace": "none"}}))
    return path


FULL = tables({"a": 1000, "b": 500, "c": 20})


def test_legal_dims_and_rounding():
    assert [legal_dim(d) for d in (4, 8, 128, 0, 6, -4, 2)] == [True, True, True, False, False, False, False]
    assert legal_dim(16, multiple=8) and not legal_dim(12, multiple=8)
    assert [round_to_legal(x) for x in (0, -1, 0.2, 4, 5, 8.1)] == [0, 0, 4, 4, 8, 12]
    assert [round_to_legal(x, mode="down") for x in (3, 7, 9)] == [4, 4, 8]
    assert round_to_legal(10, mode="nearest") == 12 and round_to_legal(9.9, mode="nearest") == 8
    assert round_to_legal(100, max_dim=64) == 64 and round_to_legal(100, max_dim=30) == 28
    with pytest.raises(ValueError, match="mode"):
        round_to_legal(5, mode="sideways")


def test_byte_model():
    assert table_bytes(1000, 16) == (64_000, 4_000)  # rowwise adagrad: 4 B per row
    assert table_bytes(1000, 16, "fp16", "adagrad") == (32_000, 64_000)
    assert table_bytes(1000, 16, optimizer="adam").optimizer == 128_000
    assert table_bytes(1000, 16, optimizer="sgd").total == 64_000
    assert table_bytes(1000, 0) == (0, 0)
    assert column_cost(1000) == 4000 and column_cost(1000, optimizer="adam") == 12_000
    with pytest.raises(ValueError, match="optimizer"):
        table_bytes(1, 4, optimizer="lamb")


def test_dims_file_round_trip(tmp_path):
    path = write_dims(tmp_path / "d.json", FULL, {"t_a": 8, "t_b": 0, "t_c": 32})
    dims = load_dims(path, FULL)
    assert [t.dim for t in dims.tables] == [8, 0, 32] and dims.extra == {"trace": "none"}
    save_dims(tmp_path / "again.json", dims)
    assert load_dims(tmp_path / "again.json", FULL) == dims
    compact = plan_tables(dims, FULL)
    assert [(t.name, t.embedding_dim, t.num_embeddings) for t in compact] == [("t_a", 8, 1000), ("t_c", 32, 20)]


def test_pme_groups_become_tables(tmp_path):
    path = write_dims(tmp_path / "d.json", FULL, {"t_a": 16, "t_b": 8, "t_c": 32},
                      groups={"t_a": [(16, 100), (4, 850), (0, 50)], "t_b": [(8, 500)]})
    compact = plan_tables(load_dims(path, FULL), FULL)
    assert [(t.name, t.feature_names, t.num_embeddings, t.embedding_dim) for t in compact] == [
        ("t_a_s16", ["a_s16"], 100, 16), ("t_a_s4", ["a_s4"], 850, 4), ("t_b_s8", ["b_s8"], 500, 8), ("t_c", ["c"], 20, 32)]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["tables"][0].update(name="t_zz"), "table t_zz is not a table of the model"),
    (lambda d: d["tables"][1].update(dim=6, kept_columns=list(range(6))), "table t_b: dim 6 is not legal"),
    (lambda d: d["tables"][1].update(dim=40, kept_columns=list(range(40))), "table t_b: dim 40 exceeds full_dim 32"),
    (lambda d: d["tables"][0].update(kept_columns=[0, 1]), "table t_a: kept_columns has 2 entries but dim is 8"),
    (lambda d: d["tables"][0].update(kept_columns=[7, 6, 5, 4, 3, 2, 1, 0]), "table t_a: kept_columns must be strictly increasing"),
    (lambda d: d["tables"][0].update(bytes=1), "table t_a: bytes 1 do not match the byte model"),
    (lambda d: d["tables"].pop(2), "table t_c of the model is missing"),
    (lambda d: d["tables"][2].update(num_embeddings=21), "table t_c is 21 x 32"),
    (lambda d: d["tables"][0].update(dim="8"), "table t_a: dim has the wrong type"),
    (lambda d: d.update(kept_bytes=5), "kept_bytes 5 !="),
    (lambda d: d.update(format_version=3), "format_version 3 is not supported"),
    (lambda d: d["tables"][0].update(groups=[{"size": 8, "rows": 10, "bytes": table_bytes(10, 8).total}]),
     "table t_a: token groups hold 10 rows, the table has 1000"),
])
def test_bad_dims_file_names_file_and_table(tmp_path, edit, message):
    path = write_dims(tmp_path / "d.json", FULL, {"t_a": 8, "t_b": 4, "t_c": 32})
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as e:
        load_dims(path, FULL)
    assert str(path) in str(e.value)


def test_corrupt_dims_file_names_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('{"format_version": 1,\n "method": }')
    with pytest.raises(ValueError, match=r"d.json line 2: dims file is not valid JSON"):
        load_dims(path)


def test_full_tables_from_data_meta(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"sparse_features": ["C1", "C2"], "num_embeddings": {"C1": 50, "C2": 7}}))
    cfg = RunConfig()
    cfg.data.dir, cfg.model.embedding_dim, cfg.model.table_dims = str(tmp_path), 16, {"t_C2": 8}
    got = full_table_configs(cfg)
    assert [(t.name, t.feature_names, t.num_embeddings, t.embedding_dim) for t in got] == [("t_C1", ["C1"], 50, 16), ("t_C2", ["C2"], 7, 8)]
    cfg.model.table_dims = {"C9": 8}
    with pytest.raises(ConfigError, match="model.table_dims.C9"):
        full_table_configs(cfg)
    cfg.data.dir = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="meta.json: data meta"):
        full_table_configs(cfg)


def test_criteo_terabyte_preset():
    got = load_table_preset(str(REPO / "configs/tables/criteo_terabyte.yaml"))
    assert len(got) == 26 and {t.embedding_dim for t in got} == {128}
    assert [t.num_embeddings for t in got][:3] == [39884406, 39043, 17289] and got[19].num_embeddings == 39979771
    assert sum(t.num_embeddings for t in got) == 187_767_399


def test_bad_table_preset(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("embedding_dim: 128\ntables:\n  - {feature: C1, num_embeddings: 10}\n  - {feature: C2, num_embeddings: 10, dim: 6}\n")
    with pytest.raises(ConfigError, match=r"t.yaml: tables\[1\].dim: a multiple of 4"):
        load_table_preset(str(p))


def test_power_law_rule_meets_budget(tmp_path):
    full = load_table_preset(str(REPO / "configs/tables/criteo_terabyte.yaml"))
    dims = rule_dims(full, "power_law", 0.25)
    assert dims.kept_bytes <= dims.budget_bytes == int(0.25 * dims.full_bytes)
    assert dims.kept_bytes > 0.24 * dims.full_bytes  # the largest scale that fits, not a loose one
    by_rows = sorted(dims.tables, key=lambda t: t.num_embeddings)
    assert all(a.dim >= b.dim for a, b in zip(by_rows, by_rows[1:]))  # bigger vocabularies get fewer columns
    assert all(legal_dim(t.dim) for t in dims.tables)
    save_dims(tmp_path / "d.json", dims)
    assert load_dims(tmp_path / "d.json", full).method == "power_law"
    uniform = rule_dims(full, "uniform", 0.25)
    assert len({t.dim for t in uniform.tables}) == 1
    with pytest.raises(ValueError, match="below every table at dim 4"):
        rule_dims(full, "power_law", 0.01)
