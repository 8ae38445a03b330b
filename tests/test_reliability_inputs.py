"""Property tests: damaged configs, dims files and plan files load or fail with one error naming the file and key."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, List

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharded_mde.config import ConfigError, RunConfig, load_config, to_dict
from sharded_mde.dims import load_dims
from sharded_mde.plan.sharding import load_plan, manual_plan, save_plan
from test_plan_dims import FULL, write_dims

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)


def _paths(obj: Any, prefix: tuple = ()) -> List[tuple]:
    """Every key path inside nested dicts/lists."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    for k, v in items:
        out.append(prefix + (k,))
        out.extend(_paths(v, prefix + (k,)))
    return out


@st.composite
def mutated(draw: st.DrawFn, base: Any) -> tuple:
    """`base` with one value replaced, one key deleted or one unknown key added; returns (data, path)."""
    data = copy.deepcopy(base)
    path = draw(st.sampled_from(_paths(data)))
    parent = data
    for k in path[:-1]:
        parent = parent[k]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace":
        parent[path[-1]] = draw(JSON)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent["zz_unknown"] = draw(JSON)
        path = path[:-1] + ("zz_unknown",)
    return data, path


def _dotted(path: tuple) -> str:
    return ".".join(str(k) for k in path)


# --------------------------------------------------------------------------- config

CONFIG = to_dict(RunConfig())


@FAST
@given(case=mutated(CONFIG))
def test_config_with_a_bad_value_names_the_file_and_key(tmp_path: Path, case: tuple) -> None:
    data, path = case
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    try:
        cfg = load_config(p)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(f"{p}: "), msg
        assert f"{path[0]}." in msg or (len(path) == 1 and path[0] in msg), (path, msg)
        return
    again = tmp_path / "again.yaml"  # it loaded: written back, it reads the same
    again.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(again) == cfg


@FAST
@given(raw=st.binary(max_size=200))
def test_config_of_random_bytes_is_one_error_naming_the_file(tmp_path: Path, raw: bytes) -> None:
    p = tmp_path / "c.yaml"
    p.write_bytes(raw)
    try:
        load_config(p)
    except ConfigError as e:
        assert str(e).startswith(str(p)), str(e)


def test_config_missing_file_and_empty_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope.yaml: cannot read config"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "e.yaml").write_text("")
    assert load_config(tmp_path / "e.yaml") == RunConfig()  # empty = all defaults, documented


# --------------------------------------------------------------------------- dims files

def _dims_base(tmp_path: Path) -> dict:
    return json.loads(write_dims(tmp_path / "base.json", FULL, {"t_a": 16, "t_b": 8, "t_c": 4}).read_text())


@FAST
@given(data=st.data())
def test_damaged_dims_file_names_the_file(tmp_path: Path, data: st.DataObject) -> None:
    damaged, path = data.draw(mutated(_dims_base(tmp_path)))
    p = tmp_path / "dims.json"
    p.write_text(json.dumps(damaged))
    try:
        dims = load_dims(p, FULL)
    except ValueError as e:
        msg = str(e)
        assert type(e) is ValueError and "\n" not in msg and msg.startswith(str(p)), msg
        if path[0] == "tables" and len(path) > 2 and isinstance(damaged["tables"][path[1]].get("name"), str):
            assert damaged["tables"][path[1]]["name"] in msg or "tables[" in msg or "table " in msg, msg
        return
    # it loaded: what it says agrees with the model's tables and its own byte totals
    assert {t.name for t in dims.tables} == {t.name for t in FULL}
    assert dims.kept_bytes == sum(t.bytes for t in dims.tables)


@FAST
@given(raw=st.binary(max_size=300))
def test_dims_file_of_random_bytes_names_the_file(tmp_path: Path, raw: bytes) -> None:
    p = tmp_path / "dims.json"
    p.write_bytes(raw)
    with pytest.raises(ValueError) as e:
        load_dims(p, FULL)
    assert str(e.value).startswith(str(p)), str(e.value)


@pytest.mark.parametrize("dim, message", [(6, "dim 6 is not legal"), (64, "dim 64 exceeds full_dim 32"),
                                          (-4, "dim -4 is not legal")])
def test_illegal_dims_name_the_table(tmp_path: Path, dim: int, message: str) -> None:
    base = _dims_base(tmp_path)
    base["tables"][1]["dim"] = dim
    p = tmp_path / "dims.json"
    p.write_text(json.dumps(base))
    with pytest.raises(ValueError, match=f"{p}: table t_b: {message}"):
        load_dims(p, FULL)


# --------------------------------------------------------------------------- plan files

def _plan_base(tmp_path: Path) -> dict:
    save_plan(tmp_path / "base_plan.json", manual_plan(FULL, "column_wise", 2))
    return json.loads((tmp_path / "base_plan.json").read_text())


@FAST
@given(data=st.data())
def test_damaged_plan_file_names_the_file(tmp_path: Path, data: st.DataObject) -> None:
    damaged, path = data.draw(mutated(_plan_base(tmp_path)))
    p = tmp_path / "plan.json"
    p.write_text(json.dumps(damaged))
    try:
        plan = load_plan(p, FULL, world_size=2)
    except ValueError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(str(p)), (_dotted(path), msg)
        return
    tables = {n for m in plan.plan.values() for n in m}
    assert tables == {t.name for t in FULL}


@FAST
@given(raw=st.binary(max_size=300))
def test_plan_file_of_random_bytes_names_the_file(tmp_path: Path, raw: bytes) -> None:
    p = tmp_path / "plan.json"
    p.write_bytes(raw)
    with pytest.raises(ValueError) as e:
        load_plan(p, FULL, world_size=2)
    assert str(e.value).startswith(str(p)), str(e.value)
