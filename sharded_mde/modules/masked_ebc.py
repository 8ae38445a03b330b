"""HAM's supernet module: a plain EmbeddingBagCollection whose pooled columns pass a hard 0/1 mask.

`MaskedEmbeddingBagCollection` is KJT in, KeyedTensor out, like an EBC. It owns the EBC as its
child `.ebc` (DistributedModelParallel shards it with TorchRec's stock sharder) and a
`ColumnGate` holding one mask vector a_t per table, concatenated in table order. The gate is
a small dense module that every rank holds whole, and TorchRec's pipeline tracer treats it as a
leaf. Masking pooled column j of a table equals masking the table's column j because sum and
mean pooling are linear per column. Sharded EBCs may reorder the output keys, so the mask is
gathered into the output's key order on each call; the index is cached per key order.

Forward: m = 1[a > 0]. In training, the backward of the masking hands dL/dm (of every column,
kept or not) to the gate, and the search's controller applies the HAM step once per update
(`update`): a <- a - lr * g(a) * (D + lambda * price), g the straight-through surrogate (identity,
clipped or sigmoid', on a / mask_init), D the discrete gradient L(m_j = 1) - L(m_j = 0) from the
averaged dL/dm and its empirical-Fisher curvature (`discrete_grad`), price_t the bytes of one
column of table t relative to the mean column (optionally mixed with a share `uniform_price` of a
uniform price). This is a gradient method on loss + lambda * sum_tj price_t m_tj in the discrete
space with a dedicated, scale-free mask optimizer; the mask is a buffer, so DDP and the dense
optimizer leave it alone. `auxiliary_loss()` (added by `RecTrain`) is the orthogonal regularity
beta * sum_t ||C_t - I||_F^2 / P of the batch's pooled kept columns (centred and L2-normalised;
P the number of off-diagonal column pairs at full dims, so beta weighs a mean squared correlation),
on the first `ortho_rows` rows of the batch, every `ortho_every`-th step (weighted by it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from sharded_mde.dims import column_cost, table_bytes

SURROGATES = ("identity", "clipped", "sigmoid")


def surrogate_grad(u: torch.Tensor, surrogate: str = "identity") -> torch.Tensor:
    """dm/da of the straight-through estimator at u = a / mask_init: 1, 1[|u| <= 1], or 4 sigmoid'(u)."""
    if surrogate == "identity":
        return torch.ones_like(u)
    if surrogate == "clipped":
        return (u.abs() <= 1).to(u.dtype)
    if surrogate == "sigmoid":
        s = torch.sigmoid(u)
        return 4 * s * (1 - s)
    raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")


class _MaskColumns(torch.autograd.Function):
    """values * mask (the mask broadcast over rows); backward also hands dL/dmask to the gate.

    Both products of the backward (grad * mask and the mask gradient, summed over rows) are formed
    per row block that stays in cache: autograd's own broadcast backward reduces grad * values
    over all rows in one `sum(0)`, several times slower on CPU.
    """

    BLOCK = 512

    @staticmethod
    def forward(ctx, values: torch.Tensor, mask: torch.Tensor, gate: Optional["ColumnGate"],  # type: ignore[override]
                perm: torch.Tensor) -> torch.Tensor:
        ctx.gate, ctx.perm = gate, perm
        ctx.save_for_backward(values if gate is not None else None, mask)
        return values * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        values, mask = ctx.saved_tensors
        if ctx.gate is None:
            return grad * mask, None, None, None
        grad = grad.contiguous()
        grad_values = torch.empty_like(grad)
        grad_mask = torch.zeros_like(mask)
        for i in range(0, grad.shape[0], _MaskColumns.BLOCK):  # one pass over grad: both products per block
            g = grad[i:i + _MaskColumns.BLOCK]
            torch.mul(g, mask, out=grad_values[i:i + _MaskColumns.BLOCK])
            grad_mask += (g * values[i:i + _MaskColumns.BLOCK]).sum(0)
        ctx.gate.grad_sum.index_add_(0, ctx.perm, grad_mask)
        return grad_values, None, None, None


@dataclass(frozen=True)
class _Layout:
    """Per output-key order: mask index of every output column, and column blocks per dim for the regularity."""

    perm: torch.Tensor  # (sum of output widths,) -> index into the table-ordered mask
    blocks: Tuple[Tuple[int, Optional[torch.Tensor]], ...]  # (dim, (F_d, dim) column index or None = all columns)
    pairs: int  # off-diagonal column pairs over all output keys (the regularity's normaliser)


class ColumnGate(nn.Module):
    """Hard column mask over a pooled KeyedTensor, its HAM update rule, and the orthogonal regularity."""

    MOMENTUM = 0.9  # EMA of the mask gradient (averages the batch noise)
    FISHER_DECAY = 0.99  # EMA of the squared mask gradient (the curvature estimate)

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        surrogate: str = "identity",
        mask_init: float = 0.05,
        ortho_weight: float = 0.0,
        ortho_rows: int = 0,
        ortho_every: int = 1,
        weight_dtype: str = "fp32",
        optimizer: str = "rowwise_adagrad",
        uniform_price: float = 0.0,
    ) -> None:
        super().__init__()
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        self.surrogate = surrogate
        self.mask_init = float(mask_init)
        self.ortho_weight = float(ortho_weight)
        self.ortho_rows = int(ortho_rows)
        self.ortho_every = int(ortho_every)
        self.table_names: List[str] = [t.name for t in tables]
        self.dims: List[int] = [t.embedding_dim for t in tables]
        self.offsets: List[int] = [sum(self.dims[:i]) for i in range(len(self.dims))]
        self._feature_table: Dict[str, int] = {f: i for i, t in enumerate(tables) for f in t.feature_names}
        full = sum(table_bytes(t.num_embeddings, t.embedding_dim, weight_dtype, optimizer).total for t in tables)
        cols = sum(self.dims)
        price = torch.cat([torch.full((t.embedding_dim,), (1 - uniform_price) * column_cost(
            t.num_embeddings, weight_dtype, optimizer) / full + uniform_price / cols) for t in tables])
        # The mask is a buffer, not a parameter: the search's controller updates it (`update`), so
        # neither DDP nor the dense optimizer touch it; it is saved and restored with the model.
        self.register_buffer("mask", torch.full((cols,), self.mask_init))
        self.register_buffer("momentum", torch.zeros(cols))
        self.register_buffer("grad_sq", torch.zeros(cols))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))
        self.register_buffer("price", price / price.mean(), persistent=False)  # mean 1
        self.register_buffer("grad_sum", torch.zeros(cols), persistent=False)  # dL/dm since the last reduce_grad
        self.collect_grad = True  # training forwards record dL/dm in grad_sum
        self._layouts: Dict[Tuple[str, ...], _Layout] = {}
        self._aux: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ mask values
    def values(self) -> torch.Tensor:
        """The mask vector a (all tables, table order); column j of table t is kept iff a > 0."""
        return self.mask

    def table_values(self) -> Dict[str, torch.Tensor]:
        """a_t per table (detached, on the CPU)."""
        a = self.mask.detach().cpu()
        return {n: a[o:o + d] for n, o, d in zip(self.table_names, self.offsets, self.dims)}

    def kept_counts(self) -> torch.Tensor:
        """Number of kept columns per table (table order), on the mask's device."""
        m = (self.mask > 0).to(torch.int64)
        return torch.stack([m[o:o + d].sum() for o, d in zip(self.offsets, self.dims)])

    @torch.no_grad()
    def set_kept(self, kept: Mapping[str, Sequence[int]], magnitude: float = 1.0) -> None:
        """Sets a to +magnitude on the listed columns of each table and -magnitude elsewhere (tables not listed: all off)."""
        a = torch.full_like(self.mask, -magnitude)
        for name, cols in kept.items():
            i = self.table_names.index(name)
            idx = torch.as_tensor(list(cols), dtype=torch.long, device=a.device)
            a[self.offsets[i] + idx] = magnitude
        self.mask.copy_(a)

    # ------------------------------------------------------------------ the HAM update
    @torch.no_grad()
    def reduce_grad(self) -> torch.Tensor:
        """dL/dm of the mean loss over ranks since the last call (all-reduced; the accumulator is reset)."""
        g = self.grad_sum.clone()
        self.grad_sum.zero_()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(g)
            g /= dist.get_world_size()
        return g

    @torch.no_grad()
    def discrete_grad(self, batch_size: int) -> torch.Tensor:
        """L(m_j = 1) - L(m_j = 0) per column, to second order, in units of the mean column importance.

        The first-order straight-through gradient g = dL/dm is blind where it matters most: at a
        kept column the layers after it have adapted, so E[g] is about 0 whatever the column is
        worth. The second-order term supplies the worth: with the empirical Fisher as the curvature,
        H_jj = batch_size * E[g_j^2] (the per-example gradient's second moment), and
        L(1) - L(0) = g + (1/2 - m) H. It is divided by the mean of H / 2, so lambda is
        dimensionless: at lambda = 1 a column of average importance and average price is balanced.
        """
        fisher = batch_size * self.grad_sq / (1 - self.FISHER_DECAY ** max(1, int(self.updates)))
        m = (self.mask > 0).to(fisher.dtype)
        unit = (fisher.mean() / 2).clamp_min(1e-20)
        return (self.momentum + (0.5 - m) * fisher) / unit

    @torch.no_grad()
    def update(self, grad: torch.Tensor, lam: float, lr: float, batch_size: int, move: bool = True) -> None:
        """One HAM step: a <- a - lr * g(a) * (discrete_grad + lam * price) (price: mean 1).

        `grad` is dL/dm of one (global) batch of `batch_size` rows. With `move` false only the
        running statistics advance (the search's warm-up).
        """
        self.momentum.mul_(self.MOMENTUM).add_(grad, alpha=1 - self.MOMENTUM)
        self.grad_sq.mul_(self.FISHER_DECAY).add_(grad * grad, alpha=1 - self.FISHER_DECAY)
        self.updates += 1
        if move:
            step = self.discrete_grad(batch_size) + lam * self.price
            self.mask.sub_(lr * surrogate_grad(self.mask / self.mask_init, self.surrogate) * step)

    # ------------------------------------------------------------------ forward
    def _layout(self, keys: List[str], widths: List[int], device: torch.device) -> _Layout:
        """The cached index of the mask in this key order (built once per order)."""
        key = tuple(keys)
        lay = self._layouts.get(key)
        if lay is not None and lay.perm.device == device:
            return lay
        perm: List[int] = []
        by_dim: Dict[int, List[List[int]]] = {}
        col = 0
        for k, w in zip(keys, widths):
            if k not in self._feature_table:
                raise KeyError(f"ColumnGate: output key {k!r} belongs to no masked table")
            t = self._feature_table[k]
            if w != self.dims[t]:
                raise ValueError(f"ColumnGate: key {k!r} has width {w}, table {self.table_names[t]} has {self.dims[t]}")
            perm.extend(range(self.offsets[t], self.offsets[t] + w))
            by_dim.setdefault(w, []).append(list(range(col, col + w)))
            col += w
        blocks = []
        for d, cols in by_dim.items():
            contiguous = len(by_dim) == 1  # one width: the whole row reshapes to (B, F, d)
            blocks.append((d, None if contiguous else torch.tensor(cols, dtype=torch.long, device=device)))
        pairs = max(1, sum(w * (w - 1) for w in widths))
        lay = _Layout(torch.tensor(perm, dtype=torch.long, device=device), tuple(blocks), pairs)
        self._layouts[key] = lay
        return lay

    def forward(self, kt: KeyedTensor) -> KeyedTensor:
        """The pooled embeddings with pruned columns zeroed; in training also records dL/dm and the regularity."""
        keys, widths, values = kt.keys(), kt.length_per_key(), kt.values()
        lay = self._layout(keys, widths, values.device)
        mk = (self.mask > 0).to(values.dtype).index_select(0, lay.perm)
        collect = self.training and self.collect_grad
        masked = _MaskColumns.apply(values, mk, self if collect else None, lay.perm)
        self._aux = None
        if self.training and self.ortho_weight > 0 and int(self.updates) % self.ortho_every == 0:
            # Lazy regularisation: every `ortho_every`-th step, weighted by it (same mean weight per step).
            self._aux = self.ortho_weight * self.ortho_every * self._ortho(values, mk, lay)
        return KeyedTensor(keys=keys, length_per_key=widths, values=masked, key_dim=1)

    def _ortho(self, values: torch.Tensor, mk: torch.Tensor, lay: _Layout) -> torch.Tensor:
        """Mean squared correlation between distinct kept pooled columns of a field (sum of ||C - I||^2
        off the diagonal over fields, over the number of such column pairs at full dims)."""
        x = values[: self.ortho_rows] if self.ortho_rows else values
        x = x * mk  # pruned columns are zero, so they add nothing (and get no gradient)
        total = x.new_zeros(())
        for d, idx in lay.blocks:
            xb = x.reshape(x.shape[0], -1, d) if idx is None else x[:, idx]
            xb = xb - xb.mean(dim=0, keepdim=True)
            xb = xb / xb.norm(dim=0, keepdim=True).clamp_min(1e-6)
            c = torch.einsum("bfi,bfj->fij", xb, xb)
            total = total + (c * c).sum() - (c.diagonal(dim1=1, dim2=2) ** 2).sum()
        return total / lay.pairs

    def auxiliary_loss(self) -> Optional[torch.Tensor]:
        """The orthogonal regularity of the latest training forward (None in eval or when off)."""
        return self._aux


class MaskedEmbeddingBagCollection(EmbeddingBagCollectionInterface):
    """An EBC (child `.ebc`, sharded by DMP's stock sharder) followed by a `ColumnGate` (child `.gate`).

    It implements TorchRec's `EmbeddingBagCollectionInterface`, so it goes wherever an
    `EmbeddingBagCollection` goes, e.g. as `embedding_bag_collection` of `torchrec.models.dlrm.DLRM`
    or `DLRM_DCN`: during the search every table keeps its full dim, only pruned columns read 0.

    Args:
        tables (Sequence[EmbeddingBagConfig]): the full tables.
        device (Optional[torch.device]): where the EBC is built ("meta" for DMP to materialise).
        is_weighted (bool): whether the features carry weights (as in `EmbeddingBagCollection`).
        **gate_kwargs: `ColumnGate` settings (surrogate, mask_init, ortho_weight, ..., optimizer).

    Example::

        tables = [EmbeddingBagConfig(name="t_C1", num_embeddings=1000, embedding_dim=16, feature_names=["C1"])]
        masked = MaskedEmbeddingBagCollection(tables)
        kt = masked(KeyedJaggedTensor.from_lengths_sync(keys=["C1"], values=torch.tensor([1, 2]),
                                                        lengths=torch.tensor([1, 1])))
        kt["C1"].shape  # torch.Size([2, 16])
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        device: Optional[torch.device] = None,
        is_weighted: bool = False,
        **gate_kwargs: object,
    ) -> None:
        super().__init__()
        self._embedding_bag_configs: List[EmbeddingBagConfig] = list(tables)
        self._is_weighted = bool(is_weighted)
        self.ebc = EmbeddingBagCollection(tables=list(tables), is_weighted=is_weighted, device=device)
        self.gate = ColumnGate(tables, **gate_kwargs)  # type: ignore[arg-type]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings per feature with the hard column mask applied."""
        return self.gate(self.ebc(features))

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The full tables (their dims during the search; the dims file holds the searched ones)."""
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        """Whether the features carry per-id weights."""
        return self._is_weighted

    def auxiliary_loss(self) -> Optional[torch.Tensor]:
        """The gate's orthogonal regularity (RecTrain adds it to the loss)."""
        return self.gate.auxiliary_loss()


def find_gate(model: nn.Module) -> ColumnGate:
    """The ColumnGate inside a (possibly DMP-wrapped) model."""
    for m in model.modules():
        if isinstance(m, ColumnGate):
            return m
    raise ValueError("the model has no ColumnGate (not a HAM supernet)")
