"""Dims that fit per-rank caps, checked with the real planner: the exact final step of `search.budget: caps`.

`fit_dims` takes dims (e.g. a search's at its steered byte budget) and each table's worth per
4-column step, plans them with TorchRec's planner on the `plan` topology, and makes the plan fit:
while the planner finds no plan at the caps, it trims the 4-column steps of least worth per byte
from the tables on the busiest rank of the unconstrained plan (as many as cover that rank's excess,
then re-plans); then it gives steps back by worth per byte while the planner still finds a plan at
the caps, and repeats that pass until no table's next step fits. Bytes are the plan report's: the
planner's per-rank estimate (weights, optimizer state, its per-shard buffers) against
`caps.rank_caps`. `rule_within_caps` does the same for a rule (power law, uniform): the largest
budget fraction whose rule dims the planner fits, by bisection.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from torchrec import EmbeddingBagConfig

from sharded_mde.config import PlanConfig
from sharded_mde.dims import (DIM_MULTIPLE, CapsRecord, DimsFile, InfeasibleBudget, dim_cap,
                              smallest_feasible_fraction, table_bytes)
from sharded_mde.plan.caps import ROOMY_GB, Planned, cap_key, cap_tier, rank_caps, rank_storage, with_cap
from sharded_mde.plan.report import plan_bytes
from sharded_mde.plan.rules import rule_dims
from sharded_mde.plan.sharding import PlanningError, plan_sharding
from sharded_mde.plan.tables import plan_tables

Bags = Optional[Mapping[str, float]]
RULE_BISECTIONS = 16  # rule_within_caps: bisection steps over the budget fraction (2^-16 of the feasible range)


@dataclass
class DimsFit:
    """Dims that fit the caps, their plan at the caps, and the record of the check (`CapsRecord`)."""

    dims: Dict[str, int]
    planned: Planned
    record: CapsRecord


def sized(tables: Sequence[EmbeddingBagConfig], dims: Mapping[str, int]) -> List[EmbeddingBagConfig]:
    """`tables` at `dims` (a table at dim 0 is left out)."""
    return [dataclasses.replace(t, embedding_dim=dims[t.name]) for t in tables if dims[t.name] > 0]


def plan_at_caps(tables: Sequence[EmbeddingBagConfig], cfg: PlanConfig, bags: Bags = None) -> Optional[Planned]:
    """The planner's plan of `tables` within every rank's cap, or None if it finds none."""
    try:
        return plan_sharding(tables, cfg, bag_lengths=bags)
    except PlanningError:
        return None


def busiest_unconstrained(tables: Sequence[EmbeddingBagConfig], cfg: PlanConfig, bags: Bags = None) -> Tuple[Planned, List[int]]:
    """The planner's plan with a cap no table set approaches, and its bytes per rank in the cap's tier."""
    planned = plan_sharding(tables, with_cap(cfg, ROOMY_GB), bag_lengths=bags)
    return planned, rank_storage(planned[1], cfg.world_size, cap_tier(cfg))


def caps_record(tables: Sequence[EmbeddingBagConfig], planned: Planned, cfg: PlanConfig, full_busiest: int,
                planner_calls: int, **more: Any) -> CapsRecord:
    """The per-rank cap, planner bytes, raw bytes (the plan report's `plan_bytes`) and headroom of a plan."""
    tier, cap = cap_tier(cfg), rank_caps(cfg)[cap_tier(cfg)]
    loads = rank_storage(planned[1], cfg.world_size, tier)
    raw = [r["total"] for r in plan_bytes(tables, planned[1], cfg.optimizer, cfg.world_size)["ranks"]]
    return CapsRecord(tier=tier, cap_gb=getattr(cfg, cap_key(cfg)), cap=cap, bytes=loads, raw=raw,
                      headroom=[cap - b for b in loads], busiest_rank=max(range(len(loads)), key=loads.__getitem__),
                      full_busiest=full_busiest, planner_calls=planner_calls, **more)


def fit_dims(tables: Sequence[EmbeddingBagConfig], dims: Mapping[str, int], worth: Mapping[str, Sequence[float]],
             cfg: PlanConfig, bags: Bags = None, multiple: int = DIM_MULTIPLE) -> DimsFit:
    """`dims` trimmed until the planner fits every rank's cap, then filled back while it still does.

    Args:
        tables (Sequence[EmbeddingBagConfig]): the full tables.
        dims (Mapping[str, int]): the starting dims (legal, at least `multiple`).
        worth (Mapping[str, Sequence[float]]): per table, its worth at dim k * multiple (non-decreasing),
            e.g. `search.budget.column_worth` of the mask values.
        cfg (PlanConfig): the topology and its caps.
        bags: the planner's pooling factors (`plan.tables.mean_bag_lengths`).

    Example::

        fit = fit_dims(tables, {"t_a": 16, "t_b": 8}, worth, PlanConfig(world_size=2, ddr_cap_gb=0.001))
        max(fit.record.bytes) <= fit.record.cap  # and no table's next 4 columns fit
    """
    by = {t.name: t for t in tables}
    dims = {t.name: int(dims[t.name]) for t in tables}
    top = {t.name: dim_cap(t.num_embeddings, t.embedding_dim, multiple) for t in tables}
    calls = 0

    def plan(d: Mapping[str, int]) -> Optional[Planned]:
        nonlocal calls
        calls += 1
        return plan_at_caps(sized(tables, d), cfg, bags)

    def step_bytes(n: str, d: int) -> int:  # the bytes of table n's columns d - multiple .. d
        t = by[n]
        return table_bytes(t.num_embeddings, d, optimizer=cfg.optimizer).total - \
            table_bytes(t.num_embeddings, d - multiple, optimizer=cfg.optimizer).total

    def step_worth(n: str, d: int) -> float:  # the worth of table n's columns d - multiple .. d
        return float(worth[n][d // multiple]) - float(worth[n][d // multiple - 1])

    trimmed: Dict[str, int] = {}
    planned = plan(dims)
    while planned is None:
        calls += 1
        roomy, loads = busiest_unconstrained(sized(tables, dims), cfg, bags)
        rank = max(range(cfg.world_size), key=loads.__getitem__)
        share = _rank_share(roomy, rank)  # each table's fraction of its elements on that rank
        excess = max(1, loads[rank] - rank_caps(cfg)[cap_tier(cfg)])
        saved = 0.0
        while saved < excess:
            cands = [n for n in share if dims[n] > multiple]
            if not cands:
                raise PlanningError(f"no plan fits the caps even with every table on rank {rank} at dim {multiple}: "
                                    f"raise plan.{cap_key(cfg)}")
            n = min(cands, key=lambda x: (step_worth(x, dims[x]) / (share[x] * step_bytes(x, dims[x])), x))
            saved += share[n] * step_bytes(n, dims[n])
            dims[n] -= multiple
            trimmed[n] = trimmed.get(n, 0) + multiple
        planned = plan(dims)

    filled: Dict[str, int] = {}
    while True:  # passes until one gives nothing back: then every table's next step was tried at the final dims
        blocked: List[str] = []
        gave = False
        while True:
            grow = [n for n in dims if n not in blocked and dims[n] + multiple <= top[n]]
            if not grow:
                break
            n = max(grow, key=lambda x: (step_worth(x, dims[x] + multiple) / step_bytes(x, dims[x] + multiple), x))
            trial = {**dims, n: dims[n] + multiple}
            got = plan(trial)
            if got is None:
                blocked.append(n)
            else:
                dims, planned, gave = trial, got, True
                filled[n] = filled.get(n, 0) + multiple
        if not gave:
            break
    full_busiest = max(busiest_unconstrained(tables, cfg, bags)[1])
    record = caps_record(sized(tables, dims), planned, cfg, full_busiest, calls + 1, trimmed=trimmed,
                         filled=filled, blocked=sorted(blocked))
    return DimsFit(dims, planned, record)


def _rank_share(planned: Planned, rank: int) -> Dict[str, float]:
    """Per table with a shard on `rank`: the fraction of its elements there."""
    out: Dict[str, float] = {}
    for so in planned[1]:
        total = sum(sh.size[0] * sh.size[1] for sh in so.shards)
        here = sum(sh.size[0] * sh.size[1] for sh in so.shards if sh.rank == rank)
        if here and total:
            out[so.name] = here / total
    return out


def rule_within_caps(full: List[EmbeddingBagConfig], rule: str, cfg: PlanConfig, alpha: float = 0.3,
                     bags: Bags = None) -> Tuple[DimsFile, Planned]:
    """The rule's dims at the largest budget fraction whose plan fits every rank's cap (bisection with the planner).

    Example::

        dims, planned = rule_within_caps(tables, "power_law", PlanConfig(world_size=8, hbm_cap_gb=8))
        dims.caps.headroom  # every rank >= 0
    """
    calls = 0

    def attempt(fraction: float) -> Optional[Tuple[DimsFile, Planned]]:
        nonlocal calls
        calls += 1
        dims = rule_dims(full, rule, fraction, alpha=alpha, optimizer=cfg.optimizer)
        got = plan_at_caps(plan_tables(dims, full), cfg, bags)
        return None if got is None else (dims, got)

    full_busiest = max(busiest_unconstrained(full, cfg, bags)[1])
    lo, hi = smallest_feasible_fraction(full, optimizer=cfg.optimizer), 1.0
    best = attempt(hi)
    if best is None:
        best = attempt(lo)
        if best is None:
            raise InfeasibleBudget(f"no plan fits the caps even with every table at dim {DIM_MULTIPLE} "
                                   f"({rule} dims): raise plan.{cap_key(cfg)}")
        for _ in range(RULE_BISECTIONS):  # invariant: lo fits, hi does not
            mid = (lo + hi) / 2
            got = attempt(mid)
            if got is None:
                hi = mid
            else:
                lo, best = mid, got
    dims, planned = best
    dims.caps = caps_record(plan_tables(dims, full), planned, cfg, full_busiest, calls + 1)
    return dims, planned
