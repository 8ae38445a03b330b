"""HAM's front from one run: one supernet walks the budget down through `search.front`, a dims file at each point.

The budget controller's target walks from the full bytes through the front's budgets (`walk_target`:
after the warm-up one equal segment per budget, a cubic decline to it, then a hold). A point is
taken in its segment's hold at the first step where the kept bytes sit on its budget from above
(within `search.dual_tol` of the full bytes), at the segment's last step at the latest
(`BudgetedSearch.due_point`), from the supernet as it is then, exactly as a single search takes its
budget at the end: the loss effect per width, the harmless drops, the candidate allocations at that
budget with the feasibility rule and the selection fill (`measure_allocation`), and a cheap preview:
the supernet's validation AUC with the chosen columns kept. After the supernet's last step, each
point's dims file is written to `<stage>/front/b<budget>/dims.json`: HAM's own allocation (the `ham`
candidate, untrained: the default `search.front_check: []`), or the winner of HAM's candidate check at
that point over the candidates `search.front_check` names (trained as a single search's check trains
them, in `front/b<budget>/check_<name>/`). A budget below the smallest feasible one
(`check_feasible`) is not walked and is recorded as infeasible with its reason; the stage's `dims.json` is the point at `search.budget` (the front's
last), and when that budget is infeasible the front is written first and then the search fails as a
single search would. The points retrain from scratch (no supernet checkpoint is kept per point).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from sharded_mde.config import RunConfig
from sharded_mde.dims import DimsFile, InfeasibleBudget, budget_bytes, check_feasible
from sharded_mde.io import atomic_write_json
from sharded_mde.modules.masked_ebc import find_gate
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.budget import BudgetController, make_dims_file
from sharded_mde.search.ham import (WEIGHT_DTYPE, Measured, build_supernet, check_allocation, controller_settings,
                                    measure_allocation)
from sharded_mde.search.ham_check import gate_scorer, top_columns
from sharded_mde.search.report import save_search_result
from sharded_mde.train.distributed import DistEnv

FRONT_FILE = "front.json"


def point_dir(run_dir: str | Path, stage: str, fraction: float) -> Path:
    """The directory of the front's point at `fraction`: `<run_dir>/<stage>/front/b<fraction>/`."""
    return Path(run_dir) / stage / "front" / f"b{fraction:g}"


def split_feasible(cfg: RunConfig, tables: List) -> Tuple[List[float], Dict[float, str]]:
    """(the front's budgets to walk, {budget: why not feasible}): without `search.allow_drop` a budget below
    every field at dim 4 is not walked (with drops the floor is known only at the point itself)."""
    walk, infeasible = [], {}
    for b in cfg.search.front:
        try:
            if not cfg.search.allow_drop:
                check_feasible(tables, b, WEIGHT_DTYPE, cfg.train.embedding_optimizer, method="ham")
            walk.append(b)
        except InfeasibleBudget as e:
            infeasible[b] = str(e)
    return walk, infeasible


def run_ham_front(cfg: RunConfig, env: DistEnv, stage: str = "ham",
                  ranks: Optional[Dict[str, int]] = None) -> DimsFile:
    """Runs (or resumes) the front search in `<run_dir>/<stage>/`: one dims file per feasible budget of
    `search.front`, `front.json` listing every point, and the stage's dims file at `search.budget`."""
    from sharded_mde.data import DatasetMeta
    from sharded_mde.train.run import train_stage

    meta = DatasetMeta.load(cfg.data.dir)
    tables = full_table_configs(cfg)
    optimizer = cfg.train.embedding_optimizer
    s = cfg.search
    walk, infeasible = split_feasible(cfg, tables)
    if not walk:  # nothing to walk: the front is every budget's reason
        _write_front(cfg, env, stage, {"budgets": list(s.front), "front_check": s.front_check, "steps": 0,
                                       "points": [{"budget": b, "feasible": False, "reason": why}
                                                  for b, why in infeasible.items()]})
        raise InfeasibleBudget(infeasible[s.budget])
    torch.manual_seed(cfg.train.seed)  # the same supernet as a single search's (and on every rank)
    model = build_supernet(cfg, tables, meta.sparse_features, len(meta.dense_features))
    gate = find_gate(model)

    def on_point(trainer: Any, i: int) -> Dict[str, Any]:
        """The point of budget walk[i], taken where the walk holds it (kept in the controller's checkpointed state)."""
        values = {n: v.detach().clone() for n, v in gate.table_values().items()}
        score = gate_scorer(gate, lambda: trainer.evaluate("valid", max_batches=s.check_batches))
        rec: Dict[str, Any] = {"budget": walk[i], "step": trainer.step, "mask_kept_bytes": controller.kept_bytes(),
                               "values": {n: v.tolist() for n, v in values.items()}}
        try:
            m = measure_allocation(cfg, tables, values, score, walk[i])
        except InfeasibleBudget as e:  # with harmless drops: the floor of the fields that must stay
            return {**rec, "infeasible": str(e)}
        rec.update(candidates=m.candidates, notes=m.notes, preview_valid=score(top_columns(m.order, m.candidates["ham"])))
        return rec

    controller = BudgetController(gate, tables, budget_bytes(tables, walk[-1], WEIGHT_DTYPE, optimizer),
                                  **controller_settings(cfg, env),
                                  walk=[budget_bytes(tables, b, WEIGHT_DTYPE, optimizer) for b in walk],
                                  on_point=on_point)
    search_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=s.epochs))
    t0 = time.perf_counter()
    trainer, metrics = train_stage(search_cfg, env, stage, model=model, tables=tables, callbacks=[controller])
    search_seconds = time.perf_counter() - t0
    points, last = [], None
    for i, fraction in enumerate(walk):
        dims = _point_dims(cfg, env, stage, tables, controller.points[i], metrics, search_seconds)
        if isinstance(dims, str):
            infeasible[fraction] = dims
            continue
        path = point_dir(cfg.run_dir, stage, fraction)
        if env.is_main:
            save_search_result(path, dims, None, ranks)
        points.append({"budget": fraction, "feasible": True, "dims_file": str(path / "dims.json"),
                       "kept_bytes": dims.kept_bytes, "budget_bytes": dims.budget_bytes, "full_bytes": dims.full_bytes,
                       "kept_fraction": dims.kept_bytes / dims.full_bytes, "step": controller.points[i]["step"],
                       "preview_valid": controller.points[i]["preview_valid"],
                       "check_winner": dims.check.winner if dims.check else None})
        last = dims if fraction == s.budget else last
    points += [{"budget": b, "feasible": False, "reason": why} for b, why in infeasible.items()]
    doc = {"budgets": list(s.front), "front_check": s.front_check, "steps": metrics["steps"],
           "search_seconds": search_seconds, "check_seconds": time.perf_counter() - t0 - search_seconds,
           "points": sorted(points, key=lambda p: -p["budget"])}
    if env.is_main:
        atomic_write_json(Path(cfg.run_dir) / stage / "trace.json", controller.trace())
    _write_front(cfg, env, stage, doc)
    if last is None:  # search.budget (the front's last) is not feasible: the front stays written
        raise InfeasibleBudget(f"{infeasible[s.budget]} (the front's feasible points: "
                               f"{Path(cfg.run_dir) / stage / FRONT_FILE})")
    if env.is_main:
        save_search_result(Path(cfg.run_dir) / stage, last, controller.trace(), ranks)
    return last


def _write_front(cfg: RunConfig, env: DistEnv, stage: str, doc: Dict[str, Any]) -> None:
    """Writes `<stage>/front.json` (rank 0) before any rank goes on to read it."""
    if env.is_main:
        atomic_write_json(Path(cfg.run_dir) / stage / FRONT_FILE, doc)
    if dist.is_initialized():
        dist.barrier()


def _point_dims(cfg: RunConfig, env: DistEnv, stage: str, tables: List, p: Dict[str, Any],
                metrics: Dict[str, Any], search_seconds: float) -> DimsFile | str:
    """The dims file of one taken point (or why it is not feasible): the winner of the candidates
    `search.front_check` names, trained in the point's directory, or HAM's own allocation without them."""
    if "infeasible" in p:
        return p["infeasible"]
    s = cfg.search
    optimizer = cfg.train.embedding_optimizer
    values = {n: torch.tensor(v) for n, v in p["values"].items()}
    m = Measured(p["budget"], {n: torch.argsort(v.double(), descending=True, stable=True) for n, v in values.items()},
                 p["candidates"], p["notes"])
    where = point_dir(cfg.run_dir, stage, p["budget"])
    check = None
    if s.front_check:  # no supernet checkpoint is named: a front's points retrain from scratch
        m = dataclasses.replace(m, candidates={c: d for c, d in m.candidates.items() if c in s.front_check})
        kept, check, notes = check_allocation(cfg, env, str(where.relative_to(cfg.run_dir)), tables, m, "")
    else:
        kept = top_columns(m.order, m.candidates["ham"])
        notes = {**m.notes, "dropped": [n for n, c in kept.items() if not c]}
    extra = {
        "search": {k: v for k, v in dataclasses.asdict(s).items() if k != "pme"},
        "front": {"step": p["step"], "mask_kept_bytes": p["mask_kept_bytes"], "preview_valid": p["preview_valid"],
                  "front_search_seconds": search_seconds},
        "supernet_test": metrics["test"],
        "search_seconds": search_seconds,
        "search_steps": metrics["steps"],
        "hard_mask_columns": {n: int((v > 0).sum()) for n, v in values.items()},
        "mask_values": {n: [round(float(x), 6) for x in v] for n, v in values.items()},
        **notes,
    }
    return make_dims_file("ham", tables, kept, p["budget"], WEIGHT_DTYPE, optimizer, extra, check=check)
