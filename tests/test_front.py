"""HAM's front from one run: the walking target, the config, the search end to end, and bench's front records."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sharded_mde.bench.quality import FRONT, collect_results, results_markdown
from sharded_mde.config import load_config
from sharded_mde.dims import InfeasibleBudget, budget_bytes, dim_cap, load_dims, smallest_feasible_fraction
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.budget import select_dims, target_bytes, walk_steps, walk_target
from sharded_mde.search.ham_check import interpolate
from sharded_mde.search.ham_front import FRONT_FILE, point_dir
from sharded_mde.train.distributed import init_distributed, shutdown_distributed
from tiny_configs import tiny_planted_config, write_run_config


def test_walk_target_holds_each_budget_at_its_point_and_one_budget_is_the_single_schedule() -> None:
    full, walk, warmup, prune, total = 1000, [600, 300, 100], 0.2, 0.5, 300
    steps = walk_steps(total, len(walk), warmup)
    assert steps[-1] == total and steps == sorted(set(steps))
    for step, b in zip(steps, walk):
        assert walk_target(step / total, full, walk, warmup, prune) == pytest.approx(b)
    targets = [walk_target(s / total, full, walk, warmup, prune) for s in range(total + 1)]
    assert all(a >= b for a, b in zip(targets, targets[1:]))  # declines, never jumps back up
    assert max(abs(a - b) for a, b in zip(targets, targets[1:])) < 0.1 * full  # continuous between segments
    for p in (0.0, 0.3, 0.55, 0.7, 0.9, 1.0):
        assert walk_target(p, full, [300], warmup, prune) == target_bytes(p, full, 300, warmup, prune)


@pytest.mark.parametrize("front, budget, match", [
    ([0.5, 0.5, 0.25], 0.25, "strictly decreasing"),
    ([0.25, 0.5], 0.5, "strictly decreasing"),
    ([1.5, 0.25], 0.25, "strictly decreasing"),
    ([0.5, 0.25], 0.1, "must equal budget"),
])
def test_bad_front_is_one_line_naming_the_key(tmp_path: Path, front, budget, match) -> None:
    path = write_run_config(tmp_path, search={"method": "ham", "budget": budget, "front": front})
    with pytest.raises(ValueError, match=match) as e:
        load_config(path)
    assert "search.front" in str(e.value) and "\n" not in str(e.value) and str(path) in str(e.value)


@pytest.mark.parametrize("extra, match", [
    ({"front_check": ["uniform"]}, "front_check: \\[\\] or candidates of HAM's check including ham"),
    ({"front_check": ["ham", "nope"]}, "front_check"),
    ({"retrain_warm_start": True}, "retrain from scratch"),
])
def test_bad_front_settings_are_one_line(tmp_path: Path, extra, match) -> None:
    path = write_run_config(tmp_path, search={"method": "ham", "budget": 0.25, "front": [0.5, 0.25], **extra})
    with pytest.raises(ValueError, match=match) as e:
        load_config(path)
    assert "search." in str(e.value) and "\n" not in str(e.value)


def test_front_with_no_feasible_budget_records_each_reason(config: Path) -> None:
    from sharded_mde.search.run import run_search

    cfg = load_config(config)
    cfg = dataclasses.replace(cfg, run_dir=cfg.run_dir + "_none",
                              search=dataclasses.replace(cfg.search, budget=0.1, front=[0.2, 0.1]))
    env = init_distributed(prefer_cuda=False)
    try:
        with pytest.raises(InfeasibleBudget, match="search.budget 0.1 "):
            run_search(cfg, env)
    finally:
        shutdown_distributed()
    front = json.loads((Path(cfg.run_dir) / "ham" / FRONT_FILE).read_text())
    assert [(p["budget"], p["feasible"]) for p in front["points"]] == [(0.2, False), (0.1, False)]
    assert not (Path(cfg.run_dir) / "ham" / "checkpoints").exists()  # nothing was trained


def test_front_needs_ham(tmp_path: Path) -> None:
    path = write_run_config(tmp_path, search={"method": "uniform", "budget": 0.25, "front": [0.5, 0.25]})
    with pytest.raises(ValueError, match="search.front: only HAM"):
        load_config(path)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_planted_config(tmp_path_factory.mktemp("front"), "table_wise",
                               {"method": "ham", "budget": 0.2, "front": [0.8, 0.5, 0.35, 0.2], "epochs": 3,
                                "mask_lr": 0.02, "front_check": [], "check_epochs": 0.5})


def test_front_writes_a_dims_file_per_feasible_budget_and_records_the_infeasible(config: Path) -> None:
    from sharded_mde.search.retrain import run_retrain
    from sharded_mde.search.run import run_search

    cfg = load_config(config)
    tables = full_table_configs(cfg)
    floor = smallest_feasible_fraction(tables)
    assert 0.2 < floor < 0.35  # the last budget is below every field at dim 4, the others are not
    env = init_distributed(prefer_cuda=False)
    try:
        with pytest.raises(InfeasibleBudget, match=f"smallest feasible budget is {floor:.4f}"):
            run_search(cfg, env)
        front = json.loads((Path(cfg.run_dir) / "ham" / FRONT_FILE).read_text())
        with pytest.raises(InfeasibleBudget):  # resumed: the finished supernet is not trained again
            run_search(cfg, env)
        again = json.loads((Path(cfg.run_dir) / "ham" / FRONT_FILE).read_text())
        retrained = run_retrain(cfg, env, point_dir(cfg.run_dir, "ham", 0.5) / "dims.json", "retrain_b0.5")
    finally:
        shutdown_distributed()
    assert front["points"] == again["points"]
    points = {p["budget"]: p for p in front["points"]}
    assert list(points) == [0.8, 0.5, 0.35, 0.2] and not points[0.2]["feasible"]
    assert f"smallest feasible budget is {floor:.4f}" in points[0.2]["reason"]
    kept = []
    for b in (0.8, 0.5, 0.35):
        p = points[b]
        dims = load_dims(p["dims_file"], tables)
        assert Path(p["dims_file"]) == point_dir(cfg.run_dir, "ham", b) / "dims.json"
        assert dims.method == "ham" and dims.budget_fraction == b and dims.kept_bytes <= dims.budget_bytes
        assert all(t.dim >= 4 for t in dims.tables)  # the feasibility rule: every field at the smallest legal dim
        assert 0 < p["preview_valid"]["auc"] < 1 and p["preview_valid"]["logloss"] > 0
        # the single search's selection on the supernet as it was at the point: loss effect per byte
        values = {n: torch.tensor(v) for n, v in dims.extra["mask_values"].items()}
        worth = {t.name: interpolate({int(d): -m["logloss"] for d, m in dims.extra["loss_effect"][t.name].items()},
                                     dim_cap(t.num_embeddings, t.embedding_dim)) for t in tables}
        want = select_dims(values, tables, b, worth=worth)
        assert {t.name: t.dim for t in dims.tables} == {n: len(c) for n, c in want.items()}
        kept.append(dims.kept_bytes)
    steps = [points[b]["step"] for b in (0.8, 0.5, 0.35)]
    ends = walk_steps(front["steps"], 3, cfg.search.warmup)
    assert all(lo < s <= hi for lo, s, hi in zip([0] + ends, steps, ends))  # each in its own segment
    assert kept == sorted(kept, reverse=True)
    assert not (Path(cfg.run_dir) / "ham" / "dims.json").exists()  # search.budget itself was not feasible
    assert 0 < retrained["test"]["auc"] < 1 and retrained["kept_bytes"] == points[0.5]["kept_bytes"]


def test_front_ending_at_a_feasible_budget_is_the_run_s_dims_file(config: Path) -> None:
    from sharded_mde.search.retrain import run_retrain
    from sharded_mde.search.run import run_search

    cfg = load_config(config)
    cfg = dataclasses.replace(cfg, run_dir=cfg.run_dir + "_feasible", search=dataclasses.replace(
        cfg.search, budget=0.5, front=[0.8, 0.5], front_check=["ham", "uniform_filled"]))
    env = init_distributed(prefer_cuda=False)
    try:
        dims = run_search(cfg, env)
        short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=0.5))  # as the check trained
        retrained = run_retrain(short, env, point_dir(cfg.run_dir, "ham", 0.8) / "dims.json", "retrain_b0.8")
    finally:
        shutdown_distributed()
    point = load_dims(point_dir(cfg.run_dir, "ham", 0.5) / "dims.json")
    stage = load_dims(Path(cfg.run_dir) / "ham" / "dims.json")
    assert dims.tables == point.tables == stage.tables and stage.budget_fraction == 0.5
    for b in (0.8, 0.5):  # the check trained the two candidates at each point and returned the better one
        check = load_dims(point_dir(cfg.run_dir, "ham", b) / "dims.json").check
        assert {c.name for c in check.candidates} == {"ham", "uniform_filled"} and check.winner in ("ham", "uniform_filled")
        assert (point_dir(cfg.run_dir, "ham", b) / "check_ham" / "metrics.json").is_file()
        assert all(c.kept_bytes <= load_dims(point_dir(cfg.run_dir, "ham", b) / "dims.json").budget_bytes
                   for c in check.candidates)
    assert retrained["reused_check_training"]  # the point's retrain resumes the check's training of its winner
    trace = json.loads((Path(cfg.run_dir) / "ham" / "trace.json").read_text())
    high = budget_bytes(full_table_configs(cfg), 0.8, "fp32", cfg.train.embedding_optimizer)
    assert trace["walk"] == [high, stage.budget_bytes]


def _stage(outputs, seconds):
    return {"outputs": outputs, "seconds": seconds}


def test_bench_records_the_front_once_per_seed_and_pairs_it_with_ham(monkeypatch: pytest.MonkeyPatch) -> None:
    stages = {}
    for seed in range(3):
        done = {"baseline": _stage({"test": {"auc": 0.80, "logloss": 0.5}, "full_bytes": 1000}, 10.0)}
        points = []
        for b in (0.5, 0.25, 0.05):
            if b == 0.05:
                done[f"ham_b{b:g}"] = _stage({"infeasible": "too small"}, 0.1)
                done[f"retrain_ham_b{b:g}"] = _stage({"infeasible": "too small"}, 0.0)
                points.append({"budget": b, "feasible": False, "reason": "too small"})
                continue
            cell = {"dims_file": "x", "method": "ham", "full_bytes": 1000, "budget_bytes": int(1000 * b),
                    "kept_bytes": int(1000 * b) - 10}
            done[f"ham_b{b:g}"] = _stage(cell, 40.0 + seed)
            done[f"retrain_ham_b{b:g}"] = _stage({"test": {"auc": 0.79 + b / 10, "logloss": 0.5}, "init": "scratch"}, 1.0)
            points.append({**cell, "budget": b, "feasible": True, "preview_valid": {"auc": 0.7 + seed / 100}})
            done[f"retrain_{FRONT}_b{b:g}"] = _stage({"test": {"auc": 0.79 + b / 10 + seed / 1000, "logloss": 0.5},
                                                     "init": "scratch"}, 5.0)
        done[FRONT] = _stage({"points": points}, 50.0)
        stages[seed] = done
    monkeypatch.setattr("sharded_mde.bench.quality.planted_score", lambda path: {})  # no real dims files here
    doc = collect_results(stages, ["ham", FRONT], [0.5, 0.25, 0.05])
    front = [r for r in doc["records"] if r["method"] == FRONT]
    assert len(front) == 9 and sum(r["feasible"] for r in front) == 6
    assert all(r["search_seconds"] == 50.0 for r in front if r["feasible"])
    assert doc["infeasible"][f"{FRONT} at 0.05"] == "too small"
    vs_ham = [p for p in doc["paired"] if p["reference"] == "ham"]
    assert {p["method"] for p in vs_ham} == {FRONT} and len(vs_ham) == 3
    mid = next(p for p in vs_ham if p["budget"] == 0.25)
    assert mid["mean"] == pytest.approx(0.001) and mid["n"] == 3
    assert [round(r["ratio"], 4) for r in doc["front_time"]] == [round(50 / (40 + s), 4) for s in range(3)]
    assert doc["front_time"][0]["front_with_retrains_seconds"] == 60.0
    text = results_markdown(doc)
    assert "Paired difference of test AUC vs ham" in text and "preview valid AUC" in text
    assert "| 0.05 | infeasible | infeasible |" in text


def test_bench_rejects_an_unknown_method_but_knows_the_front() -> None:
    from sharded_mde.bench.quality import check_bench_methods

    check_bench_methods(["ham", FRONT])
    with pytest.raises(ValueError, match="'nope'"):
        check_bench_methods([FRONT, "nope"])

