"""Legal dims and the byte model: what a table at a dim costs, and which budgets are feasible.

Every stage prices tables with these functions, so the search, the planner report and the
export agree on bytes to the byte.
"""

from __future__ import annotations

import math
from typing import Any, Collection, Mapping, NamedTuple, Optional, Sequence


DIM_MULTIPLE = 4  # FBGEMM training TBE: every table and every column-wise shard, dim % 4 == 0
WEIGHT_BYTES = {"fp32": 4, "fp16": 2}
# optimizer state: (bytes per row, bytes per element) on top of the weights
OPTIMIZER_BYTES = {"rowwise_adagrad": (4, 0), "adagrad": (0, 4), "adam": (0, 8), "sgd": (0, 0)}


def legal_dim(d: int, multiple: int = DIM_MULTIPLE) -> bool:
    """True if `d` is a dim FBGEMM's training TBE accepts: positive and a multiple of `multiple`."""
    return isinstance(d, int) and not isinstance(d, bool) and d > 0 and d % multiple == 0


def round_to_legal(d: float, multiple: int = DIM_MULTIPLE, mode: str = "up", max_dim: Optional[int] = None) -> int:
    """Rounds a (real) dim to a legal one, at least `multiple` and at most `max_dim`; d <= 0 gives 0 (dropped)."""
    if d <= 0:
        return 0
    if mode not in ("up", "down", "nearest"):
        raise ValueError(f"round_to_legal: mode must be up, down or nearest, got {mode!r}")
    q = d / multiple
    k = math.ceil(q) if mode == "up" else math.floor(q) if mode == "down" else math.floor(q + 0.5)
    out = max(multiple, k * multiple)
    if max_dim is not None:
        out = min(out, max_dim - max_dim % multiple)
    return out


class InfeasibleBudget(ValueError):
    """A byte budget that no legal dims of a method can meet (e.g. below every table at dim 4)."""


class TableBytes(NamedTuple):
    """Raw bytes a table (or shard) holds: weights and optimizer state."""

    weight: int
    optimizer: int

    @property
    def total(self) -> int:
        """Weights plus optimizer state."""
        return self.weight + self.optimizer


def table_bytes(rows: int, dim: int, weight_dtype: str = "fp32", optimizer: str = "rowwise_adagrad") -> TableBytes:
    """Raw bytes of a rows x dim table: fp32 4 B / fp16 2 B per element plus optimizer state (0 when dim is 0)."""
    if weight_dtype not in WEIGHT_BYTES:
        raise ValueError(f"weight_dtype must be one of {sorted(WEIGHT_BYTES)}, got {weight_dtype!r}")
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_BYTES)}, got {optimizer!r}")
    if dim <= 0:
        return TableBytes(0, 0)
    per_row, per_elem = OPTIMIZER_BYTES[optimizer]
    return TableBytes(rows * dim * WEIGHT_BYTES[weight_dtype], rows * (per_row + dim * per_elem))


def column_cost(rows: int, weight_dtype: str = "fp32", optimizer: str = "rowwise_adagrad") -> int:
    """Bytes one more column adds to a table that already has columns (what a budget controller prices)."""
    return table_bytes(rows, 2, weight_dtype, optimizer).total - table_bytes(rows, 1, weight_dtype, optimizer).total


# --------------------------------------------------------------------------- feasibility of field-wise dims


def dims_bytes(tables: Sequence[Any], dims: Mapping[str, int], weight_dtype: str = "fp32",
               optimizer: str = "rowwise_adagrad") -> int:
    """Bytes of the tables at per-table dims `dims` (by table name)."""
    return sum(table_bytes(t.num_embeddings, dims[t.name], weight_dtype, optimizer).total for t in tables)


def full_bytes(tables: Sequence[Any], weight_dtype: str = "fp32", optimizer: str = "rowwise_adagrad") -> int:
    """Bytes of every table at its full dim (the 100% of a budget fraction)."""
    return dims_bytes(tables, {t.name: t.embedding_dim for t in tables}, weight_dtype, optimizer)


def budget_bytes(tables: Sequence[Any], fraction: float, weight_dtype: str = "fp32",
                 optimizer: str = "rowwise_adagrad") -> int:
    """The byte budget B: `fraction` of the full tables' bytes, rounded down."""
    return int(math.floor(fraction * full_bytes(tables, weight_dtype, optimizer)))


def dim_cap(rows: int, full_dim: int, multiple: int = DIM_MULTIPLE) -> int:
    """The most columns worth giving a table of `rows` used rows: its rank is at most `rows`, so
    min(full_dim, rows floored to a legal dim), and never below the smallest legal dim."""
    return min(full_dim, max(multiple, rows // multiple * multiple))


def floor_bytes(tables: Sequence[Any], weight_dtype: str = "fp32", optimizer: str = "rowwise_adagrad",
                dropped: Collection[str] = (), multiple: int = DIM_MULTIPLE) -> int:
    """Bytes of the smallest field-wise allocation: every table not in `dropped` at the smallest legal dim."""
    return sum(table_bytes(t.num_embeddings, min(multiple, t.embedding_dim), weight_dtype, optimizer).total
               for t in tables if t.name not in dropped)


def smallest_feasible_fraction(tables: Sequence[Any], weight_dtype: str = "fp32", optimizer: str = "rowwise_adagrad",
                               dropped: Collection[str] = ()) -> float:
    """The smallest budget fraction (4 decimals, rounded up) whose bytes hold `floor_bytes`."""
    full = full_bytes(tables, weight_dtype, optimizer)
    need = floor_bytes(tables, weight_dtype, optimizer, dropped)
    f = math.ceil(need / full * 1e4) / 1e4
    while math.floor(f * full) < need:  # float rounding: step up until the budget holds the floor
        f += 1e-4
    return min(1.0, f)


def check_feasible(tables: Sequence[Any], fraction: float, weight_dtype: str = "fp32",
                   optimizer: str = "rowwise_adagrad", dropped: Collection[str] = (), method: str = "field-wise") -> None:
    """The one feasibility rule of every field-wise method: every table not in `dropped` keeps at
    least the smallest legal dim. Raises InfeasibleBudget naming the smallest feasible budget."""
    budget = budget_bytes(tables, fraction, weight_dtype, optimizer)
    need = floor_bytes(tables, weight_dtype, optimizer, dropped)
    if need <= budget:
        return
    f = smallest_feasible_fraction(tables, weight_dtype, optimizer, dropped)
    kept = "every field" if not dropped else f"every field but {', '.join(sorted(dropped))}"
    raise InfeasibleBudget(
        f"search.budget {fraction:g} ({budget:,} B) is not feasible for {method} dims: {kept} at dim "
        f"{DIM_MULTIPLE} needs {need:,} B; the smallest feasible budget is {f:.4f} ({need:,} B of "
        f"{full_bytes(tables, weight_dtype, optimizer):,} B). Raise search.budget, use search.method: pme, "
        f"or set search.allow_drop: true (HAM drops a field only where validation shows it harmless)")
