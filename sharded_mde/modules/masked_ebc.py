"""HAM's supernet module: a plain EmbeddingBagCollection whose pooled columns pass a hard 0/1 mask.

`MaskedEmbeddingBagCollection` is KJT in, KeyedTensor out, like an EBC. It owns the EBC as its
child `.ebc` (DistributedModelParallel shards it with TorchRec's stock sharder) and a
`ColumnGate` holding one mask vector a_t per table, concatenated in table order. The gate is
a small dense module: DMP replicates it with DDP, and TorchRec's pipeline tracer treats it as a
leaf. Masking pooled column j of a table equals masking the table's column j because sum and
mean pooling are linear per column. Sharded EBCs may reorder the output keys, so the mask is
gathered into the output's key order on each call; the index is cached per key order.

Forward: m = 1[a > 0]; backward: a straight-through surrogate dm/da (identity, clipped |a| <= 1
or sigmoid'). Training also leaves `auxiliary_loss()` (added by `RecTrain`): the byte penalty
lambda * sum_tj price_t m_tj, where price_t is the bytes of one column of table t over the full
model's bytes, and the orthogonal regularity beta * sum_t ||C_t - I||_F^2 of the batch's pooled
kept columns (centred and L2-normalised). lambda is set by the search's budget controller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from sharded_mde.plan.dims import column_cost, table_bytes

SURROGATES = ("identity", "clipped", "sigmoid")


class _HardMask(torch.autograd.Function):
    """m = 1[a > 0] forward; dm/da = g(a) backward for the chosen surrogate g."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, surrogate: int) -> torch.Tensor:  # type: ignore[override]
        ctx.surrogate = surrogate
        if surrogate:
            ctx.save_for_backward(a)
        return (a > 0).to(a.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:  # type: ignore[override]
        if ctx.surrogate == 0:  # identity
            return grad, None
        (a,) = ctx.saved_tensors
        if ctx.surrogate == 1:  # clipped: hardtanh'
            return grad * (a.abs() <= 1).to(grad.dtype), None
        s = torch.sigmoid(a)
        return grad * s * (1 - s), None


class _MaskColumns(torch.autograd.Function):
    """values * mask (mask broadcast over rows) with a cache-blocked backward.

    Autograd's own backward reduces grad * values over 4096+ rows in one `sum(0)`, which is several
    times slower on CPU than summing row blocks that stay in cache; this is most of the mask's cost.
    """

    BLOCK = 512

    @staticmethod
    def forward(ctx, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(values, mask)
        return values * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:  # type: ignore[override]
        values, mask = ctx.saved_tensors
        grad = grad.contiguous()
        grad_values = grad * mask if ctx.needs_input_grad[0] else None
        grad_mask = None
        if ctx.needs_input_grad[1]:
            grad_mask = torch.zeros_like(mask)
            for i in range(0, grad.shape[0], _MaskColumns.BLOCK):
                grad_mask += (grad[i:i + _MaskColumns.BLOCK] * values[i:i + _MaskColumns.BLOCK]).sum(0)
        return grad_values, grad_mask


def hard_mask(a: torch.Tensor, surrogate: str = "identity") -> torch.Tensor:
    """The 0/1 mask 1[a > 0], differentiable through the straight-through `surrogate`."""
    return _HardMask.apply(a, SURROGATES.index(surrogate))


@dataclass(frozen=True)
class _Layout:
    """Per output-key order: mask index of every output column, and column blocks per dim for the regularity."""

    perm: torch.Tensor  # (sum of output widths,) -> index into the table-ordered mask
    blocks: Tuple[Tuple[int, Optional[torch.Tensor]], ...]  # (dim, (F_d, dim) column index or None = all columns)


class ColumnGate(nn.Module):
    """Hard column mask over a pooled KeyedTensor, plus the search's penalty and orthogonal regularity."""

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        surrogate: str = "identity",
        mask_init: float = 0.05,
        lr_scale: float = 1.0,
        ortho_weight: float = 0.0,
        ortho_rows: int = 0,
        weight_dtype: str = "fp32",
        optimizer: str = "rowwise_adagrad",
    ) -> None:
        super().__init__()
        if surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
        self.surrogate = surrogate
        self.lr_scale = float(lr_scale)
        self.ortho_weight = float(ortho_weight)
        self.ortho_rows = int(ortho_rows)
        self.table_names: List[str] = [t.name for t in tables]
        self.dims: List[int] = [t.embedding_dim for t in tables]
        self.offsets: List[int] = [sum(self.dims[:i]) for i in range(len(self.dims))]
        self._feature_table: Dict[str, int] = {f: i for i, t in enumerate(tables) for f in t.feature_names}
        full = sum(table_bytes(t.num_embeddings, t.embedding_dim, weight_dtype, optimizer).total for t in tables)
        price = torch.cat([torch.full((t.embedding_dim,), column_cost(t.num_embeddings, weight_dtype, optimizer) / full)
                           for t in tables])
        # The parameter is a / lr_scale: under Adam the step of a is then lr_scale * lr (the mask's own rate).
        self.weight = nn.Parameter(torch.full((sum(self.dims),), mask_init / self.lr_scale))
        self.register_buffer("price", price, persistent=False)
        self.register_buffer("lam", torch.zeros(()), persistent=False)
        self._layouts: Dict[Tuple[str, ...], _Layout] = {}
        self._aux: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ mask values
    def values(self) -> torch.Tensor:
        """The mask vector a (all tables, table order); column j of table t is kept iff a > 0."""
        return self.weight * self.lr_scale

    def table_values(self) -> Dict[str, torch.Tensor]:
        """a_t per table (detached, on the CPU)."""
        a = self.values().detach().cpu()
        return {n: a[o:o + d] for n, o, d in zip(self.table_names, self.offsets, self.dims)}

    def kept_counts(self) -> torch.Tensor:
        """Number of kept columns per table (table order), on the mask's device."""
        m = (self.weight > 0).to(torch.int64)
        return torch.stack([m[o:o + d].sum() for o, d in zip(self.offsets, self.dims)])

    @torch.no_grad()
    def set_kept(self, kept: Mapping[str, Sequence[int]], magnitude: float = 1.0) -> None:
        """Sets a to +magnitude on the listed columns of each table and -magnitude elsewhere (tables not listed: all off)."""
        a = torch.full_like(self.weight, -magnitude)
        for name, cols in kept.items():
            i = self.table_names.index(name)
            idx = torch.as_tensor(list(cols), dtype=torch.long, device=a.device)
            a[self.offsets[i] + idx] = magnitude
        self.weight.copy_(a / self.lr_scale)

    def set_lambda(self, lam: float | torch.Tensor) -> None:
        """Sets the penalty weight lambda (the budget controller's dual variable)."""
        self.lam.fill_(float(lam))

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
        lay = _Layout(torch.tensor(perm, dtype=torch.long, device=device), tuple(blocks))
        self._layouts[key] = lay
        return lay

    def forward(self, kt: KeyedTensor) -> KeyedTensor:
        """The pooled embeddings with pruned columns zeroed; in training also computes the auxiliary loss."""
        keys, widths, values = kt.keys(), kt.length_per_key(), kt.values()
        lay = self._layout(keys, widths, values.device)
        m = hard_mask(self.values(), self.surrogate)
        masked = _MaskColumns.apply(values, m.index_select(0, lay.perm))
        if self.training:
            aux = self.lam * (self.price * m).sum()
            if self.ortho_weight > 0:
                aux = aux + self.ortho_weight * self._ortho(values, m.detach().index_select(0, lay.perm), lay)
            self._aux = aux
        else:
            self._aux = None
        return KeyedTensor(keys=keys, length_per_key=widths, values=masked, key_dim=1)

    def _ortho(self, values: torch.Tensor, mk: torch.Tensor, lay: _Layout) -> torch.Tensor:
        """sum over fields of ||C - I||^2 off the diagonal: C the correlation of the kept pooled columns."""
        x = values[: self.ortho_rows] if self.ortho_rows else values
        x = x * mk  # pruned columns are zero, so they add nothing (and get no gradient)
        total = x.new_zeros(())
        for d, idx in lay.blocks:
            xb = x.reshape(x.shape[0], -1, d) if idx is None else x[:, idx]
            xb = xb - xb.mean(dim=0, keepdim=True)
            xb = xb / xb.norm(dim=0, keepdim=True).clamp_min(1e-6)
            c = torch.einsum("bfi,bfj->fij", xb, xb)
            total = total + (c * c).sum() - (c.diagonal(dim1=1, dim2=2) ** 2).sum()
        return total

    def auxiliary_loss(self) -> Optional[torch.Tensor]:
        """Penalty + orthogonal regularity of the latest training forward (None in eval)."""
        return self._aux


class MaskedEmbeddingBagCollection(nn.Module):
    """An EBC (child `.ebc`, sharded by DMP's stock sharder) followed by a `ColumnGate` (child `.gate`)."""

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        device: Optional[torch.device] = None,
        **gate_kwargs: object,
    ) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=list(tables), device=device)
        self.gate = ColumnGate(tables, **gate_kwargs)  # type: ignore[arg-type]

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings per feature with the hard column mask applied."""
        return self.gate(self.ebc(features))

    def auxiliary_loss(self) -> Optional[torch.Tensor]:
        """The gate's penalty + orthogonal regularity (RecTrain adds it to the loss)."""
        return self.gate.auxiliary_loss()


def find_gate(model: nn.Module) -> ColumnGate:
    """The ColumnGate inside a (possibly DMP-wrapped) model."""
    for m in model.modules():
        if isinstance(m, ColumnGate):
            return m
    raise ValueError("the model has no ColumnGate (not a HAM supernet)")
