"""dims / precision / joint end to end on tiny synthetic data through `bench quality`: serving bytes within
the budget by the serving byte model, one shared signal for every budget, the compact model scored as served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sharded_mde.cli import main
from sharded_mde.config import load_config
from sharded_mde.dims import load_dims, serving_table_bytes
from tiny_configs import write_run_config

BUDGETS = [0.125, 0.04]  # every table at fp32 dim 4 is 25% of the fp32 serving bytes: dims alone needs drops below


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    d = tmp_path_factory.mktemp("precision")
    config = write_run_config(
        d, data={"format": "synth"},
        train={"batch_size": 256, "epochs": 1, "checkpoint_every": 0, "sharding": "table_wise", "progress": False},
        search={"epochs": 1, "allow_drop": True, "drop_tolerance": 0.01}, export={"row_alignment": 1})
    args = ["bench", "quality", str(config), "--methods", "dims,precision,joint", "--budgets",
            ",".join(map(str, BUDGETS)), "--seeds", "2", "--out", str(d / "docs" / "quality_precision.md")]
    assert main(args) == 0
    out = Path(yaml.safe_load(config.read_text())["run_dir"]) / "bench_quality"
    return config, out, json.loads((out / "results.json").read_text())


def test_serving_bytes_within_the_budget(bench: tuple) -> None:
    config, out, doc = bench
    cfg = load_config(config)
    assert doc["bytes_unit"] == "serving"
    full = doc["baselines"][0]["bytes"]
    for r in doc["records"]:
        if not r["feasible"]:
            assert r["method"] in ("dims", "precision") and "smallest feasible budget" in r["reason"]
            continue
        dims = load_dims(r["dims_file"])
        kept = sum(serving_table_bytes(t.num_embeddings, t.dim, t.dtype or "fp32", cfg.export.row_alignment)
                   for t in dims.tables)
        assert r["kept_bytes"] == kept == dims.extra["serving"]["kept_bytes"] <= r["budget_bytes"]
        assert r["budget_bytes"] == int(r["budget"] * full) and r["kept_fraction"] == pytest.approx(kept / full)
        assert all(t.dtype in ("fp32", "fp16", "int8", "int4") for t in dims.tables if t.dim)
        if r["method"] == "dims":
            assert {t.dtype for t in dims.tables if t.dim} == {"fp32"}
        if r["method"] == "precision":  # one uniform dim, one dtype
            assert len({t.dtype for t in dims.tables}) == 1 and len({t.dim for t in dims.tables}) == 1
            assert dims.check.winner == dims.tables[0].dtype
        if r["method"] == "joint":  # the check: joint's own allocation against dims alone's and precision alone's
            names = [c.name for c in dims.check.candidates]
            others = {m: any(o["feasible"] for o in doc["records"] if o["method"] == m and o["seed"] == r["seed"]
                             and o["budget"] == r["budget"]) for m in ("dims", "precision")}
            assert names[0] == "joint" and any(n.startswith("precision_") for n in names) == others["precision"]
            assert ("dims" in names) == others["dims"]
            won = dims.check.candidate(dims.check.winner)
            assert won.dims == {t.name: t.dim for t in dims.tables} and won.kept_bytes == kept
        summary = json.loads((Path(r["dims_file"]).parent.parent / f"retrain_{Path(r['dims_file']).parent.name}"
                              / "retrain.json").read_text())
        assert summary["reused_check_training"]  # every method's search trained what retrain returns
    assert any(r["feasible"] for r in doc["records"] if r["method"] == "joint" and r["budget"] == min(BUDGETS))


def test_one_signal_for_every_budget_and_scores_as_served(bench: tuple) -> None:
    _, out, doc = bench
    for seed in (0, 1):
        signals = {json.dumps(load_dims(r["dims_file"]).extra["signal_seconds"]) for r in doc["records"]
                   if r["seed"] == seed and r["feasible"] and r["method"] in ("dims", "joint")}
        assert len(signals) == 1  # every budget read the same signal: the supernet trained once per seed
        assert (out / f"seed{seed}" / "precision_signal" / "signal.json").is_file()
    served = 0
    for r in doc["records"]:
        if not r["feasible"]:
            continue
        dims = load_dims(r["dims_file"])
        stage = Path(r["dims_file"]).parent.name
        summary = json.loads((out / f"seed{r['seed']}" / f"retrain_{stage}" / "retrain.json").read_text())
        quantised = {t.name: t.dtype for t in dims.tables if t.dim and t.dtype != "fp32"}
        assert summary.get("served_dtypes", {}) == quantised
        assert r["test_auc"] == summary["test"]["auc"]
        if quantised:  # the reported AUC is the fake-quantised model's; the fp32 one is kept beside it
            assert summary["fp32"]["test"]["rows"] == summary["test"]["rows"]
            served += 1
    assert served  # below fp32 dim 4 everywhere, joint serves quantised tables


def test_joint_is_paired_with_dims_and_precision(bench: tuple) -> None:
    _, out, doc = bench
    refs = {(p["method"], p["reference"]) for p in doc["paired"]}
    assert {("joint", "dims"), ("joint", "precision"), ("joint", "full")} <= refs
    md = (out / "results.md").read_text()
    assert "Paired difference of test AUC vs dims" in md and "serving bytes" in md


def test_qat_ablation_retrains_with_quantised_tables(bench: tuple, tmp_path: Path) -> None:
    import subprocess
    import sys

    import torch

    from sharded_mde.export.quantize import fake_quantize_table
    from sharded_mde.search.retrain import read_supernet

    config, out, doc = bench
    md = tmp_path / "qat.md"
    subprocess.run([sys.executable, "tools/ablation_qat.py", str(config), "--fraction", "0.5", "--out", str(md)],
                   check=True, stdout=subprocess.DEVNULL)
    qat = json.loads(md.with_suffix(".json").read_text())
    assert [r["budget"] for r in qat["rows"]] == BUDGETS
    checked = 0
    for row in qat["rows"]:
        for seed in row["qat_auc"]:
            rec = next(r for r in doc["records"] if r["method"] == "joint" and r["budget"] == row["budget"]
                       and r["seed"] == int(seed))
            dims = load_dims(rec["dims_file"])
            stage = out / f"seed{seed}" / f"retrain_qat0.5_joint_b{row['budget']:g}"
            ints = {t.name: t.dtype for t in dims.tables if t.dim and t.dtype in ("int8", "int4")}
            weights, _ = read_supernet(stage / "checkpoints", {n: range(dims.table(n).dim) for n in ints})
            for name, q in ints.items():  # QAT ends with the tables at Q(W): quantising them again moves nothing
                w = weights[name]
                span = (w.max(1).values - w.min(1).values).clamp_min(1e-6)
                assert ((fake_quantize_table(w, q) - w).abs().max(1).values / span).max() < 2e-3
                checked += 1
    assert checked
