"""`sharded-mde bench quality` (methods x budgets x seeds, resumable) and `sharded-mde bench speed` on tiny planted data."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml

from sharded_mde.cli import main

METHODS, BUDGETS, SEEDS = ["ham", "uniform"], [0.25, 0.5], 2


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bench")
    path = d / "run.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(d / "run"),
        "data": {"format": "synth", "dir": str(d / "data"), "synth_rows": 3000, "synth_num_sparse": 4,
                 "synth_num_dense": 3, "synth_vocab_min": 20, "synth_vocab_max": 300},
        "model": {"embedding_dim": 8, "dense_arch": [8, 8], "over_arch": [8, 1]},
        "train": {"batch_size": 256, "epochs": 1, "checkpoint_every": 0, "sharding": "table_wise", "progress": False},
        "search": {"epochs": 1},
        "export": {"serve_batch_size": 256},
    }))
    return path


def _finished_files(root: Path) -> dict:
    return {p: p.stat().st_mtime_ns for name in ("dims.json", "retrain.json", "metrics.json") for p in root.rglob(name)}


def test_quality_every_cell_then_a_rerun_skips_them(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["bench", "quality", str(config), "--methods", ",".join(METHODS), "--budgets", ",".join(map(str, BUDGETS)),
            "--seeds", str(SEEDS), "--out", str(tmp_path / "docs" / "quality.md")]
    assert main(args) == 0
    out = Path(yaml.safe_load(config.read_text())["run_dir"]) / "bench_quality"
    doc = json.loads((out / "results.json").read_text())
    cells = {(r["seed"], r["method"], r["budget"]) for r in doc["records"]}
    assert len(doc["records"]) == 8 and cells == set(itertools.product(range(SEEDS), METHODS, BUDGETS))
    assert [b["seed"] for b in doc["baselines"]] == [0, 1]
    full = doc["baselines"][0]["bytes"]
    for r in doc["records"]:
        assert 0 < r["test_auc"] < 1 and r["test_logloss"] > 0
        assert r["kept_fraction"] == pytest.approx(r["kept_bytes"] / full) and r["kept_bytes"] < full
        assert r["search_seconds"] > 0 and r["retrain_seconds"] > 0
        if r["method"] == "ham":  # HAM meets its budget exactly (uniform rounds its one dim up)
            assert r["kept_bytes"] <= r["budget_bytes"]
        if "planted_spearman" in r:  # planted data: the kept dims scored against the planted ranks
            assert -1 <= r["planted_spearman"] <= 1 and 0 <= r["rank0_max_dim"] <= 8
        if r["method"] == "uniform":  # one dim everywhere: no rank correlation is defined
            assert "planted_spearman" not in r
    scored = any("planted_spearman" in r for r in doc["records"])
    assert ("Spearman dims vs planted ranks" in (out / "results.md").read_text()) == scored
    # the seeds differ (train.seed reaches the baseline), the data and splits do not
    assert doc["baselines"][0]["test_auc"] != doc["baselines"][1]["test_auc"]
    table = (out / "results.md").read_text()
    for m, b in itertools.product(METHODS, BUDGETS):
        assert sum(line.startswith(f"| {m} | {b:g} |") for line in table.splitlines()) == 1
    assert sum(line.startswith("| full | 1 |") for line in table.splitlines()) == 1
    assert (out / "auc_vs_bytes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "docs" / "quality.md").read_text() == table
    assert (tmp_path / "docs" / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "docs" / "quality.json").read_text())["records"] == doc["records"]

    before = _finished_files(out)
    assert len([p for p in before if p.name == "retrain.json"]) == 8
    capsys.readouterr()
    assert main(args) == 0  # every cell finished: nothing trains again
    assert _finished_files(out) == before
    assert "skipped" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["records"] == doc["records"]


def test_quality_records_an_infeasible_budget_and_goes_on(config: Path, tmp_path: Path) -> None:
    """power_law keeps every table at >= 4 columns: at 5% of the bytes it cannot fit; the other cells still run."""
    run_dir = tmp_path / "infeasible"
    args = ["bench", "quality", str(config), "--methods", "power_law,uniform", "--budgets", "0.05,0.9", "--seeds", "1",
            "--set", f"run_dir={run_dir}"]
    assert main(args) == 0
    doc = json.loads((run_dir / "bench_quality" / "results.json").read_text())
    assert {(r["method"], r["budget"]) for r in doc["records"]} == {("power_law", 0.9), ("uniform", 0.05), ("uniform", 0.9)}
    assert list(doc["infeasible"]) == ["power_law at 0.05"] and "below every table at dim 4" in doc["infeasible"]["power_law at 0.05"]
    assert not (run_dir / "bench_quality" / "seed0" / "retrain_power_law_b0.05").exists()
    assert "- Not feasible: power_law at 0.05" in (run_dir / "bench_quality" / "results.md").read_text()


def test_quality_unknown_method_fails_before_any_work(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "never"
    assert main(["bench", "quality", str(config), "--methods", "ham,no_such_method", "--seeds", "1",
                 "--set", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'no_such_method'" in err
    assert not run_dir.exists()


def _independent_serving(exports: dict, dtype: str, config: Path, run_dir: Path, repeats: int = 15) -> dict:
    """Compact/full examples/s of the bench's exports timed here, with perf_counter around each pass, and their AUCs."""
    import statistics
    import time

    from sharded_mde.config import load_config
    from sharded_mde.export import load_export, script
    from sharded_mde.export.stage import load_requests
    from sharded_mde.train.metrics import classification_metrics

    cfg = load_config(config, {"run_dir": str(run_dir)})
    cpu = torch.device("cpu")
    requests = load_requests(cfg.data.dir, "test", cfg.export.serve_batch_size, cpu)
    models = {n: script(load_export(exports[n], dtype, cfg.export.row_alignment, cpu)) for n in ("compact", "full")}
    out: dict = {}
    seconds: dict = {n: [] for n in models}
    with torch.no_grad():
        for n, m in models.items():
            logits = torch.cat([m(d, sp)[:k] for d, sp, _, k in requests])
            labels = torch.cat([lab[:k] for _, _, lab, k in requests])
            out[n] = classification_metrics(logits, labels)
        for _ in range(repeats):
            for n, m in models.items():
                t0 = time.perf_counter()
                for d, sp, _, _ in requests:
                    m(d, sp)
                seconds[n].append(time.perf_counter() - t0)
    out["ratio"] = statistics.median(seconds["full"]) / statistics.median(seconds["compact"])  # examples/s ratio
    return out


def test_speed_reports_ratios_and_skips_tbe_without_cuda(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", str(config), "--repeats", "2", "--steps", "3", "--out", str(out),
                 "--set", f"run_dir={tmp_path / 'speed_run'}", "--set", "search.budget=0.5"]) == 0
    doc = json.loads(out.read_text())
    r = doc["results"]
    assert doc["machine"]["cores"] and r["device"]
    assert r["search_overhead"]["ratio"] > 0 and r["search_overhead"]["steps"] == 6
    assert r["train_step"]["ratio"] > 0 and 0 < r["bytes_ratio"] < 1
    for part, name in (("search_overhead", "masked"), ("train_step", "compact")):  # ratio of the medians it reports
        t = r[part]
        assert t["ratio"] == pytest.approx(t[f"{name}_median_step_ms"] / t["plain_median_step_ms"], rel=1e-9)
    for dtype in ("fp32", "int8"):
        s = r["serving"]["dtypes"][dtype]
        assert s["ratio_median"] > 0 and 0 < s["bytes_ratio"] < 1
        assert s["compact"]["rows"] == s["full"]["rows"] > 0
        independent = _independent_serving(r["serving"]["exports"], dtype, config, tmp_path / "speed_run")
        for name in ("compact", "full"):  # the same exports on the same rows score the same
            assert s[name]["auc"] == pytest.approx(independent[name]["auc"], abs=1e-6)
        # Timed by this test's own loop: the ratio agrees within 3x (a loaded 2-core machine is noisy).
        assert 1 / 3 < s["ratio_median"] / independent["ratio"] < 3, (dtype, s["ratio_median"], independent["ratio"])
    printed = capsys.readouterr().out
    if torch.cuda.is_available():
        assert r["tbe"]["status"] == "measured" and r["tbe"]["forward_ratio"] > 0
    else:
        assert r["tbe"]["status"] == "skipped" and "tbe: skipped" in printed
        assert "forward_ms" not in json.dumps(r["tbe"])
