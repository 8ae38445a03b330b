"""`sharded-mde bench quality` (methods x budgets x seeds, resumable) and `sharded-mde bench speed` on tiny planted data."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import yaml

from sharded_mde.bench.paired import paired_difference, t_cdf, t_quantile, verdict
from sharded_mde.bench.quality import paired_table, results_markdown, summarize
from sharded_mde.cli import main
from tiny_configs import write_run_config

METHODS, BUDGETS, SEEDS = ["ham", "uniform"], [0.35, 0.5], 2  # every field at dim 4 of 16 is 29% of the bytes


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bench")
    path = write_run_config(
        d, data={"format": "synth"},
        train={"batch_size": 256, "epochs": 1, "checkpoint_every": 0, "sharding": "table_wise", "progress": False},
        search={"epochs": 1}, export={"serve_batch_size": 256})
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
    assert all(r["feasible"] for r in doc["records"])
    # the JSON schema: per method x budget the paired difference vs uniform, from the records of the same seeds
    assert {(p["method"], p["budget"], p["reference"]) for p in doc["paired"]} == \
        {("ham", b, "uniform") for b in BUDGETS} | {(m, b, "full") for m in METHODS for b in BUDGETS}
    for p in doc["paired"]:
        auc = {(r["seed"], r["method"]): r["test_auc"] for r in doc["records"] if r["budget"] == p["budget"]}
        auc.update({(b["seed"], "full"): b["test_auc"] for b in doc["baselines"]})
        assert p["diffs"] == pytest.approx([auc[s, p["method"]] - auc[s, p["reference"]] for s in range(SEEDS)])
        assert p["n"] == SEEDS and p["lo"] <= p["mean"] <= p["hi"] and p["verdict"] in ("better", "tied", "worse")
    assert [b["seed"] for b in doc["baselines"]] == [0, 1]
    full = doc["baselines"][0]["bytes"]
    for r in doc["records"]:
        assert 0 < r["test_auc"] < 1 and r["test_logloss"] > 0
        assert r["kept_fraction"] == pytest.approx(r["kept_bytes"] / full) and r["kept_bytes"] < full
        assert r["within_budget"] == (r["kept_bytes"] <= r["budget_bytes"])
        assert r["search_seconds"] > 0 and r["retrain_seconds"] >= 0  # HAM's retrain reuses its check's training
        assert r["kept_bytes"] <= r["budget_bytes"]  # every method, uniform included, fits its budget
        if "planted_spearman" in r:  # planted data: the kept dims scored against the planted ranks
            assert -1 <= r["planted_spearman"] <= 1 and 0 <= r["rank0_max_dim"] <= 16
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
    assert "| method | 0.35 | 0.5 |" in table and "Paired difference of test AUC vs uniform" in table
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
    """power_law and uniform keep every table at >= 4 columns: at 5% of the bytes neither fits; the other cells still run."""
    run_dir = tmp_path / "infeasible"
    args = ["bench", "quality", str(config), "--methods", "power_law,uniform", "--budgets", "0.05,0.9", "--seeds", "1",
            "--set", f"run_dir={run_dir}"]
    assert main(args) == 0
    doc = json.loads((run_dir / "bench_quality" / "results.json").read_text())
    feasible = {(r["method"], r["budget"]) for r in doc["records"] if r["feasible"]}
    assert feasible == {("power_law", 0.9), ("uniform", 0.9)}
    bad = {(r["method"], r["budget"]): r for r in doc["records"] if not r["feasible"]}
    assert set(bad) == {("power_law", 0.05), ("uniform", 0.05)}  # one feasibility rule for both
    for r in bad.values():
        assert (r["test_auc"], r["kept_fraction"]) == (None, None) and "smallest feasible budget" in r["reason"]
    assert doc["infeasible"] == {f"{m} at 0.05": bad[m, 0.05]["reason"] for m in ("power_law", "uniform")}
    assert not (run_dir / "bench_quality" / "seed0" / "retrain_power_law_b0.05").exists()
    table = (run_dir / "bench_quality" / "results.md").read_text()
    assert "- Not feasible: power_law at 0.05" in table and "| power_law | infeasible |" in table
    # the reference is infeasible at 0.05: no paired difference there (one seed: none at 0.9 either)
    paired = {(p["method"], p["reference"], p["budget"]): p for p in doc["paired"]}
    assert paired["uniform", "power_law", 0.05]["note"] == "uniform infeasible"
    assert paired["power_law", "uniform", 0.05]["note"] == "power_law infeasible"
    assert all(p["verdict"] == "n/a" and p["lo"] is None for p in paired.values())
    assert paired["power_law", "uniform", 0.9]["n"] == 1 and "note" not in paired["power_law", "uniform", 0.9]
    assert paired["power_law", "full", 0.05]["note"] == "power_law infeasible" and paired["uniform", "full", 0.05]["note"] == "uniform infeasible"


def test_quality_seeds_in_parallel_processes_match_one_process(config: Path, tmp_path: Path) -> None:
    """--jobs 2 trains the two seeds at once, each in its own process: the same records as one process."""
    docs = []
    for jobs in (2, 1):
        run_dir = tmp_path / f"jobs{jobs}"
        assert main(["bench", "quality", str(config), "--methods", "uniform", "--budgets", "0.5", "--seeds", "2",
                     "--jobs", str(jobs), "--set", f"run_dir={run_dir}"]) == 0
        docs.append(json.loads((run_dir / "bench_quality" / "results.json").read_text()))
        assert [json.loads((run_dir / "bench_quality" / f"seed{s}" / "stages.json").read_text())["stages"].keys()
                for s in (0, 1)] == [{"baseline", "uniform_b0.5", "retrain_uniform_b0.5"}] * 2
    parallel, serial = docs
    assert [b["test_auc"] for b in parallel["baselines"]] == [b["test_auc"] for b in serial["baselines"]]
    assert [r["test_auc"] for r in parallel["records"]] == [r["test_auc"] for r in serial["records"]]
    assert parallel["paired"] == serial["paired"]


def test_t_quantile_matches_tables() -> None:
    # two-sided 95% critical values of Student's t (printed tables) and the normal limit
    for df, t in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)
    assert t_quantile(0.025, 4) == pytest.approx(-t_quantile(0.975, 4))
    assert t_cdf(t_quantile(0.9, 3), 3) == pytest.approx(0.9, abs=1e-9)


def test_paired_difference_by_hand() -> None:
    """Diffs 0.10, 0.11, 0.09 (seed 3 of b alone is ignored): mean 0.1, sd 0.01, half-width t(0.975, 2) 0.01 / sqrt 3."""
    a, b = {0: 0.80, 1: 0.81, 2: 0.79}, {0: 0.70, 1: 0.70, 2: 0.70, 3: 0.10}
    p = paired_difference(a, b)
    half = 4.302652729749752 * 0.01 / 3 ** 0.5
    assert p["n"] == 3 and p["seeds"] == [0, 1, 2]
    assert (p["mean"], p["std"]) == pytest.approx((0.1, 0.01))
    assert (p["lo"], p["hi"]) == pytest.approx((0.1 - half, 0.1 + half)) and p["verdict"] == "better"
    assert paired_difference(b, a)["verdict"] == "worse"
    tied = paired_difference({0: 0.5, 1: 0.6}, {0: 0.55, 1: 0.5})  # diffs -0.05, +0.1: the interval holds 0
    assert tied["lo"] < 0 < tied["hi"] and tied["verdict"] == "tied"
    one = paired_difference({0: 0.5}, {0: 0.4})
    assert one["mean"] == pytest.approx(0.1) and one["lo"] is None and one["verdict"] == "n/a"
    assert [verdict(0.001, 0.1), verdict(-0.1, -0.001), verdict(-0.1, 0.0), verdict(None, None)] == \
        ["better", "worse", "tied", "n/a"]


def _rec(seed: int, method: str, budget: float, auc: float | None) -> dict:
    if auc is None:
        return {"seed": seed, "method": method, "budget": budget, "feasible": False, "reason": "too small",
                "test_auc": None, "kept_fraction": None}
    return {"seed": seed, "method": method, "budget": budget, "feasible": True, "test_auc": auc, "test_logloss": 0.5,
            "kept_bytes": int(budget * 1000), "kept_fraction": budget, "budget_bytes": int(budget * 1000),
            "within_budget": True, "search_seconds": 1.0, "retrain_seconds": 1.0}


def test_paired_table_and_markdown_mark_better_tied_worse_and_infeasible() -> None:
    """uniform is infeasible at 0.03 (n/a there); at 0.1 ham beats it on every seed, pme loses, power_law ties."""
    recs = []
    for s in range(3):
        recs += [_rec(s, "uniform", 0.03, None), _rec(s, "uniform", 0.1, 0.70 + 0.01 * s),
                 _rec(s, "ham", 0.03, 0.69), _rec(s, "ham", 0.1, 0.72 + 0.01 * s + 0.001 * s),
                 _rec(s, "pme", 0.03, 0.68), _rec(s, "pme", 0.1, 0.60 + 0.01 * s),
                 _rec(s, "power_law", 0.03, None), _rec(s, "power_law", 0.1, 0.70 + 0.01 * s + (0.01, -0.01, 0.0)[s])]
    methods, budgets = ["ham", "uniform", "power_law", "pme"], [0.03, 0.1]
    baselines = [{"seed": s, "test_auc": 0.75, "test_logloss": 0.4, "bytes": 1000, "train_seconds": 1.0} for s in range(3)]
    paired = {(p["method"], p["reference"], p["budget"]): p for p in paired_table(recs, methods, budgets, baselines)}
    assert len(paired) == (2 * 3 + 4) * 2 and ("uniform", "uniform", 0.1) not in paired
    assert paired["ham", "full", 0.03]["diffs"] == pytest.approx([-0.06] * 3) and paired["ham", "full", 0.03]["verdict"] == "worse"
    assert paired["pme", "full", 0.1]["verdict"] == "worse" and paired["uniform", "full", 0.03]["note"] == "uniform infeasible"
    assert paired["ham", "uniform", 0.1]["verdict"] == "better" and paired["ham", "uniform", 0.1]["mean"] == pytest.approx(0.021)
    assert paired["pme", "uniform", 0.1]["verdict"] == "worse"
    assert paired["power_law", "uniform", 0.1]["verdict"] == "tied"
    assert paired["ham", "uniform", 0.03]["verdict"] == "n/a" and paired["ham", "uniform", 0.03]["note"] == "uniform infeasible"
    doc = {"methods": methods, "budgets": budgets, "seeds": 3, "records": recs, "paired": list(paired.values()),
           "infeasible": {"uniform at 0.03": "too small"},
           "summary": summarize(baselines, [r for r in recs if r["feasible"]])}
    md = results_markdown(doc)
    assert "| full | 0.7500 ± 0.0000 (1.000) | |" in md
    assert "| uniform | infeasible | 0.7100 ± 0.0100 (0.100) |" in md
    assert "| ham | n/a (uniform infeasible) | +0.0210 [" in md and "] **better** |" in md
    assert "] **worse** |" in md and "] tied |" in md
    assert "- Not feasible: uniform at 0.03: too small." in md


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
    assert main(["bench", "speed", str(config), "--repeats", "2", "--steps", "3", "--out", str(out), "--stock-dims", "4,8",
                 "--set", f"run_dir={tmp_path / 'speed_run'}", "--set", "search.budget=0.5"]) == 0
    doc = json.loads(out.read_text())
    r = doc["results"]
    assert doc["machine"]["cores"] and r["device"]
    assert r["search_overhead"]["ratio"] > 0 and r["search_overhead"]["steps"] == 6
    assert r["train_step"]["ratio"] > 0 and 0 < r["bytes_ratio"] < 1
    for part, name in (("search_overhead", "masked"), ("train_step", "compact")):  # ratio of the medians it reports
        t = r[part]
        assert t["ratio"] == pytest.approx(t[f"{name}_median_step_ms"] / t["plain_median_step_ms"], rel=1e-9)
    assert sorted(r["stock_dlrm"]) == ["4", "8"]
    for dim, t in r["stock_dlrm"].items():  # MixedDimDLRM / stock DLRM, every table and the dense arch's end at dim
        assert t["steps"] == 6 and t["dense_arch"][-1] == int(dim)
        assert t["ratio"] == pytest.approx(t["mixed_median_step_ms"] / t["stock_median_step_ms"], rel=1e-9)
        i = t["identity"]  # MixedDimDLRM(full_width=identity) / the same stock steps
        assert i["steps"] == 6 and i["stock_median_step_ms"] == t["stock_median_step_ms"]
        assert i["ratio"] == pytest.approx(i["identity_median_step_ms"] / i["stock_median_step_ms"], rel=1e-9)
    assert len(r["load_average"]["before"]) == 3
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
    assert "train step at dim 8: MixedDimDLRM/stock DLRM, full_width project" in printed and "identity" in printed
    if torch.cuda.is_available():
        assert r["tbe"]["status"] == "measured" and r["tbe"]["forward_ratio"] > 0
    else:
        assert r["tbe"]["status"] == "skipped" and "tbe: skipped" in printed
        assert "forward_ms" not in json.dumps(r["tbe"])


def test_speed_bad_stock_dims_is_one_line(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "speed", str(config), "--stock-dims", "16,x", "--set", f"run_dir={tmp_path / 'r'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--stock-dims '16,x'" in err
    assert not (tmp_path / "r").exists()


def test_lr_sweep_picks_the_best_validation_auc_and_resumes(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir, out = tmp_path / "lr", tmp_path / "docs" / "lr_sweep.md"
    args = ["bench", "lr", str(config), "--embedding-lr", "0.01,0.3", "--dense-lr", "0.001", "--seeds", "2",
            "--out", str(out), "--set", f"run_dir={run_dir}", "--set", "train.eval_batches=1"]
    assert main(args) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert {(r["embedding_lr"], r["seed"]) for r in doc["records"]} == {(0.01, 0), (0.01, 1), (0.3, 0), (0.3, 1)}
    for g in doc["grid"]:  # the grid's mean is over the seeds' whole-validation-split AUCs
        aucs = [r["valid_auc"] for r in doc["records"] if r["embedding_lr"] == g["embedding_lr"]]
        assert g["valid_auc"]["mean"] == pytest.approx(sum(aucs) / 2)
    valid_rows = json.loads((Path(yaml.safe_load(config.read_text())["data"]["dir"]) / "meta.json").read_text())["rows"]["valid"]
    for r in doc["records"]:  # eval_batches=1 is overridden: the whole validation split is scored
        m = json.loads((run_dir / "lr_sweep" / f"e{r['embedding_lr']:g}_d0.001_s{r['seed']}" / "baseline" / "metrics.json").read_text())
        assert m["valid"]["auc"] == r["valid_auc"] and m["valid"]["rows"] == valid_rows > 256
    best = max(doc["grid"], key=lambda g: g["valid_auc"]["mean"])
    assert (doc["best"]["embedding_lr"], doc["best"]["dense_lr"]) == (best["embedding_lr"], 0.001)
    assert f"`train.embedding_lr: {best['embedding_lr']:g}`" in out.read_text()
    assert out.read_text().count("**") == 2  # the chosen cell only
    assert doc["command"].startswith(f"sharded-mde bench lr {config} --embedding-lr 0.01,0.3 --dense-lr 0.001 --seeds 2")
    before = _finished_files(run_dir)
    capsys.readouterr()
    assert main(args) == 0  # every point finished: nothing trains again
    assert _finished_files(run_dir) == before and "skipped" in capsys.readouterr().out


def test_lr_sweep_bad_grid_is_one_line(config: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "lr", str(config), "--embedding-lr", "0.1,-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--embedding-lr" in err
