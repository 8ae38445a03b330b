"""HAM under per-rank caps (`search.budget: caps`): the plan of the chosen dims fits every rank of the `plan` topology.

The caps are the plan section's (world size, HBM or DDR per rank, the reserve), in the plan
report's bytes: the planner's estimate per rank (weights, optimizer state, its per-shard buffers)
against `plan.caps.rank_caps`. HAM's controller keeps steering the kept bytes by dual ascent; its
byte budget comes from the plan. Before training it is the full bytes x cap / the full tables'
busiest rank (unconstrained plan); every `search.caps_replan_every` steps of the pruning the kept
dims are planned with the real planner and the budget becomes kept bytes x cap / busiest rank (a
rank's bytes grow about in proportion to what it keeps; the fixed per-shard buffers are corrected
by the next re-plan). At the end the masks give dims at that budget (`BudgetedSearch.kept_columns`),
and `plan.fit_caps.fit_dims` makes them exact with the planner: it trims the least-worth 4-column
steps from tables on the busiest over-cap rank, then fills back while every rank fits, until no
table's next 4 columns fit. A column's worth is its mask value (shifted so every column is worth
something, as `kept_columns` does). HAM's candidate check (uniform, power-law allocations) is not
run under caps: the candidates are sized by a fraction, not by the plan.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torchrec import EmbeddingBagConfig

from sharded_mde.config import PlanConfig, RunConfig
from sharded_mde.dims import (DIM_MULTIPLE, DimsFile, InfeasibleBudget, dim_cap, floor_bytes, round_to_legal,
                              smallest_feasible_fraction, table_bytes)
from sharded_mde.modules.masked_ebc import ColumnGate, find_gate
from sharded_mde.plan.caps import cap_key, cap_tier, rank_caps
from sharded_mde.plan.fit_caps import busiest_unconstrained, fit_dims, plan_at_caps, sized
from sharded_mde.plan.sharding import save_plan
from sharded_mde.plan.tables import full_table_configs, mean_bag_lengths
from sharded_mde.search.budget import BudgetController, column_worth, make_dims_file
from sharded_mde.search.ham import WEIGHT_DTYPE, build_supernet, controller_settings
from sharded_mde.search.ham_check import top_columns
from sharded_mde.search.report import save_search_result
from sharded_mde.train.distributed import DistEnv

PLAN_FILE = "sharding_plan.json"  # the final plan, next to dims.json (train.plan_file can load it)


class CapsController(BudgetController):
    """HAM's budget controller whose byte budget is re-derived from the plan of the kept dims.

    Args:
        gate (ColumnGate): the supernet's gate.
        tables (List[EmbeddingBagConfig]): the gate's tables, in order.
        plan (PlanConfig): the topology and its caps.
        every (int): steps between re-plans (during the pruning).
        bags (Optional[Mapping[str, float]]): the planner's pooling factors.
        **settings: `BudgetController`'s other arguments (dual_lr, warmup, prune, ...).

    Example::

        controller = CapsController(find_gate(model), tables, cfg.plan, 200, dual_lr=0.1)
        Trainer(..., callbacks=[controller])
    """

    def __init__(self, gate: ColumnGate, tables: List[EmbeddingBagConfig], plan: PlanConfig, every: int,
                 bags: Optional[Mapping[str, float]] = None, **settings: Any) -> None:
        self.plan, self.every, self.bags = plan, int(every), bags
        self.cap = rank_caps(plan)[cap_tier(plan)]
        dtype, optimizer = settings.get("weight_dtype", WEIGHT_DTYPE), settings.get("optimizer", "rowwise_adagrad")
        if plan_at_caps(sized(tables, {t.name: min(DIM_MULTIPLE, t.embedding_dim) for t in tables}), plan, bags) is None:
            raise InfeasibleBudget(f"search.budget caps: no plan fits {plan.world_size} ranks even with every table at "
                                   f"dim {DIM_MULTIPLE}: raise plan.{cap_key(plan)}")
        self.full_busiest = max(busiest_unconstrained(tables, plan, bags)[1])
        self.floor = floor_bytes(tables, dtype, optimizer)
        self.least = smallest_feasible_fraction(tables, dtype, optimizer)
        self.replans: List[Dict[str, float]] = []
        super().__init__(gate, tables, 1, **settings)  # the budget is set from the plan just below
        self.set_budget(self.full * self.cap / self.full_busiest)

    def set_budget(self, budget: float) -> None:
        """The byte budget (between every table at dim 4 and the full bytes) and its fraction (at least the feasible one)."""
        self.budget = int(min(self.full, max(self.floor, budget)))
        self.fraction = max(self.least, self.budget / self.full)

    def replan(self, step: int) -> None:
        """Plans the kept dims (kept counts rounded up to legal dims) and re-derives the budget from the busiest rank."""
        counts = self.gate.kept_counts().tolist()
        dims = {t.name: round_to_legal(max(int(k), 1), max_dim=t.embedding_dim) for t, k in zip(self.tables, counts)}
        kept = sum(table_bytes(t.num_embeddings, dims[t.name], self.weight_dtype, self.optimizer).total for t in self.tables)
        busiest = max(busiest_unconstrained(sized(self.tables, dims), self.plan, self.bags)[1])
        self.set_budget(kept * self.cap / busiest)
        self.replans.append({"step": step, "kept_bytes": kept, "busiest_bytes": busiest, "cap": self.cap,
                             "budget": self.budget})

    def on_step_end(self, trainer: Any, step: int) -> None:
        """Every `every` steps of the pruning: re-plan; then the controller's step."""
        if step % self.every == 0 and step / max(1, trainer.total_steps) >= self.warmup:
            self.replan(step)
        super().on_step_end(trainer, step)

    def state_dict(self) -> Dict[str, Any]:
        """The controller's state plus the derived budget and the re-plans (a resumed search continues exactly)."""
        return {**super().state_dict(), "budget": self.budget, "replans": list(self.replans)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores the controller, the derived budget and the re-plans."""
        super().load_state_dict(state)
        self.set_budget(state["budget"])
        self.replans = list(state["replans"])

    def trace(self) -> Dict[str, Any]:
        """The controller's trace with the caps and the re-plans."""
        return {**super().trace(), "caps": {"cap": self.cap, "full_busiest": self.full_busiest, "replans": self.replans}}


def mask_worth(values: Mapping[str, torch.Tensor], tables: List[EmbeddingBagConfig]) -> Dict[str, List[float]]:
    """Per table, the worth of its top k * 4 columns: mask values shifted by the smallest (as `kept_columns` prices them)."""
    low = min(float(v.min()) for v in values.values())
    return {t.name: column_worth(values[t.name].double() - low + 1e-9, dim_cap(t.num_embeddings, t.embedding_dim))
            for t in tables}


def run_ham_caps(cfg: RunConfig, env: DistEnv, stage: str = "ham", ranks: Optional[Dict[str, int]] = None) -> DimsFile:
    """HAM with the `plan` section's per-rank caps as the constraint; writes dims.json, trace.json and the final plan.

    Example::

        dims = run_ham_caps(cfg, env)  # cfg.search.budget == "caps"
        max(dims.caps.bytes) <= dims.caps.cap
    """
    from sharded_mde.data import DatasetMeta
    from sharded_mde.train.run import train_stage

    meta = DatasetMeta.load(cfg.data.dir)
    tables = full_table_configs(cfg)
    optimizer, s, bags = cfg.train.embedding_optimizer, cfg.search, mean_bag_lengths(cfg)
    torch.manual_seed(cfg.train.seed)  # the same supernet in every run (and on every rank)
    model = build_supernet(cfg, tables, meta.sparse_features, len(meta.dense_features))
    gate = find_gate(model)
    controller = CapsController(gate, tables, cfg.plan, s.caps_replan_every, bags, **controller_settings(cfg, env))
    search_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=s.epochs))
    t0 = time.perf_counter()
    trainer, metrics = train_stage(search_cfg, env, stage, model=model, tables=tables, callbacks=[controller])
    search_seconds = time.perf_counter() - t0
    values = gate.table_values()
    start = {n: len(c) for n, c in controller.kept_columns().items()}
    fit = fit_dims(tables, start, mask_worth(values, tables), cfg.plan, bags)
    fit.record.replans = controller.replans
    order = {n: torch.argsort(v.double(), descending=True, stable=True) for n, v in values.items()}
    out = Path(cfg.run_dir) / stage
    extra = {"search": {k: v for k, v in dataclasses.asdict(s).items() if k != "pme"},
             "supernet_test": metrics["test"], "search_seconds": search_seconds,
             "check_seconds": time.perf_counter() - t0 - search_seconds, "search_steps": metrics["steps"],
             "steered_dims": start, "column_order": "mask value a, largest first",
             "mask_values": {n: [round(float(x), 6) for x in v] for n, v in values.items()}}
    kept = top_columns(order, fit.dims)
    kept_bytes = sum(table_bytes(t.num_embeddings, fit.dims[t.name], WEIGHT_DTYPE, optimizer).total for t in tables)
    dims = make_dims_file("ham", tables, kept, kept_bytes / controller.full, WEIGHT_DTYPE, optimizer, extra,
                          supernet_checkpoints=str(out / "checkpoints"), caps=fit.record)
    dims.budget_bytes = kept_bytes  # the caps' budget: what the plan within them keeps
    if env.is_main:
        save_plan(out / PLAN_FILE, fit.planned[0])
        save_search_result(out, dims, controller.trace(), ranks)
    return dims
