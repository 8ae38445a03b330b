"""Per-rank caps: what each rank may hold, and the smallest cap with which the planner finds a plan.

A rank's cap is what TorchRec's planner checks that rank's storage estimate against: its HBM less
`storage_reserve` (compute_device cuda; `FixedPercentageStorageReservation` reserves HBM only) or
its DDR (cpu), in bytes. When the planner finds no plan on the configured cap, `fit_plan` bisects
over the cap with the real planner (`plan_sharding` on a Topology of each trial cap), not a formula.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from torchrec import EmbeddingBagConfig
from torchrec.distributed.planner.types import ShardingOption
from torchrec.distributed.types import ShardingPlan

from sharded_mde.config import PlanConfig
from sharded_mde.plan.sharding import GiB, PlanningError, plan_sharding

Planned = Tuple[ShardingPlan, List[ShardingOption]]
ROOMY_GB = 2.0**20  # GiB per rank that no table set approaches: the planner's unconstrained choice sizes the search
STEPS = 64  # the bisection's step: the power of two GiB nearest below 1/STEPS of the roomy plan's busiest rank
MAX_DOUBLINGS = 8  # an upper trial cap that still finds no plan is doubled at most this often


@dataclass
class Fit:
    """One table set's plan and whether the planner found it on the configured cap.

    When it did not, `planned` is the plan at `smallest_cap_gb`, the smallest cap (a multiple of
    `step_gb`, in the config's GiB before the reserve) with which the planner finds a plan;
    `smallest_cap_gb - step_gb` finds none. `error` is the planner's one-line failure on the configured cap;
    `planner_calls` counts every planner run, that one included.
    """

    planned: Planned
    fits: bool = True
    smallest_cap_gb: Optional[float] = None
    step_gb: Optional[float] = None
    planner_calls: int = 1
    error: str = ""


def cap_tier(cfg: PlanConfig) -> str:
    """The storage tier the tables live in: hbm on cuda, ddr on cpu."""
    return "hbm" if cfg.compute_device == "cuda" else "ddr"


def checked_tiers(cfg: PlanConfig) -> Tuple[str, ...]:
    """The tiers the planner checks every rank against (cuda kernels may spill to DDR through UVM)."""
    return ("hbm", "ddr") if cfg.compute_device == "cuda" else ("ddr",)


def cap_key(cfg: PlanConfig) -> str:
    """The plan config key of the cap the bisection varies (hbm_cap_gb or ddr_cap_gb)."""
    return f"{cap_tier(cfg)}_cap_gb"


def rank_caps(cfg: PlanConfig) -> Dict[str, int]:
    """Bytes per rank the planner may fill, per tier: HBM less `storage_reserve`, DDR in full."""
    hbm, ddr = int(cfg.hbm_cap_gb * GiB), int(cfg.ddr_cap_gb * GiB)  # as `make_topology` builds each device
    return {"hbm": int((1 - cfg.storage_reserve) * hbm), "ddr": ddr}


def with_cap(cfg: PlanConfig, cap_gb: float) -> PlanConfig:
    """`cfg` with the compute tier's cap per rank set to `cap_gb` GiB."""
    return dataclasses.replace(cfg, **{cap_key(cfg): cap_gb})


def rank_storage(options: Sequence[ShardingOption], world: int, tier: str) -> List[int]:
    """The planner's storage estimate per rank in `tier`, summed over the shards placed there."""
    out = [0] * world
    for so in options:
        for sh in so.shards:
            out[sh.rank] += getattr(sh.storage, tier)
    return out


def fit_plan(tables: Sequence[EmbeddingBagConfig], cfg: PlanConfig,
             bag_lengths: Optional[Mapping[str, float]] = None) -> Fit:
    """Plans `tables` on `cfg`; if no plan fits, finds the smallest cap that does (`smallest_cap`).

    Example::

        fit = fit_plan(full, PlanConfig(world_size=8, compute_device="cuda", hbm_cap_gb=8))
        if not fit.fits:
            print(f"plan.hbm_cap_gb={fit.smallest_cap_gb} is the smallest cap that fits")
    """
    try:
        return Fit(plan_sharding(tables, cfg, bag_lengths=bag_lengths))
    except PlanningError as e:
        if not tables:
            raise
        return smallest_cap(tables, cfg, str(e), bag_lengths)


def smallest_cap(tables: Sequence[EmbeddingBagConfig], cfg: PlanConfig, error: str,
                 bag_lengths: Optional[Mapping[str, float]] = None) -> Fit:
    """Bisects the compute tier's cap with the real planner for the smallest one that finds a plan.

    The roomy plan (cap `ROOMY_GB`) gives the step and the first bounds: its busiest rank (a plan
    exists there) and its mean rank (no even split goes lower); each bound is tried, widened until
    it holds (doubled up, halved down), then bisected to one step. If no cap finds a plan, the
    failure is not about capacity: `error` (the planner's message on `cfg`) is raised.
    """
    tier, calls = cap_tier(cfg), 0
    keep = 1 - cfg.storage_reserve if tier == "hbm" else 1.0
    tried: Dict[float, Optional[Planned]] = {}

    def attempt(cap_gb: float) -> Optional[Planned]:
        nonlocal calls
        if cap_gb not in tried:
            calls += 1
            try:
                tried[cap_gb] = plan_sharding(tables, with_cap(cfg, cap_gb), bag_lengths=bag_lengths)
            except PlanningError:
                tried[cap_gb] = None
        return tried[cap_gb]

    roomy = attempt(ROOMY_GB)
    if roomy is None:
        raise PlanningError(error)
    need = rank_storage(roomy[1], cfg.world_size, tier)
    upper_gb, lower_gb = max(need) / keep / GiB, sum(need) / len(need) / keep / GiB
    step = 2.0 ** math.floor(math.log2(max(upper_gb, 2.0**-30) / STEPS))
    hi, lo = math.ceil(upper_gb / step), math.floor(lower_gb / step)
    for _ in range(MAX_DOUBLINGS):
        if attempt(hi * step):
            break
        lo, hi = hi, 2 * hi
    else:
        raise PlanningError(error)
    while lo > 0 and attempt(lo * step):  # the planner fits below an even split (e.g. with UVM caching)
        hi, lo = lo, lo // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid * step):
            hi = mid
        else:
            lo = mid
    planned = attempt(hi * step)
    assert planned is not None  # hi is a tried cap that found a plan
    return Fit(planned, fits=False, smallest_cap_gb=hi * step, step_gb=step, planner_calls=calls + 1, error=error)
