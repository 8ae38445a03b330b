"""HAM search: train the hard-masked supernet under the budget controller, then select legal dims.

The supernet is the run's model with a `MaskedEmbeddingBagCollection` as its sparse arch, trained
by the ordinary trainer (DMP, fused table optimizer, Adam for dense parameters) for
`search.epochs`; `BudgetController` takes the mask step and steers lambda after every optimizer
step. The trained supernet is then checked on the validation split (`ham_check`): the loss
effect of each table's widths, harmless drops, and HAM's allocation against uniform and power-law
dims at the same budget; the best one leaves the search. The final checkpoint stays in
`<stage>/checkpoints` for retraining with a warm start.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from sharded_mde.config import RunConfig
from sharded_mde.modules.masked_ebc import MaskedEmbeddingBagCollection, find_gate
from sharded_mde.modules.model import RecTrain, build_model
from sharded_mde.dims import CandidateCheck, DimsFile, InfeasibleBudget, budget_bytes, check_feasible, dim_cap
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.budget import BudgetController, make_dims_file
from sharded_mde.search.ham_check import (Scorer, candidate_dims, check_candidates, gate_scorer, harmless_drops,
                                          interpolate, loss_curves, top_columns)
from sharded_mde.search.power_law import power_law_dims
from sharded_mde.search.retrain import train_compact, train_record
from sharded_mde.search.report import save_search_result
from sharded_mde.train.distributed import DistEnv

WEIGHT_DTYPE = "fp32"  # tables train in fp32


def build_supernet(cfg: RunConfig, tables: List, features: List[str], dense_in: int,
                   device: torch.device = torch.device("meta")) -> RecTrain:
    """The run's model over a MaskedEmbeddingBagCollection of the full tables (EBC on `device`)."""
    s = cfg.search
    masked = MaskedEmbeddingBagCollection(
        tables, device=device, surrogate=s.surrogate, mask_init=s.mask_init, ortho_weight=s.ortho_weight, ortho_rows=s.ortho_rows,
        ortho_every=s.ortho_every, weight_dtype=WEIGHT_DTYPE,
        optimizer=cfg.train.embedding_optimizer, uniform_price=s.uniform_price)
    return build_model(cfg.model, tables, features, dense_in, sparse_arch=masked, device=device)


def controller_settings(cfg: RunConfig, env: DistEnv) -> Dict[str, Any]:
    """The budget controller's keywords that every supernet search takes from the run config: the dual ascent,
    the pruning schedule, the mask's rate, the byte model and the global batch."""
    s = cfg.search
    return dict(dual_lr=s.dual_lr, weight_dtype=WEIGHT_DTYPE, optimizer=cfg.train.embedding_optimizer,
                warmup=s.warmup, prune=s.prune, lambda_init=s.lambda_init, tol=s.dual_tol, mask_lr=s.mask_lr,
                batch_size=cfg.train.batch_size * env.world_size)


def run_ham(cfg: RunConfig, env: DistEnv, stage: str = "ham", ranks: Optional[Dict[str, int]] = None) -> DimsFile:
    """Runs (or resumes) the HAM search in `<run_dir>/<stage>/` and writes its dims file, trace and PNG.

    Without `search.allow_drop` an infeasible budget fails before any training. After the
    supernet trains, its validation checks (`ham_check`) pick the dims: loss effect per byte, drops
    only where harmless, and the best of HAM's, uniform and power-law allocations at the budget.
    With `search.front` the supernet walks through those budgets instead (`ham_front`).
    """
    from sharded_mde.data import DatasetMeta
    from sharded_mde.train.run import train_stage

    if cfg.search.front:
        from sharded_mde.search.ham_front import run_ham_front

        return run_ham_front(cfg, env, stage, ranks)
    meta = DatasetMeta.load(cfg.data.dir)
    tables = full_table_configs(cfg)
    optimizer = cfg.train.embedding_optimizer
    s = cfg.search
    if not s.allow_drop:
        check_feasible(tables, s.budget, WEIGHT_DTYPE, optimizer, method="ham")
    torch.manual_seed(cfg.train.seed)  # the same supernet in every run (and on every rank)
    model = build_supernet(cfg, tables, meta.sparse_features, len(meta.dense_features))
    gate = find_gate(model)
    controller = BudgetController(gate, tables, budget_bytes(tables, s.budget, WEIGHT_DTYPE, optimizer),
                                  **controller_settings(cfg, env))
    search_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=cfg.search.epochs))
    t0 = time.perf_counter()
    trainer, metrics = train_stage(search_cfg, env, stage, model=model, tables=tables, callbacks=[controller])
    search_seconds = time.perf_counter() - t0
    values = gate.table_values()
    mask_score = gate_scorer(gate, lambda: trainer.evaluate("valid", max_batches=s.check_batches))
    kept, check, notes = validate_allocation(cfg, env, stage, tables, values, mask_score)
    out = Path(cfg.run_dir) / stage
    extra = {
        "search": {k: v for k, v in dataclasses.asdict(cfg.search).items() if k != "pme"},
        "supernet_test": metrics["test"],
        "search_seconds": search_seconds,
        "check_seconds": time.perf_counter() - t0 - search_seconds,
        "search_steps": metrics["steps"],
        "hard_mask_columns": {t.name: int((values[t.name] > 0).sum()) for t in tables},
        "mask_values": {n: [round(float(x), 6) for x in v] for n, v in values.items()},
        **notes,
    }
    dims = make_dims_file("ham", tables, kept, cfg.search.budget, WEIGHT_DTYPE, optimizer, extra,
                          supernet_checkpoints=str(out / "checkpoints"), check=check)
    if env.is_main:
        save_search_result(out, dims, controller.trace(), ranks)
    return dims


@dataclasses.dataclass
class Measured:
    """What the trained supernet's validation checks measured at one budget (before any candidate training)."""

    fraction: float
    order: Dict[str, torch.Tensor]  # each table's columns, largest mask value first
    candidates: Dict[str, Dict[str, int]]  # the allocations at the budget (`candidate_dims`)
    notes: Dict[str, Any]  # recorded in the dims file: column order, loss effect, drops


def measure_allocation(cfg: RunConfig, tables: List, values: Dict[str, torch.Tensor], mask_score: Scorer,
                       fraction: float) -> Measured:
    """Measures each table's loss effect per width with the supernet's masks, finds the harmless drops
    (`search.allow_drop`) and builds the candidate allocations at `fraction` (InfeasibleBudget below the floor)."""
    s = cfg.search
    optimizer = cfg.train.embedding_optimizer
    order = {n: torch.argsort(v.double(), descending=True, stable=True) for n, v in values.items()}
    caps = {t.name: dim_cap(t.num_embeddings, t.embedding_dim) for t in tables}
    base = {n: int((v > 0).sum()) for n, v in values.items()}
    curves = loss_curves(mask_score, tables, base, order, caps)
    worth = {n: interpolate({d: -m["logloss"] for d, m in c.items()}, caps[n]) for n, c in curves.items()}
    drops = harmless_drops(curves, s.drop_tolerance) if s.allow_drop else {}
    droppable = [n for n, d in drops.items() if d["harmless"]]
    try:
        rules = {t.name: t.dim for t in power_law_dims(tables, fraction, s.power_law_alpha, optimizer).tables}
    except InfeasibleBudget:  # below every field at dim 4: only HAM's harmless drops can meet it
        rules = {}
    candidates = candidate_dims(tables, fraction, values, worth, droppable, rules, WEIGHT_DTYPE, optimizer)
    notes = {"column_order": "mask value a, largest first",
             "loss_effect": {n: {str(d): m for d, m in c.items()} for n, c in curves.items()}, "drops": drops}
    return Measured(fraction, order, candidates, notes)


def check_allocation(cfg: RunConfig, env: DistEnv, stage: str, tables: List, m: Measured,
                     supernet_checkpoints: str) -> Tuple[Dict[str, List[int]], CandidateCheck, Dict[str, Any]]:
    """(kept columns, the candidate check, notes to record): trains every candidate of `m` as `retrain` would
    (in `<stage>/check_<name>/`) and returns the best on the validation split, all recorded."""
    s = cfg.search
    optimizer = cfg.train.embedding_optimizer
    check_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=s.check_epochs or cfg.train.epochs))

    def retrain_score(name: str, dims: Dict[str, int]) -> Dict[str, float]:

        cand = make_dims_file("ham", tables, top_columns(m.order, dims), m.fraction, WEIGHT_DTYPE, optimizer,
                              supernet_checkpoints=supernet_checkpoints)
        metrics, _ = train_compact(check_cfg, env, cand, f"{stage}/check_{name}")
        return metrics["valid"]  # the test split's scores are never read

    check = check_candidates(retrain_score, tables, m.candidates, WEIGHT_DTYPE, optimizer)
    check.rule = (f"best validation AUC of each candidate's compact model trained {check_cfg.train.epochs:g} "
                  "epoch(s) as retrain would")
    won = check.candidate(check.winner)
    check.winner_checkpoints = str(Path(cfg.run_dir) / stage / f"check_{won.same_as or won.name}" / "checkpoints")
    check.winner_trained_as = train_record(check_cfg)  # retrain reuses that training when it would train the same
    kept = top_columns(m.order, m.candidates[check.winner])
    return kept, check, {**m.notes, "dropped": [n for n, c in kept.items() if not c]}


def validate_allocation(cfg: RunConfig, env: DistEnv, stage: str, tables: List, values: Dict[str, torch.Tensor],
                        mask_score: Scorer) -> Tuple[Dict[str, List[int]], CandidateCheck, Dict[str, Any]]:
    """(kept columns, the candidate check, notes to record) from the trained supernet's validation checks (`ham_check`)
    at `search.budget`: `measure_allocation`, then `check_allocation` with the final supernet checkpoint."""
    m = measure_allocation(cfg, tables, values, mask_score, cfg.search.budget)
    return check_allocation(cfg, env, stage, tables, m, str(Path(cfg.run_dir) / stage / "checkpoints"))
