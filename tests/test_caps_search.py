"""Acceptance (#20): HAM with per-rank caps as its constraint (`search.budget: caps`) on 2 gloo ranks.

The cap is below the full model's busiest rank. After the search, the compact model is sharded by the
search's plan under DMP with fused row-wise Adagrad; each rank's real bytes (its local shards and the
fused optimizer state) are the report's and within the cap, and no table's next 4 columns fit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dist_utils import run_ranks
from sharded_mde.config import CAPS, ConfigError, PlanConfig, load_config
from sharded_mde.dims import InfeasibleBudget, load_dims, table_bytes
from sharded_mde.cli import main
from sharded_mde.plan.caps import with_cap
from sharded_mde.plan.fit_caps import busiest_unconstrained, fit_dims, plan_at_caps, rule_within_caps, sized
from sharded_mde.plan.rules import rule_dims
from sharded_mde.plan.report import memory_report
from sharded_mde.plan.sharding import GiB, plan_sharding
from sharded_mde.plan.tables import full_table_configs, plan_tables
from test_plan_dims import tables
from test_plan_dmp import body as train_and_measure
from tiny_configs import tiny_planted_config

PLAN = {"world_size": 2, "compute_device": "cpu", "batch_size": 64}
CAP_SHARE = 0.6  # the cap: this share of the full model's busiest rank (unconstrained plan)
FULL = tables({"a": 6_000, "b": 2_500, "c": 300, "d": 40}, dim=32)


def capped(share: float) -> PlanConfig:
    """2 CPU ranks whose DDR cap is `share` of the full tables' busiest rank."""
    base = PlanConfig(**PLAN)
    return with_cap(base, share * max(busiest_unconstrained(FULL, base)[1]) / GiB)


def no_step_fits(dims: dict, cfg: PlanConfig) -> bool:
    """No table below its full dim finds a plan within the caps with 4 more columns."""
    return all(plan_at_caps(sized(FULL, {**dims, t.name: dims[t.name] + 4}), cfg) is None
               for t in FULL if dims[t.name] < t.embedding_dim)


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tiny_planted_config(tmp_path_factory.mktemp("caps"), "table_wise",
                               {"method": "ham", "budget": CAPS, "caps_replan_every": 2})
    full = full_table_configs(load_config(path))
    busiest = max(busiest_unconstrained(full, PlanConfig(**PLAN))[1])
    doc = yaml.safe_load(path.read_text())
    doc["plan"] = {**PLAN, "ddr_cap_gb": CAP_SHARE * busiest / GiB}
    path.write_text(yaml.safe_dump(doc))
    return path


def _search(rank: int, world: int, config: str) -> None:
    from sharded_mde.search.run import run_search
    from sharded_mde.train.distributed import init_distributed

    run_search(load_config(config), init_distributed(prefer_cuda=False))


def test_search_under_caps_fits_every_rank_and_the_busiest_within_one_step(config: Path, tmp_path: Path) -> None:
    cfg = load_config(config)
    full = full_table_configs(cfg)
    assert plan_at_caps(full, cfg.plan) is None  # the full model exceeds the cap
    run_ranks(_search, str(config))

    out = Path(cfg.run_dir) / "ham"
    dims = load_dims(out / "dims.json", full)
    compact = plan_tables(dims, full)
    planned = plan_sharding(compact, cfg.plan)  # the planner finds a plan within the caps
    rep = memory_report(full, compact, cfg.plan, compact_plan=planned)
    assert not rep["fit"]["full"]["fits"] and rep["fit"]["compact"]["fits"]
    cap, rec = rep["ranks"][0]["cap"], dims.caps
    assert rec.cap == cap and rec.bytes == [r["bytes_compact"] for r in rep["ranks"]]
    assert rec.headroom == [cap - b for b in rec.bytes] and min(rec.headroom) >= 0
    assert rec.full_busiest > cap and rec.replans and all(r["budget"] < dims.full_bytes for r in rec.replans)
    assert dims.kept_bytes < dims.full_bytes

    # real bytes: the compact model sharded by the search's plan, trained 3 steps with fused row-wise Adagrad
    run_ranks(train_and_measure, str(out / "sharding_plan.json"), compact, str(tmp_path), world_size=2)
    for r in range(2):
        held = json.loads((tmp_path / f"rank{r}.json").read_text())
        want = rep["ranks"][r]
        assert (held["weight"], held["optimizer"]) == (want["compact"]["weight"], want["compact"]["optimizer"])
        assert held["weight"] + held["optimizer"] <= want["bytes_compact"] <= cap

    # within one 4-column step on the busiest rank: no table's next 4 columns find a plan within the caps,
    # and the busiest rank's headroom is less than the largest such step of a table it holds
    now = {t.name: dims.table(t.name).dim for t in full}
    growable = [t for t in full if now[t.name] + 4 <= min(t.embedding_dim, t.num_embeddings // 4 * 4)]
    assert growable
    for t in growable:
        assert plan_at_caps(sized(full, {**now, t.name: now[t.name] + 4}), cfg.plan) is None, t.name
    top = rec.busiest_rank
    held_there = {so.name for so in planned[1] if any(sh.rank == top for sh in so.shards)}
    steps = [table_bytes(t.num_embeddings, now[t.name] + 4).total - table_bytes(t.num_embeddings, now[t.name]).total
             for t in growable if t.name in held_there]
    assert steps and rec.headroom[top] < max(steps), (rec.headroom, steps)


def test_caps_budget_is_validated_on_load(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: {method: pme, budget: caps}\n")
    with pytest.raises(ConfigError, match="budget: 'caps' needs method ham"):
        load_config(bad)
    bad.write_text("search: {budget: hbm}\n")
    with pytest.raises(ConfigError, match="search.budget: a fraction in"):
        load_config(bad)


@pytest.mark.parametrize("start", [32, 4])
def test_final_check_trims_or_fills_until_every_rank_fits_and_no_step_does(start: int) -> None:
    cfg = capped(0.5)
    worth = {t.name: [k * (1 + i) for k in range(t.embedding_dim // 4 + 1)] for i, t in enumerate(FULL)}
    fit = fit_dims(FULL, {t.name: start for t in FULL}, worth, cfg)
    rec = fit.record
    assert bool(rec.trimmed) == (start == 32) and (start == 32 or rec.filled)  # a trim may overshoot: filled back
    assert plan_at_caps(sized(FULL, fit.dims), cfg) is not None and min(rec.headroom) >= 0
    assert rec.bytes == [sum(sh.storage.ddr for so in fit.planned[1] for sh in so.shards if sh.rank == r) for r in range(2)]
    assert rec.full_busiest > rec.cap and no_step_fits(fit.dims, cfg)
    assert rec.blocked == sorted(t.name for t in FULL if fit.dims[t.name] < t.embedding_dim)


def test_rule_within_caps_takes_the_largest_fraction_that_fits(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = capped(0.7)
    dims, planned = rule_within_caps(FULL, "power_law", cfg)
    assert plan_at_caps(plan_tables(dims, FULL), cfg) is not None and min(dims.caps.headroom) >= 0
    assert dims.budget_fraction < 1 and dims.caps.full_busiest > dims.caps.cap
    larger = rule_dims(FULL, "power_law", min(1.0, dims.budget_fraction * 1.05))
    assert plan_at_caps(plan_tables(larger, FULL), cfg) is None  # 5% more finds no plan
    with pytest.raises(InfeasibleBudget, match="even with every table at dim 4 .*: raise plan.ddr_cap_gb$"):
        rule_within_caps(FULL, "power_law", capped(0.01))

    preset = tmp_path / "tables.yaml"
    preset.write_text("embedding_dim: 32\ntables:\n" + "".join(
        f"  - {{feature: {t.feature_names[0]}, num_embeddings: {t.num_embeddings}}}\n" for t in FULL))
    md = tmp_path / "ranks.md"
    args = ["plan", "--tables", str(preset), "--rule", "power_law", "--budget", CAPS, "--out", str(tmp_path / "o"),
            "--ranks-md", str(md)] + [f"--set=plan.{k}={v!r}" for k, v in {**PLAN, "ddr_cap_gb": cfg.ddr_cap_gb}.items()]
    assert main(args) == 0
    assert "the compact tables fit 2 ranks" in capsys.readouterr().out
    text = md.read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line[:4] in ("| 0 ", "| 1 ")]
    assert "sized to the per-rank caps" in text and "| rank | raw before |" in text
    assert [r[9] for r in rows] == ["yes", "yes"] and "NO" in [r[6] for r in rows]  # fits after on both; not before
