"""The byte budget of a dimension search: the dual-ascent controller and the exact final selection.

During the search, `BudgetedSearch` (a hook the user's own loop calls once per training step;
`BudgetController` adapts it to this project's trainer, so both run one budget path) reads the
hard mask after every step, prices the kept columns with the project's byte model (weights plus
optimizer state), and moves the penalty weight lambda by dual ascent so that the kept bytes
follow a gradual target from the full bytes (after a warm-up) down to the budget B, or down through
the budgets of a front, holding each in turn (`walk_target`, docs/ham.md).
At the end, `select_dims` meets the budget with legal dims: every table starts at the smallest
legal dim (or 0 where a drop was shown harmless), then `select_widths` adds the moves with the
most worth per byte while one that gains still fits, never past a table's row cap, so the kept
bytes never exceed B and no further step with worth fits. `full_bytes` and `budget_bytes` live in dims/
with the feasibility rule every field-wise method shares.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Collection, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchrec import EmbeddingBagConfig

from sharded_mde.modules.masked_ebc import ColumnGate, MaskedEmbeddingBagCollection, find_gate
from sharded_mde.dims import (DIM_MULTIPLE, DimsFile, InfeasibleBudget, TableDims, budget_bytes, check_feasible,
                                  dim_cap, full_bytes, table_bytes)
from sharded_mde.plan.tables import plan_tables


def make_dims_file(method: str, tables: Sequence[EmbeddingBagConfig], kept: Mapping[str, Sequence[int]],
                   fraction: float, weight_dtype: str = "fp32", optimizer: str = "rowwise_adagrad",
                   extra: Optional[Dict[str, Any]] = None, **records: Any) -> DimsFile:
    """A dims file for kept column indices per table (absent or empty = dropped); `records` are
    DimsFile's typed fields (supernet_checkpoints, rule, check, ...)."""
    entries = []
    for t in tables:
        cols = sorted(int(c) for c in kept.get(t.name, []))
        entries.append(TableDims(name=t.name, features=list(t.feature_names), num_embeddings=t.num_embeddings,
                                 full_dim=t.embedding_dim, dim=len(cols), kept_columns=cols,
                                 bytes=table_bytes(t.num_embeddings, len(cols), weight_dtype, optimizer).total))
    return DimsFile(method=method, budget_fraction=fraction,
                    budget_bytes=budget_bytes(tables, fraction, weight_dtype, optimizer),
                    full_bytes=full_bytes(tables, weight_dtype, optimizer), kept_bytes=sum(e.bytes for e in entries),
                    tables=entries, weight_dtype=weight_dtype, optimizer=optimizer, extra=dict(extra or {}),
                    **records)


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
                used_rows: Optional[Mapping[str, int]] = None, budget: Optional[int] = None) -> Dict[str, List[int]]:
    """Kept columns per table: legal dims that fit the budget, the largest `values` of each table first.

    Every table keeps at least `multiple` columns except those in `droppable` (the one
    feasibility rule, `check_feasible`: InfeasibleBudget names the smallest feasible budget) and at
    most `dim_cap` of its used rows (`used_rows`, default its rows). The dims come from
    `select_widths` on `worth` (per table, indexed by dim / multiple; default `column_worth` of
    the values). `budget` (bytes) overrides the fraction's budget where the user gave bytes.
    """
    check_feasible(tables, fraction, weight_dtype, optimizer, dropped=droppable)
    if budget is None:
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


def walk_target(progress: float, full: int, walk: Sequence[int], warmup: float, prune: float) -> float:
    """The kept-bytes target of a search that walks down through the budgets `walk` (bytes, decreasing):
    after `warmup`, the rest of the search is split into one equal segment per budget; each declines
    (cubically, over its share `prune / len(walk)`) from the previous budget (the full bytes for the
    first) to its own and holds it to the segment's end (its point is taken in that hold:
    `BudgetedSearch.due_point`). One budget is `target_bytes` itself."""
    if progress < warmup:
        return float(full)
    seg = (1.0 - warmup) / len(walk)
    i = min(len(walk) - 1, int((progress - warmup) / seg)) if seg > 0 else len(walk) - 1
    start = full if i == 0 else walk[i - 1]
    return target_bytes(progress - i * seg, start, walk[i], warmup, prune / len(walk))


def walk_steps(total_steps: int, points: int, warmup: float) -> List[int]:
    """The steps that end the segments of a walk through `points` budgets (`walk_target`); the last is
    `total_steps`."""
    seg = (1.0 - warmup) / points
    return [max(1, min(total_steps, round(total_steps * (warmup + (i + 1) * seg)))) for i in range(points - 1)] + [
        total_steps]


def masked_tables(module: nn.Module) -> List[EmbeddingBagConfig]:
    """The full table configs of the `MaskedEmbeddingBagCollection` inside a (possibly DMP-wrapped) model."""
    for m in module.modules():
        if isinstance(m, MaskedEmbeddingBagCollection):
            return m.embedding_bag_configs()
    raise ValueError("the model has no MaskedEmbeddingBagCollection: pass `tables`")


class BudgetedSearch:
    """The budgeted HAM search as a hook: call `step()` once per training step, after `optimizer.step()`.

    After each step it takes the mask gradient (averaged over ranks), moves lambda by a dual ascent
    on log(lambda) with a bounded rate, lambda <- lambda * exp(dual_lr * clip((kept - target) /
    (tol * full), -1, 1)), and applies `ColumnGate.update`. The kept-bytes target declines from the
    full bytes (after `warmup`) to the budget over `prune` of `total_steps` (`target_bytes`). The
    log-space step changes lambda by at most a factor exp(dual_lr) per step, so the lag of the masks
    (mask_init / mask_lr steps to cross zero) cannot make it overshoot by orders of magnitude. During
    warm-up lambda is 0 and the mask does not move (the embeddings first become useful: a random
    column is noise, which the mask would learn to cut); lambda starts at `lambda_init` after it.
    Kept bytes are priced with the dims file's byte model: weights plus optimizer state.

    At the end `dims_file()` turns the masks into legal dims (multiples of 4) whose bytes fit the
    budget and leave less than one 4-column step of any table unspent, and `compact_tables()`
    gives the mixed-dim `EmbeddingBagConfig`s. It works the same on a plain module, under
    `DistributedModelParallel` and under `TrainPipelineSparseDist`: the mask is a replicated buffer
    and its gradient is all-reduced, so every rank takes the same step.

    Args:
        model (nn.Module): a model holding a `MaskedEmbeddingBagCollection` (or its `ColumnGate`),
            plain or DMP-wrapped.
        budget (Union[float, int]): a fraction (0, 1] of the full tables' bytes, or bytes (an int > 1).
        total_steps (int): the training steps the search runs (the target schedule's length).
        batch_size (int): global examples per step (the Fisher estimate's scale).
        tables (Optional[Sequence[EmbeddingBagConfig]]): the masked tables, default those of the
            model's `MaskedEmbeddingBagCollection`.
        dual_lr, tol, lambda_init, warmup, prune, mask_lr: the search settings (defaults: `SearchConfig`'s;
            tol is its `dual_tol`).
        weight_dtype (str): "fp32" or "fp16" (byte model).
        optimizer (str): the table optimizer whose state is priced (byte model).
        walk (Sequence[Union[float, int]]): a front (docs/ham.md): decreasing budgets ending at `budget`,
            each reached and held in turn (`walk_target`); after each step `due_point()` names the point
            to take now, if any (take it, e.g. `select_dims` at its budget, and record it in `points`).

    Example::

        masked = MaskedEmbeddingBagCollection(tables)
        model = DLRM(embedding_bag_collection=masked, dense_in_features=4,
                     dense_arch_layer_sizes=[16, 16], over_arch_layer_sizes=[16, 1])
        search = BudgetedSearch(model, budget=0.5, total_steps=100, batch_size=64)
        for batch in batches:
            loss = loss_fn(model(batch.dense_features, batch.sparse_features).squeeze(-1), batch.labels)
            opt.zero_grad(); loss.backward(); opt.step()
            search.step()
        dims = search.dims_file()  # kept bytes <= budget
        compact = search.compact_tables()
    """

    def __init__(self, model: nn.Module, budget: Union[float, int], total_steps: int, batch_size: int = 1,
                 tables: Optional[Sequence[EmbeddingBagConfig]] = None, dual_lr: float = 0.1, tol: float = 0.02,
                 lambda_init: float = 0.1, warmup: float = 0.3, prune: float = 0.5, mask_lr: float = 0.005,
                 weight_dtype: str = "fp32", optimizer: str = "rowwise_adagrad",
                 walk: Sequence[Union[float, int]] = ()) -> None:
        self.gate = find_gate(model)
        self.tables = list(tables) if tables is not None else masked_tables(model)
        if [t.name for t in self.tables] != self.gate.table_names:
            raise ValueError("BudgetedSearch: tables must be the gate's tables, in the same order")
        self.weight_dtype, self.optimizer = weight_dtype, optimizer
        self.full = full_bytes(self.tables, weight_dtype, optimizer)
        self.budget, self.fraction = self._bytes(budget)
        self.walk = [self._bytes(b)[0] for b in walk] or [self.budget]
        if self.walk[-1] != self.budget or any(a <= b for a, b in zip(self.walk, self.walk[1:])):
            raise ValueError(f"BudgetedSearch: walk must decrease to the budget {self.budget:,} B, got {list(walk)}")
        if total_steps <= 0:
            raise ValueError(f"BudgetedSearch: total_steps must be positive, got {total_steps}")
        self.total_steps = int(total_steps)
        self.batch_size = int(batch_size)
        self.dual_lr, self.tol, self.lambda_init = float(dual_lr), float(tol), float(lambda_init)
        self.warmup, self.prune, self.mask_lr = float(warmup), float(prune), float(mask_lr)
        self.lam = 0.0
        self.step_count = 0
        self.steps: List[Dict[str, float]] = []  # per step: step, kept_bytes, target, lambda
        self.evals: List[Dict[str, float]] = []  # per evaluation: kept bytes, lambda and validation metrics
        self.points: Dict[int, Any] = {}  # the walk's points taken so far (by index), whatever the caller records

    def _bytes(self, budget: Union[float, int]) -> Tuple[int, float]:
        """(bytes, fraction) of a budget given as a fraction in (0, 1] or as bytes (an int > 1)."""
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0 or (
                isinstance(budget, float) and budget > 1):
            raise ValueError(f"BudgetedSearch: budget must be a fraction in (0, 1] or bytes (int > 1), got {budget!r}")
        if isinstance(budget, float) or budget == 1:
            return budget_bytes(self.tables, float(budget), self.weight_dtype, self.optimizer), float(budget)
        return int(budget), int(budget) / self.full

    def point_steps(self) -> List[int]:
        """The last step of each budget's segment of the walk (`walk_steps`; one budget: the last step)."""
        return walk_steps(self.total_steps, len(self.walk), self.warmup)

    def due_point(self) -> Optional[int]:
        """The walk's point to take after the step just taken, or None (None without a walk).

        Point i is due in its segment's hold (the target at its budget) at the first step where the kept
        bytes sit on the budget from above, within `tol` of the full bytes (the selection then trims by
        worth instead of lacking measured columns), and at the segment's last step at the latest.
        """
        if len(self.walk) < 2 or not self.steps:
            return None
        ends = self.point_steps()
        step = self.steps[-1]["step"]
        i = next((j for j, e in enumerate(ends) if step <= e), None)
        if i is None or i in self.points:
            return None
        kept, target = self.steps[-1]["kept_bytes"], self.steps[-1]["target"]
        settled = target == self.walk[i] and self.walk[i] <= kept <= self.walk[i] + self.tol * self.full
        return i if settled or step == ends[i] else None

    def kept_bytes(self) -> int:
        """Bytes of the tables at the gate's current kept-column counts (byte model of the dims file)."""
        counts = self.gate.kept_counts().tolist()
        return sum(table_bytes(t.num_embeddings, k, self.weight_dtype, self.optimizer).total
                   for t, k in zip(self.tables, counts))

    def step(self, step: Optional[int] = None) -> None:
        """After an optimizer step: update lambda from the kept bytes, then take one HAM step on the mask.

        Args:
            step (Optional[int]): the 1-based step just taken; default the previous call's plus one.
        """
        self.step_count = self.step_count + 1 if step is None else int(step)
        grad = self.gate.reduce_grad()
        kept = self.kept_bytes()
        progress = self.step_count / max(1, self.total_steps)
        target = walk_target(progress, self.full, self.walk, self.warmup, self.prune)
        pruning = progress >= self.warmup
        if pruning:
            err = max(-1.0, min(1.0, (kept - target) / (self.tol * self.full)))
            start = self.lam if self.lam > 0 else self.lambda_init
            self.lam = max(1e-12, start * math.exp(self.dual_lr * err))
        self.gate.update(grad, self.lam, self.mask_lr, self.batch_size, move=pruning)
        self.steps.append({"step": self.step_count, "kept_bytes": kept, "target": round(target), "lambda": self.lam})

    def record_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Records kept bytes, lambda and the validation metrics (auc, logloss) of an evaluation at `step`."""
        self.evals.append({"step": step, "kept_bytes": self.kept_bytes(), "lambda": self.lam,
                           "auc": metrics.get("auc"), "logloss": metrics.get("logloss")})

    def kept_columns(self, droppable: Collection[str] = ()) -> Dict[str, List[int]]:
        """Kept columns per table: legal dims that fill the budget, the largest mask values first.

        Each column is worth its mask value shifted by the smallest one (so every column is worth
        something): the columns the mask keeps come first, and bytes the mask left unspent go to
        the columns it pruned last, until no 4-column step fits (`select_dims`).
        """
        values = self.gate.table_values()
        low = min(float(v.min()) for v in values.values())
        shifted = {n: v.double() - low + 1e-9 for n, v in values.items()}
        return select_dims(shifted, self.tables, self.fraction, droppable, self.weight_dtype, self.optimizer,
                           budget=self.budget)

    def dims_file(self, method: str = "ham", droppable: Collection[str] = (),
                  extra: Optional[Dict[str, Any]] = None) -> DimsFile:
        """The dims file of the searched masks (kept bytes <= budget; `save_dims` writes it).

        Args:
            method (str): the method name recorded in the file.
            droppable (Collection[str]): tables that may get dim 0.
            extra (Optional[Dict[str, Any]]): more fields to record (e.g. the trace).
        """
        dims = make_dims_file(method, self.tables, self.kept_columns(droppable), self.fraction, self.weight_dtype,
                              self.optimizer, extra)
        dims.budget_bytes = self.budget
        return dims

    def compact_tables(self, dims: Optional[DimsFile] = None) -> List[EmbeddingBagConfig]:
        """The mixed-dim table configs of `dims` (default `dims_file()`), dropped tables omitted."""
        return plan_tables(dims if dims is not None else self.dims_file(), self.tables)

    def state_dict(self) -> Dict[str, Any]:
        """lambda, the step count and the trace (checkpointed with the run, so a resumed search continues exactly)."""
        return {"lam": self.lam, "step_count": self.step_count, "steps": list(self.steps), "evals": list(self.evals),
                "points": dict(self.points)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restores lambda and the trace (the mask and its statistics come back with the model state)."""
        self.lam = float(state["lam"])
        self.steps = list(state["steps"])
        self.evals = list(state["evals"])
        self.step_count = int(state.get("step_count", self.steps[-1]["step"] if self.steps else 0))
        self.points = {int(i): p for i, p in state.get("points", {}).items()}

    def trace(self) -> Dict[str, Any]:
        """The search trace as written to trace.json."""
        return {"budget_bytes": self.budget, "full_bytes": self.full, "dual_lr": self.dual_lr, "warmup": self.warmup,
                "prune": self.prune, "lambda_init": self.lambda_init, "tol": self.tol, "steps": self.steps,
                "evals": self.evals, **({"walk": self.walk} if len(self.walk) > 1 else {})}


class BudgetController(BudgetedSearch):
    """The project trainer's callback around `BudgetedSearch` (one budget path for both loops).

    The trainer tells it its total steps and each step's number; everything else is the hook's.

    Args:
        gate (ColumnGate): the supernet's gate (`find_gate(model)`).
        tables (Sequence[EmbeddingBagConfig]): the gate's tables, in order.
        budget (int): bytes.
        dual_lr, weight_dtype, optimizer, warmup, prune, lambda_init, tol, mask_lr, batch_size, walk: as in
            `BudgetedSearch`.
        on_point (Optional[Callable[[Any, int], Dict[str, Any]]]): with a walk, called as `on_point(trainer, i)`
            after the step where the walk's point i is due (`due_point`); it may evaluate the model. What it
            returns is kept in `points[i]` and checkpointed with the controller.

    Example::

        controller = BudgetController(find_gate(model), tables, budget_bytes(tables, 0.5), dual_lr=0.1)
        Trainer(..., callbacks=[controller])
    """

    def __init__(self, gate: ColumnGate, tables: Sequence[EmbeddingBagConfig], budget: int, dual_lr: float,
                 weight_dtype: str = "fp32", optimizer: str = "rowwise_adagrad", warmup: float = 0.2,
                 prune: float = 0.5, lambda_init: float = 0.1, tol: float = 0.02, mask_lr: float = 0.005,
                 batch_size: int = 1, walk: Sequence[int] = (),
                 on_point: Optional[Callable[[Any, int], Dict[str, Any]]] = None) -> None:
        super().__init__(gate, int(budget), total_steps=1, batch_size=batch_size, tables=tables, dual_lr=dual_lr,
                         tol=tol, lambda_init=lambda_init, warmup=warmup, prune=prune, mask_lr=mask_lr,
                         weight_dtype=weight_dtype, optimizer=optimizer, walk=[int(b) for b in walk])
        self.on_point = on_point

    def on_step_end(self, trainer: Any, step: int) -> None:
        """After each optimizer step of the trainer: the hook's step at the trainer's step number, then the walk's
        point if one is due (`on_point`; TorchRec's pipeline keeps its in-flight batches while it evaluates)."""
        self.total_steps = trainer.total_steps
        self.step(step)
        i = self.due_point() if self.on_point is not None else None
        if i is not None:
            self.points[i] = self.on_point(trainer, i)

    def on_eval(self, trainer: Any, step: int, metrics: Dict[str, float]) -> None:
        """Records kept bytes, lambda and the validation metrics of this evaluation."""
        self.record_eval(step, metrics)
