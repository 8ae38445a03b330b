"""The byte budget of a dimension search: the dual-ascent controller and the exact final selection.

During the search, `BudgetController` (a trainer callback) reads the hard mask after every step,
prices the kept columns with the project's byte model (weights plus optimizer state), and moves
the penalty weight lambda by dual ascent so that the kept bytes follow a gradual target from the
full bytes (after a warm-up) down to the budget B.
At the end, `select_dims` meets the budget exactly with legal dims: it floors every table's kept
count to a multiple of 4, removes 4-column steps with the least mask value per byte while over
the budget, then adds the steps with the most value per byte while one still fits, so the kept
bytes never exceed B and are within one legal step of it.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torchrec import EmbeddingBagConfig

from sharded_mde.modules.masked_ebc import ColumnGate
from sharded_mde.plan.dims import DIM_MULTIPLE, DimsFile, InfeasibleBudget, TableDims, table_bytes


def full_bytes(tables: Sequence[EmbeddingBagConfig], weight_dtype: str = "fp32", optimizer: str = "rowwise_adagrad") -> int:
    """Bytes of every table at its full dim (the 100% of a budget fraction)."""
    return sum(table_bytes(t.num_embeddings, t.embedding_dim, weight_dtype, optimizer).total for t in tables)


def budget_bytes(tables: Sequence[EmbeddingBagConfig], fraction: float, weight_dtype: str = "fp32",
                 optimizer: str = "rowwise_adagrad") -> int:
    """The byte budget B: `fraction` of the full tables' bytes, rounded down."""
    return int(math.floor(fraction * full_bytes(tables, weight_dtype, optimizer)))


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


def select_dims(values: Mapping[str, torch.Tensor], tables: Sequence[EmbeddingBagConfig], fraction: float,
                allow_drop: bool = True, weight_dtype: str = "fp32", optimizer: str = "rowwise_adagrad",
                multiple: int = DIM_MULTIPLE) -> Dict[str, List[int]]:
    """Kept columns per table: legal dims (multiples of `multiple`, or 0 if `allow_drop`) whose bytes fit the budget.

    Columns are taken in order of their mask value a (largest first); the greedy steps rank
    `multiple` columns of a table by the sum of their values over the bytes they cost.
    """
    budget = budget_bytes(tables, fraction, weight_dtype, optimizer)
    order = {t.name: torch.argsort(values[t.name].double(), descending=True, stable=True) for t in tables}
    sorted_vals = {t.name: values[t.name].double()[order[t.name]] for t in tables}
    low = 0 if allow_drop else multiple
    dims = {t.name: max(low, int((values[t.name] > 0).sum()) // multiple * multiple) for t in tables}

    def size(t: EmbeddingBagConfig, d: int) -> int:
        return table_bytes(t.num_embeddings, d, weight_dtype, optimizer).total

    total = sum(size(t, dims[t.name]) for t in tables)
    while total > budget:  # remove the step worth least per byte freed
        best = None
        for i, t in enumerate(tables):
            d = dims[t.name]
            if d - multiple < low:
                continue
            freed = size(t, d) - size(t, d - multiple)
            score = (float(sorted_vals[t.name][d - multiple:d].sum()) / freed, i)
            best = min(best, (score, t, freed)) if best else (score, t, freed)
        if best is None:
            raise InfeasibleBudget(f"budget of {budget:,} bytes ({fraction:.1%}) is below {total:,} bytes, the cost of "
                             f"{low} columns per table; raise search.budget or set search.allow_drop: true")
        _, t, freed = best
        dims[t.name] -= multiple
        total -= freed
    while True:  # add the step worth most per byte that still fits
        best = None
        for i, t in enumerate(tables):
            d = dims[t.name]
            if d + multiple > t.embedding_dim:
                continue
            cost = size(t, d + multiple) - size(t, d)
            if total + cost > budget:
                continue
            score = (float(sorted_vals[t.name][d:d + multiple].sum()) / cost, -i)
            best = max(best, (score, t, cost)) if best else (score, t, cost)
        if best is None:
            break
        _, t, cost = best
        dims[t.name] += multiple
        total += cost
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
