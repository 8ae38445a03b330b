"""Per-rank caps in the plan report: cap, bytes, headroom, fits; the smallest cap that fits, by bisection with the real planner."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torchrec import EmbeddingBagCollection
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation

from sharded_mde.cli import main
from sharded_mde.config import PlanConfig
from sharded_mde.dims import load_dims
from sharded_mde.plan.caps import ROOMY_GB, fit_plan, rank_caps, rank_storage, with_cap
from sharded_mde.plan.report import memory_report
from sharded_mde.plan.sharding import GiB, PlanningError, make_topology, plan_sharding
from sharded_mde.plan.tables import plan_tables
from test_plan_dims import tables, write_dims

FULL = tables({"a": 20_000, "b": 5_000, "c": 300, "d": 40}, dim=64)
CPU2 = PlanConfig(world_size=2, compute_device="cpu", ddr_cap_gb=1, batch_size=64)
DIMS = {"t_a": 8, "t_b": 16, "t_c": 4, "t_d": 64}


def busiest(tabs, cfg: PlanConfig) -> int:
    """The busiest rank's planner bytes when the cap is no constraint."""
    return max(rank_storage(plan_sharding(tabs, with_cap(cfg, ROOMY_GB))[1], cfg.world_size, "ddr"))


@pytest.fixture
def compact(tmp_path):
    return plan_tables(load_dims(write_dims(tmp_path / "d.json", FULL, DIMS), FULL), FULL)


def test_fitting_topology_has_headroom_cap_minus_bytes(compact):
    rep = memory_report(FULL, compact, CPU2)
    assert rep["topology"]["cap_per_rank"] == GiB  # DDR: the planner reserves nothing
    for r in rep["ranks"]:
        for side in ("full", "compact"):
            assert r["cap"] == GiB and r[f"bytes_{side}"] == r[side]["planner_ddr"] > 0
            assert r[f"headroom_{side}"] == r["cap"] - r[f"bytes_{side}"] >= 0 and r[f"fits_{side}"]
    for side in ("full", "compact"):
        f = rep["fit"][side]
        assert f["fits"] and f["smallest_cap_gb"] is None and f["planner_calls"] == 1
        assert f["busiest_bytes"] == max(r[f"bytes_{side}"] for r in rep["ranks"])
        assert f["line"].startswith(f"the {side} tables fit 2 ranks of 1 GiB DDR: busiest rank {f['busiest_rank']} needs")


def test_hbm_cap_is_what_the_planner_may_fill():
    cfg = PlanConfig(world_size=4, compute_device="cuda", hbm_cap_gb=2, ddr_cap_gb=8, storage_reserve=0.2, batch_size=64)
    ebc = EmbeddingBagCollection(tables=FULL, device=torch.device("meta"))
    planner_view = FixedPercentageStorageReservation(0.2).reserve(make_topology(cfg), 64, ebc, [EmbeddingBagCollectionSharder()])
    assert rank_caps(cfg) == {"hbm": planner_view.devices[0].storage.hbm, "ddr": 8 * GiB}
    assert rank_caps(cfg)["hbm"] < 2 * GiB


def test_cap_below_busiest_rank_names_the_smallest_cap_and_the_bisection_is_tight(compact):
    need = busiest(FULL, CPU2)
    cfg = with_cap(CPU2, need / 2 / GiB)
    with pytest.raises(PlanningError):
        plan_sharding(FULL, cfg)
    fit = fit_plan(FULL, cfg)
    assert not fit.fits and fit.step_gb > 0 and fit.planner_calls > 2
    plan_sharding(FULL, with_cap(cfg, fit.smallest_cap_gb))  # plans at the smallest cap
    with pytest.raises(PlanningError):
        plan_sharding(FULL, with_cap(cfg, fit.smallest_cap_gb - fit.step_gb))  # and not one step below
    assert fit.smallest_cap_gb * GiB >= need / 2

    rep = memory_report(FULL, compact, cfg, full_plan=fit)
    f, top = rep["fit"]["full"], max(rep["ranks"], key=lambda r: r["bytes_full"])
    assert not f["fits"] and rep["fit"]["compact"]["fits"] and f["busiest_rank"] == top["rank"]
    assert top["headroom_full"] == top["cap"] - top["bytes_full"] < 0 and not top["fits_full"]
    assert "\n" not in f["line"] and f"busiest rank {top['rank']} needs" in f["line"]
    assert f"--set plan.ddr_cap_gb={fit.smallest_cap_gb!r}" in f["line"]


def test_cli_compact_over_cap_is_one_line_exit_2_with_report(tmp_path, compact, capsys):
    preset = tmp_path / "tables.yaml"
    preset.write_text("embedding_dim: 64\ntables:\n" + "".join(
        f"  - {{feature: {t.feature_names[0]}, num_embeddings: {t.num_embeddings}}}\n" for t in FULL))
    dims, out = write_dims(tmp_path / "d.json", FULL, DIMS), tmp_path / "o"
    args = ["plan", "--tables", str(preset), "--dims", str(dims), "--out", str(out), "--set", "plan.compute_device=cpu",
            "--set", "plan.world_size=2", "--set", "plan.batch_size=64"]

    full_need, compact_need = busiest(FULL, CPU2), busiest(compact, CPU2)
    assert compact_need < full_need
    between = (full_need + compact_need) / 2 / GiB
    assert main(args + ["--set", f"plan.ddr_cap_gb={between!r}"]) == 0
    stdout = capsys.readouterr().out
    assert "the full tables do not fit 2 ranks" in stdout and "the compact tables fit 2 ranks" in stdout
    assert (out / "sharding_plan.json").exists() and not (out / "sharding_plan_full.json").exists()

    low = compact_need / 2 / GiB
    assert main(args + ["--set", f"plan.ddr_cap_gb={low!r}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no plan fits: the compact tables do not fit 2 ranks" in err and "--set plan.ddr_cap_gb=" in err
    rep = json.loads((out / "report.json").read_text())
    f = rep["fit"]["compact"]
    assert not f["fits"] and f["cap_gb"] == low and f["smallest_cap_gb"] > low and f["headroom"] < 0
    assert not (out / "sharding_plan.json").exists()  # the earlier run's plan is no plan for this cap
    plan_sharding(compact, dataclasses.replace(CPU2, ddr_cap_gb=f["smallest_cap_gb"]))
