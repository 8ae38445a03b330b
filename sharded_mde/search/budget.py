"""The byte budget of a dimension search: the dual-ascent controller and the exact final selection.

During the search, `BudgetController` (a trainer callback) reads the hard mask after every step,
prices the kept columns with the project's byte model (weights plus optimizer state), and moves
the penalty weight lambda by dual ascent so that the kept bytes follow a gradual target from the
full bytes (after a warm-up) down to the budget B.
At the end, `select_dims` meets the budget with legal dims: every table starts at the smallest
legal dim (or 0 where a drop was shown harmless), then `select_widths` adds the moves with the
most worth per byte while one that gains still fits, never past a table's row cap, so the kept
bytes never exceed B and no further step with worth fits. `full_bytes` and `budget_bytes` live in plan/dims.py
with the feasibility rule every field-wise method shares.
"""

from __future__ import annotations

import math
from typing import Any, Collection, Dict, List, Mapping, Optional, Sequence

import torch
from torchrec import EmbeddingBagConfig

from sharded_mde.modules.masked_ebc import ColumnGate
from sharded_mde.plan.dims import (DIM_MULTIPLE, DimsFile, InfeasibleBudget, TableDims, budget_bytes, check_feasible,
                                  dim_cap, full_bytes, table_bytes)


def make_dims_file(method: str, tables: Sequence[EmbeddingBagConfig], kept: Mapping[str, Sequence[int]],
                   fraction: float, weight_dtype: str = "fp32", optimizer: str = "rowwise_adagrad",
                   extra: Optional[Dict[str, Any]] = None) -> DimsFile:
    """A dims file for kept column indices per table (absent or empty = dropped)."""
    entries = []
    for t in tables:
        cols = sorted(int(c) for c in kept.get(t.name, []))
        entries.append(TableDims(name=t.name, features=list(t.feature_names), num_embeddings=t.num_embeddings,
                                 full_dim=t.embedding_dim, dim=len(cols), kept_columns=cols,
                                 bytes=table_bytes(t.num_embeddings, len(cols), weight_dtype, optimizer).total))
    return DimsFile(method=method, budget_fraction=fraction,
                    budget_bytes=budget_bytes(tables, fraction, weight_dtype, optimizer),
                    full_bytes=full_bytes(tables, weight_dtype, optimizer), kept_bytes=sum(e.bytes for e in entries),
                    tables=entries, weight_dtype=weight_dtype, optimizer=optimizer, extra=dict(extra or {}))


def column_worth(values: torch.Tensor, cap: int, multiple: int = DIM_MULTIPLE) -> List[float]:
    """Worth of keeping the top d = 0, multiple, ..., cap columns of a table by per-column values:
    the sum of their values clamped at 0 (a column with a negative value, e.g. pruned by the mask,
    is worth nothing: never bought past the floor, and never a reason to rank a cheap table last)."""
    top = torch.sort(values.double().clamp_min(0), descending=True, stable=True).values
    csum = torch.cat([torch.zeros(1, dtype=torch.float64), top.cumsum(0)])
    return [float(csum[d]) for d in range(0, cap + 1, multiple)]


def select_widths(worth: Mapping[str, Sequence[float]], tables: Sequence[EmbeddingBagConfig], budget: int,
                  floors: Mapping[str, int], caps: Mapping[str, int], weight_dtype: str = "fp32",
                  optimizer: str = "rowwise_adagrad", multiple: int = DIM_MULTIPLE) -> Dict[str, int]:
    """Legal dims from `floors` up to `caps` that fill `budget` by worth gained per byte.

    `worth[t][k]` is what table t is worth at dim k * multiple (e.g. minus the validation loss).
    Each round takes, over every table and every larger legal dim that still fits, the move with
    the most worth gained per byte (ties go to the cheaper move), so a table whose worth only rises
    after several steps is not starved. Moves that gain nothing are not bought: bytes without
    evidence of worth stay unspent (HAM's candidate check also trains allocations that spend
    them: uniform filled, power law). It stops when no move that gains fits.
    """

    def size(t: EmbeddingBagConfig, d: int) -> int:
        return table_bytes(t.num_embeddings, d, weight_dtype, optimizer).total

    dims = {t.name: int(floors[t.name]) for t in tables}
    total = sum(size(t, dims[t.name]) for t in tables)
    if total > budget:
        raise InfeasibleBudget(f"select_widths: the floors need {total:,} B, over the budget of {budget:,} B")
    while True:
        best = None
        for i, t in enumerate(tables):
            d, w = dims[t.name], worth[t.name]
            for d2 in range(d + multiple, caps[t.name] + 1, multiple):
                cost = size(t, d2) - size(t, d)
                if total + cost > budget:
                    break  # larger dims cost more still
                gain = float(w[d2 // multiple]) - float(w[d // multiple])
                if gain <= 0:
                    continue
                key = (gain / cost, -cost, -i)
                if best is None or key > best[0]:
                    best = (key, t, d2, cost)
        if best is None:
            return dims
        _, t, d2, cost = best
        dims[t.name] = d2
        total += cost


def select_dims(values: Mapping[str, torch.Tensor], tables: Sequence[EmbeddingBagConfig], fraction: float,
                droppable: Collection[str] = (), weight_dtype: str = "fp32", optimizer: str = "rowwise_adagrad",
                multiple: int = DIM_MULTIPLE, worth: Optional[Mapping[str, Sequence[float]]] = None,
                used_rows: Optional[Mapping[str, int]] = None) -> Dict[str, List[int]]:
    """Kept columns per table: legal dims that fit the budget, the largest `values` of each table first.

    Every table keeps at least `multiple` columns except those in `droppable` (the one
    feasibility rule, `check_feasible`: InfeasibleBudget names the smallest feasible budget) and at
    most `dim_cap` of its used rows (`used_rows`, default its rows). The dims come from
    `select_widths` on `worth` (per table, indexed by dim / multiple; default `column_worth` of
    the values).
    """
    check_feasible(tables, fraction, weight_dtype, optimizer, dropped=droppable)
    budget = budget_bytes(tables, fraction, weight_dtype, optimizer)
    rows = {t.name: int((used_rows or {}).get(t.name, t.num_embeddings)) for t in tables}
    caps = {t.name: dim_cap(rows[t.name], t.embedding_dim, multiple) for t in tables}
    floors = {t.name: 0 if t.name in droppable else multiple for t in tables}
    if worth is None:
        worth = {t.name: column_worth(values[t.name], caps[t.name], multiple) for t in tables}
    dims = select_widths(worth, tables, budget, floors, caps, weight_dtype, optimizer, multiple)
    order = {t.name: torch.argsort(values[t.name].double(), descending=True, stable=True) for t in tables}
    return {t.name: sorted(order[t.name][:dims[t.name]].tolist()) for t in tables}


def target_bytes(progress: float, full: int, budget: int, warmup: float, prune: float) -> float:
    """The kept-bytes target at `progress` (0..1) of the search: full until `warmup`, then a cubic
    decline to the budget over the next `prune` fraction, then the budget (gradual pruning)."""
    if progress < warmup:
        return float(full)
    x = min(1.0, (progress - warmup) / prune) if prune > 0 else 1.0
    return budget + (full - budget) * (1.0 - x) ** 3


class BudgetController:
    """Trainer callback: the HAM mask step after every update, with lambda steered to the budget.

    After each optimizer step it takes the mask gradient (averaged over ranks), moves lambda by a
    dual ascent on log(lambda) with a bounded rate, lambda <- lambda * exp(dual_lr * clip((kept -
    target) / (tol * full), -1, 1)), and applies `ColumnGate.update`. The log-space step changes
    lambda by at most a factor exp(dual_lr) per step, so the lag of the masks (mask_init / mask_lr
    steps to cross zero) cannot make it overshoot by orders of magnitude. During warm-up lambda is 0
    and the mask does not move (the supernet's embeddings first become useful: a random column is
    noise, which the mask would learn to cut); lambda starts at `lambda_init` after it.
    """

    def __init__(self, gate: ColumnGate, tables: Sequence[EmbeddingBagConfig], budget: int, dual_lr: float,
                 weight_dtype: str = "fp32", optimizer: str = "rowwise_adagrad", warmup: float = 0.2,
                 prune: float = 0.5, lambda_init: float = 0.1, tol: float = 0.02, mask_lr: float = 0.005,
                 batch_size: int = 1) -> None:
        if [t.name for t in tables] != gate.table_names:
            raise ValueError("BudgetController: tables must be the gate's tables, in the same order")
        self.gate = gate
        self.tables = list(tables)
        self.budget = int(budget)
        self.full = full_bytes(tables, weight_dtype, optimizer)
        self.dual_lr = float(dual_lr)
        self.weight_dtype = weight_dtype
        self.optimizer = optimizer
        self.warmup, self.prune, self.lambda_init, self.tol = float(warmup), float(prune), float(lambda_init), float(tol)
        self.mask_lr = float(mask_lr)
        self.batch_size = int(batch_size)  # global rows per step (the Fisher estimate's scale)
        self.lam = 0.0
        self.steps: List[Dict[str, float]] = []  # per step: step, kept_bytes, target, lambda
        self.evals: List[Dict[str, float]] = []  # per evaluation: kept bytes, lambda and validation metrics

    def kept_bytes(self) -> int:
        """Bytes of the tables at the gate's current kept-column counts (byte model of the dims file)."""
        counts = self.gate.kept_counts().tolist()
        return sum(table_bytes(t.num_embeddings, k, self.weight_dtype, self.optimizer).total
                   for t, k in zip(self.tables, counts))

    def on_step_end(self, trainer: Any, step: int) -> None:
        """After each optimizer step: update lambda from the kept bytes, then take one HAM step on the mask."""
        grad = self.gate.reduce_grad()
        kept = self.kept_bytes()
        progress = step / max(1, trainer.total_steps)
        target = target_bytes(progress, self.full, self.budget, self.warmup, self.prune)
        pruning = progress >= self.warmup
        if pruning:
            err = max(-1.0, min(1.0, (kept - target) / (self.tol * self.full)))
            start = self.lam if self.lam > 0 else self.lambda_init
            self.lam = max(1e-12, start * math.exp(self.dual_lr * err))
        self.gate.update(grad, self.lam, self.mask_lr, self.batch_size, move=pruning)
        self.steps.append({"step": step, "kept_bytes": kept, "target": round(target), "lambda": self.lam})

    def on_eval(self, trainer: Any, step: int, metrics: Dict[str, float]) -> None:
        """Records kept bytes, lambda and the validation metrics of this evaluation."""
        self.evals.append({"step": step, "kept_bytes": self.kept_bytes(), "lambda": self.lam,
                           "auc": metrics.get("auc"), "logloss": metrics.get("logloss")})

    def state_dict(self) -> Dict[str, Any]:
        """lambda and the trace (checkpointed with the run, so a resumed search continues exactly)."""
        return {"lam": self.lam, "steps": list(self.steps), "evals": list(self.evals)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores lambda and the trace (the mask and its statistics come back with the model state)."""
        self.lam = float(state["lam"])
        self.steps = list(state["steps"])
        self.evals = list(state["evals"])

    def trace(self) -> Dict[str, Any]:
        """The search trace as written to trace.json."""
        return {"budget_bytes": self.budget, "full_bytes": self.full, "dual_lr": self.dual_lr, "warmup": self.warmup,
                "prune": self.prune, "lambda_init": self.lambda_init, "tol": self.tol, "steps": self.steps,
                "evals": self.evals}
