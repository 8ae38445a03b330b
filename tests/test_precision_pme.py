"""joint_pme end to end on tiny planted data (`sharded-mde run`, one process): each PME group table at its own (dim,
dtype) within the serving-byte budget to the byte, the dtypes in the dims file and the export, and the served
AUC of the export equal to retrain's final evaluation (as served) within 1e-4 (exactly where every group is fp32)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from sharded_mde.config import load_config
from sharded_mde.dims import InfeasibleBudget, load_dims, serving_bytes_of, serving_table_bytes
from sharded_mde.export import read_manifest
from sharded_mde.export.load import serving_bytes_by_table
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.precision_pme import select_groups
from test_pipeline import _config, _run

BUDGET = 0.2  # tiny tables: every quantised group table is padded to a 128-byte line
DTYPES = ["fp32", "fp16", "int8", "int4"]


def _joint_pme_config(tmp: Path, name: str, sharding: str = "table_wise") -> Path:
    path = _config(tmp, name)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].update(synth_rows=6000, synth_num_sparse=6, synth_tail_capacity=True)
    cfg["model"]["embedding_dim"] = 16
    cfg["train"]["sharding"] = sharding
    cfg["search"] = {"method": "joint_pme", "budget": BUDGET, "pme": {"score_fraction": 0.1},
                     "precision": {"dtypes": DTYPES, "pme_signal_scale": 4.0}}
    cfg["export"] = {"row_alignment": 1}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def joint_pme_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("joint_pme")
    path = _joint_pme_config(tmp, "run")
    return path, tmp / "run", _run([str(path)])


def _groups(dims) -> dict:
    return {f"{t.name}_s{g.size}": g for t in dims.tables for g in t.groups if g.size and g.rows}


def test_group_tables_fit_the_serving_budget_to_the_byte_with_their_dtypes(joint_pme_run: tuple) -> None:
    path, run_dir, _ = joint_pme_run
    cfg = load_config(path)
    tables = full_table_configs(cfg)
    dims = load_dims(run_dir / "joint_pme" / "dims.json", tables)
    serving = dims.extra["serving"]
    full = serving_bytes_of(tables, "fp32", 1)
    assert serving["full_bytes"] == full and serving["budget_bytes"] == math.floor(BUDGET * full)
    groups = _groups(dims)
    kept = sum(serving_table_bytes(g.rows, g.size, g.dtype, 1) for g in groups.values())
    assert kept == serving["kept_bytes"] <= serving["budget_bytes"]
    assert all(g.dtype in DTYPES for g in groups.values()) and serving["dtypes"] == {n: g.dtype for n, g in groups.items()}
    assert any(g.dtype != "fp32" for g in groups.values())  # below the fp32 groups at their smallest widths: quantised groups pay
    # each group stays within its signal group's range (next smaller size, size]: same groups, same order
    signal = load_dims(dims.extra["signal_pme_dims"], tables)
    for t, s in zip(dims.tables, signal.tables):
        assert [g.rows for g in t.groups] == [g.rows for g in s.groups]
        sizes = sorted(g.size for g in s.groups if g.size)
        for g, sg in zip(t.groups, s.groups):
            below = max([x for x in sizes if x < sg.size], default=0)
            assert (g.size == sg.size == 0) or below < g.size <= sg.size


def test_export_serves_each_group_at_its_dtype_and_scores_the_search_final_evaluation(joint_pme_run: tuple) -> None:
    path, run_dir, out = joint_pme_run
    dims = load_dims(run_dir / "joint_pme" / "dims.json")
    groups = _groups(dims)
    manifest = read_manifest(run_dir / "export")
    assert {t.name: t.dtype for t in manifest.tables} == {n: g.dtype for n, g in groups.items()}
    assert sum(serving_bytes_by_table(manifest, None, 1).values()) == dims.extra["serving"]["kept_bytes"]
    retrain = json.loads((run_dir / "retrain" / "retrain.json").read_text())
    served = json.loads((run_dir / "stages.json").read_text())["stages"]["serve_check"]["outputs"]
    assert retrain["served_dtypes"] == {n: g.dtype for n, g in groups.items() if g.dtype != "fp32"}
    tol = 0.0 if all(g.dtype == "fp32" for g in groups.values()) else 1e-4
    assert abs(served["auc"] - retrain["test"]["auc"]) <= tol
    # the run prints both AUCs and the bytes against the budget's arithmetic
    sv = json.loads((run_dir / "summary.json").read_text())["serving"]
    assert sv["export_table_bytes"] == sv["kept_bytes"] == dims.extra["serving"]["kept_bytes"]
    assert (sv["retrain_auc"], sv["served_auc"]) == (retrain["test"]["auc"], served["auc"])
    assert f"the search kept {sv['kept_bytes']:,} B; the export's tables hold {sv['kept_bytes']:,} B" in out


def test_a_budget_below_every_group_at_its_smallest_width_is_infeasible_naming_the_smallest() -> None:
    sig = {"groups": {"t_a_s8": {"rows": 100, "size": 8, "low": 8, "cap": 8,
                                 "loss": {q: {"0": 0.7, "8": 0.5} for q in DTYPES}}}}
    need = serving_table_bytes(100, 8, "int4", 1)
    assert select_groups(sig, DTYPES, need, 3584, 0.5, 1) == {"t_a_s8": (8, "int4")}
    with pytest.raises(InfeasibleBudget, match=r"joint_pme: every group table at its smallest width .* needs "
                                               rf"{need:,} B; the smallest feasible budget is 0\.2500"):
        select_groups(sig, DTYPES, need - 1, 3584, 0.01, 1)


def test_movielens_precision_config_is_movielens_with_the_serving_search() -> None:
    configs = Path(__file__).resolve().parents[1] / "configs"
    base, cfg = load_config(configs / "movielens_100k.yaml"), load_config(configs / "quality_precision_movielens.yaml")
    assert (cfg.data, cfg.model, cfg.train) == (base.data, base.model, base.train)
    assert (cfg.search.pme, cfg.search.retrain_embedding_lr) == (base.search.pme, base.search.retrain_embedding_lr)
    assert cfg.search.method == "joint" and cfg.search.precision.dtypes == DTYPES and cfg.export.row_alignment == 1


def test_run_of_the_field_wise_joint_prints_the_budget_bytes_and_equal_aucs(tmp_path: Path) -> None:
    path = _config(tmp_path, "run")
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["embedding_dim"] = 16
    cfg["search"] = {"method": "joint", "budget": 0.125, "epochs": 1, "allow_drop": True, "drop_tolerance": 0.01,
                     "precision": {"dtypes": DTYPES}}
    cfg["export"] = {"row_alignment": 1}
    path.write_text(yaml.safe_dump(cfg))
    out = _run([str(path)])
    sv = json.loads((tmp_path / "run" / "summary.json").read_text())["serving"]
    dims = load_dims(tmp_path / "run" / "joint" / "dims.json")
    kept = sum(serving_table_bytes(t.num_embeddings, t.dim, t.dtype, 1) for t in dims.tables if t.dim)
    assert sv["export_table_bytes"] == sv["kept_bytes"] == kept <= sv["budget_bytes"] == math.floor(0.125 * sv["full_bytes"])
    tol = 0.0 if all(t.dtype == "fp32" for t in dims.tables if t.dim) else 1e-4
    assert abs(sv["served_auc"] - sv["retrain_auc"]) <= tol
    assert f"budget {sv['budget_bytes']:,} B of {sv['full_bytes']:,} B" in out


def test_joint_pme_on_two_row_wise_ranks_fits_and_serves_its_final_evaluation(joint_pme_run: tuple) -> None:
    _, run1, _ = joint_pme_run
    path = _joint_pme_config(run1.parent, "run2", sharding="row_wise")
    _run([str(path)], nproc=2)
    run2 = run1.parent / "run2"
    dims = load_dims(run2 / "joint_pme" / "dims.json")
    groups = _groups(dims)
    sv = json.loads((run2 / "summary.json").read_text())["serving"]
    kept = sum(serving_table_bytes(g.rows, g.size, g.dtype, 1) for g in groups.values())
    assert sv["export_table_bytes"] == sv["kept_bytes"] == kept <= sv["budget_bytes"]
    # on both ranks' row pieces, a group at all its columns in fp32 scores what the trained model scores, and
    # a group with no column (every row zeroed) scores otherwise
    sig = json.loads(Path(dims.extra["signal"]).read_text())
    for e in sig["groups"].values():
        assert e["loss"]["fp32"][str(e["size"])] == pytest.approx(sig["valid"]["logloss"], abs=1e-6)
    assert any(e["loss"]["fp32"]["0"] != e["loss"]["fp32"][str(e["size"])] for e in sig["groups"].values())
    tol = 0.0 if all(g.dtype == "fp32" for g in groups.values()) else 1e-4
    assert abs(sv["served_auc"] - sv["retrain_auc"]) <= tol
