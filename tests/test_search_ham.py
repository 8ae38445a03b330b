"""HAM's validation checks: loss-effect widths, harmless drops, the candidate check, and the search end to end."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from torchrec import EmbeddingBagConfig

from sharded_mde.config import load_config
from sharded_mde.dims import InfeasibleBudget, load_dims, smallest_feasible_fraction, table_bytes
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.ham_check import check_candidates, harmless_drops, interpolate, measured_widths
from sharded_mde.train.distributed import init_distributed, shutdown_distributed
from tiny_configs import tiny_planted_config


def _tables(spec):
    return [EmbeddingBagConfig(name=f"t_{i}", num_embeddings=r, embedding_dim=d, feature_names=[f"f{i}"])
            for i, (r, d) in enumerate(spec)]


def test_measured_widths_cover_both_legal_neighbours_of_the_kept_count() -> None:
    assert measured_widths(10, 64) == [0, 4, 8, 12]  # 10 kept: 8 and 12 both measured
    assert measured_widths(0, 64) == [0, 4]  # all pruned: 4 (the floor) is still measured
    assert measured_widths(40, 32) == [0, 4, 8, 16, 32]  # never past the row cap
    assert interpolate({0: 1.0, 4: 2.0, 16: 5.0}, 24) == [1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0]  # flat past 16


def test_harmless_drops_compare_auc_without_and_with_the_field() -> None:
    curves = {"t_a": {0: {"auc": 0.70}, 4: {"auc": 0.7005}, 8: {"auc": 0.7008}},
              "t_b": {0: {"auc": 0.60}, 4: {"auc": 0.70}}}
    drops = harmless_drops(curves, tolerance=0.001)
    assert drops["t_a"]["harmless"] and not drops["t_b"]["harmless"]
    assert drops["t_b"] == {"auc_without": 0.6, "auc_with": 0.7, "harmless": False}


def test_candidate_check_returns_the_best_and_records_all() -> None:
    tables = _tables([(100, 16), (50, 16)])
    candidates = {"ham": {"t_0": 4, "t_1": 8}, "ham_mask": {"t_0": 4, "t_1": 8}, "uniform": {"t_0": 4, "t_1": 4},
                  "power_law": {"t_0": 8, "t_1": 4}}
    auc = {"ham": 0.71, "uniform": 0.70, "power_law": 0.73}
    scored = []

    def score(name, dims):
        scored.append(name)
        return {"auc": auc[name], "logloss": 0.6}

    out = check_candidates(score, tables, candidates, "fp32", "rowwise_adagrad")
    assert scored == ["ham", "uniform", "power_law"]  # equal dims are trained once
    assert out.winner == "power_law" and out.runner_up == "ham"
    assert out.margin_vs_ham == pytest.approx(0.02) and out.margin_vs_runner_up == pytest.approx(0.02)
    rows = {r.name: r for r in out.candidates}
    assert set(rows) == set(candidates) and rows["ham_mask"].same_as == "ham"
    assert rows["uniform"].kept_bytes == table_bytes(100, 4).total + table_bytes(50, 4).total


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_planted_config(tmp_path_factory.mktemp("ham"), "table_wise", {"method": "ham", "budget": 0.4, "check_epochs": 0.3})


def test_ham_returns_the_best_checked_candidate_within_budget(config: Path) -> None:
    from sharded_mde.search.run import run_search

    cfg = load_config(config)
    env = init_distributed(prefer_cuda=False)
    try:
        tables = full_table_configs(cfg)
        low = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, budget=0.05))
        with pytest.raises(InfeasibleBudget, match=f"smallest feasible budget is {smallest_feasible_fraction(tables):.4f}"):
            run_search(low, env, "ham_low")
        assert not (Path(cfg.run_dir) / "ham_low").exists()  # failed before training anything
        dims = run_search(cfg, env)
        from sharded_mde.search.retrain import run_retrain

        dims_path = Path(cfg.run_dir) / "ham" / "dims.json"
        short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=0.3))  # as the check trained
        reused = run_retrain(short, env, dims_path, "retrain_short")
        fresh = run_retrain(cfg, env, dims_path, "retrain_full")
    finally:
        shutdown_distributed()
    assert reused["reused_check_training"] and not fresh["reused_check_training"]
    check = load_dims(dims_path).check
    assert round(reused["valid"]["auc"], 6) == check.candidate(check.winner).valid_auc  # the very model the check scored
    back = load_dims(Path(cfg.run_dir) / "ham" / "dims.json", tables)
    assert back.supernet_checkpoints == str(Path(cfg.run_dir) / "ham" / "checkpoints") and Path(check.winner_checkpoints).is_dir()
    rows = {r.name: r for r in check.candidates}
    assert {"ham", "ham_mask", "uniform", "uniform_filled", "power_law"} <= set(rows)
    best = max(rows.values(), key=lambda r: (r.valid_auc, -r.valid_logloss, -r.kept_bytes))
    assert rows[check.winner].valid_auc == best.valid_auc
    assert {t.name: t.dim for t in dims.tables} == rows[check.winner].dims
    assert all(r.kept_bytes <= back.budget_bytes for r in rows.values())
    assert back.kept_bytes <= back.budget_bytes and all(t.dim >= 4 for t in back.tables)
    assert set(back.extra["loss_effect"]) == {t.name for t in tables}
    for r in rows.values():  # every candidate that was trained left its validation-scored stage
        if r.same_as is None:
            assert (Path(cfg.run_dir) / "ham" / f"check_{r.name}" / "metrics.json").is_file()
