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
    need = floor_bytes(tables, weight_dtype, optimizer, dropped)
    return min(1.0, fraction_holding(need, full_bytes(tables, weight_dtype, optimizer)))


def fraction_holding(need: int, full: int) -> float:
    """The smallest budget fraction (4 decimals, rounded up) whose bytes, floor(fraction x full), hold `need`."""
    f = math.ceil(need / full * 1e4) / 1e4
    while math.floor(f * full) < need:  # float rounding: step up until the budget holds `need`
        f += 1e-4
    return f


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


# --------------------------------------------------------------------------- serving bytes (inference tables)

SERVING_DTYPES = ("fp32", "fp16", "int8", "int4")
SERVING_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "int4": 4}
SCALE_BIAS_BYTES = 4  # fused int8/int4 rows end with an fp16 scale and an fp16 bias (FBGEMM's DEFAULT_SCALE_BIAS_SIZE_IN_BYTES)
TABLE_ALIGNMENT = 128  # FBGEMM's inference TBE pads each table's storage to a 128-byte cache line


def _round_up(n: int, multiple: int) -> int:
    """`n` rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def _check_serving_dtype(dtype: str) -> None:
    """Raises a one-line ValueError for a dtype outside the serving byte model."""
    if dtype not in SERVING_BITS:
        raise ValueError(f"serving dtype must be one of {', '.join(SERVING_DTYPES)}, got {dtype!r}")


def serving_dim_multiple(dtype: str) -> int:
    """The multiple every served dim of `dtype` must be: 1 for fp32/fp16, 2 for int8, 4 for int4.

    FBGEMM's row-wise quantiser (`FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf`, which TorchRec's
    `quantize_embeddings` and our export use) needs a row's packed data to be whole 2-byte units
    (dim * bits % 16 == 0); the inference TBE itself only needs whole bytes (`dim % (8 / bit_rate)`).
    """
    _check_serving_dtype(dtype)
    bits = SERVING_BITS[dtype]
    return 1 if bits >= 16 else 16 // bits


def legal_serving_dim(dim: int, dtype: str) -> bool:
    """True if a table of `dim` can be quantised to and served as `dtype` (see `serving_dim_multiple`)."""
    return legal_dim(dim, serving_dim_multiple(dtype))


def serving_row_bytes(dim: int, dtype: str, row_alignment: int = 1) -> int:
    """Bytes of one stored row in FBGEMM's inference TBE: fp32 4 x dim, fp16 2 x dim, int8 dim + 4,
    int4 dim / 2 + 4, rounded up to `row_alignment` (FBGEMM's `rounded_row_size_in_bytes`)."""
    _check_serving_dtype(dtype)
    if row_alignment < 1:
        raise ValueError(f"row_alignment must be >= 1, got {row_alignment}")
    bits = SERVING_BITS[dtype]
    data = dim * bits // 8
    return _round_up(data if bits >= 16 else data + SCALE_BIAS_BYTES, row_alignment)


def serving_table_bytes(rows: int, dim: int, dtype: str, row_alignment: int = 1) -> int:
    """Bytes a served table holds (0 when dim is 0): fp32 is a TorchRec EBC parameter, rows x dim x 4;
    fp16/int8/int4 live in FBGEMM's inference TBE, rows x `serving_row_bytes` padded to a 128-byte line."""
    _check_serving_dtype(dtype)
    if dim <= 0:
        return 0
    if dtype == "fp32":
        return rows * dim * 4
    return _round_up(rows * serving_row_bytes(dim, dtype, row_alignment), TABLE_ALIGNMENT)


def serving_bytes_of(tables: Sequence[Any], dtype: str, row_alignment: int = 1) -> int:
    """Serving bytes of TorchRec table configs (`num_embeddings` x `embedding_dim`) all served as `dtype`."""
    return sum(serving_table_bytes(t.num_embeddings, t.embedding_dim, dtype, row_alignment) for t in tables)
