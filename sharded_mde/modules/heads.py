"""Model heads that accept a different embedding dim per table.

TorchRec's `DLRM` asserts equal dims, so `MixedDimDLRM` projects the pooled field embeddings to
the common dim (the MD-embeddings DLRM of Ginart et al.) and then reuses TorchRec's `DenseArch`,
`InteractionArch` and `OverArch`; `MixedDimDCN` runs TorchRec's `LowRankCrossNet` on the
concatenation. Both read the sparse module's `KeyedTensor` by key (sharded EBCs may reorder keys),
and a field without a table (dropped by the search) contributes zeros, so a compact model keeps
the supernet's interaction layout. `slice_inputs` cuts the layers that read embedding columns down
to the kept columns, which makes the compact model compute exactly what the hard-masked one did.
"""

from __future__ import annotations

from typing import Collection, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch, InteractionArch, OverArch
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from sharded_mde.config import FULL_WIDTH_MODES


def _field_embeddings(kt: KeyedTensor, features: List[str], dims: Mapping[str, int], batch: int,
                      like: torch.Tensor) -> List[torch.Tensor]:
    """Per-feature pooled embeddings in `features` order; empty (width 0) for fields without a table.

    Which fields have tables is static (dims[f] == 0 means none), so the head stays symbolically
    traceable for TorchRec's train pipeline.
    """
    emb = kt.to_dict()
    return [emb[f] if dims[f] > 0 else like.new_zeros(batch, 0) for f in features]


class _MixedDimHead(nn.Module):
    """What both heads share: the sparse arch, each field's embedding width and TorchRec's DenseArch."""

    def __init__(self, sparse_arch: nn.Module, feature_dims: Dict[str, int], dense_in_features: int,
                 dense_arch_layer_sizes: List[int]) -> None:
        super().__init__()
        self.sparse_arch = sparse_arch
        self.features: List[str] = list(feature_dims)
        self.feature_dims: Dict[str, int] = dict(feature_dims)
        self.dense_arch = DenseArch(dense_in_features, dense_arch_layer_sizes)

    def _dense_and_fields(self, dense_features: torch.Tensor,
                          sparse_features: KeyedJaggedTensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(dense arch output, per-field pooled embeddings in `features` order)."""
        dense = self.dense_arch(dense_features)
        kt = self.sparse_arch(sparse_features)
        return dense, _field_embeddings(kt, self.features, self.feature_dims, dense.shape[0], dense)


class MixedDimDLRM(_MixedDimHead):
    """DLRM over per-field embeddings of any width: Linear(d_f -> D) per field, then DLRM arches.

    The projections of all fields of one width run as one batched matmul. `full_width` says what a
    field already at the interaction width D gets: "identity" (the default) no projection and no
    parameters (`nn.Identity` in `projections`), which is the reference MD-embeddings code:
    facebookresearch/dlrm `tricks/md_embedding_bag.py`, `PrEmbeddingBag`, uses `nn.Identity()` when
    `embedding_dim == base_dim` and a Linear only when `embedding_dim < base_dim`; "project" a
    learned Linear(D -> D) like every other field. With every field at D, "identity" is stock DLRM
    (the same logits for the same weights); a field of any other width keeps its learned projection,
    and so does a field in `projected`: a wider field cut to width D (a compact model sliced from a
    supernet) keeps its learned Linear(D -> D), so a head rebuilt from a saved state names those
    fields (`projected_fields` of the state's keys).

    Stock `torchrec.models.dlrm.DLRM` asserts one dim for every table, so the compact model after a
    search uses this head (a searched model trains with `DLRM` itself: during the search every table
    keeps its full dim).

    Args:
        sparse_arch (nn.Module): KJT -> KeyedTensor of pooled embeddings (an EBC of the compact tables).
        feature_dims (Dict[str, int]): pooled width per feature, in the model's feature order (0: dropped).
        dense_in_features (int): dense input width.
        dense_arch_layer_sizes (List[int]): the dense MLP; its last size D is the interaction width.
        over_arch_layer_sizes (List[int]): the over MLP, ending in 1.
        full_width (str): "identity" (default) or "project": see above.
        projected (Collection[str]): fields at width D that keep a Linear under "identity".

    Example::

        compact = plan_tables(dims, tables)  # mixed-dim EmbeddingBagConfigs
        model = MixedDimDLRM(EmbeddingBagCollection(tables=compact), {t.feature_names[0]: t.embedding_dim
                             for t in compact}, dense_in_features=4, dense_arch_layer_sizes=[16, 16],
                             over_arch_layer_sizes=[16, 1])
        logits = model(dense_features, sparse_features)  # (B, 1)
    """

    def __init__(
        self,
        sparse_arch: nn.Module,
        feature_dims: Dict[str, int],
        dense_in_features: int,
        dense_arch_layer_sizes: List[int],
        over_arch_layer_sizes: List[int],
        full_width: str = "identity",
        projected: Collection[str] = (),
    ) -> None:
        super().__init__(sparse_arch, feature_dims, dense_in_features, dense_arch_layer_sizes)
        if full_width not in FULL_WIDTH_MODES:
            raise ValueError(f"full_width: {' or '.join(FULL_WIDTH_MODES)}, got {full_width!r}")
        d = dense_arch_layer_sizes[-1]
        self.out_dim = d
        # No bias: a zero (pruned or dropped) field embedding must project to zero.
        self.projections = nn.ModuleDict(
            {f: nn.Identity() if full_width == "identity" and dim == d and f not in projected
             else nn.Linear(max(dim, 1), d, bias=False) for f, dim in self.feature_dims.items()}
        )
        self.inter_arch = InteractionArch(num_sparse_features=len(self.features))
        f = len(self.features)
        self.over_arch = OverArch(d + f * (f + 1) // 2, over_arch_layer_sizes)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Logits of shape (B, 1)."""
        dense, embs = self._dense_and_fields(dense_features, sparse_features)
        return self.over_arch(self.inter_arch(dense, self._project(dense, embs)))

    def _project(self, dense: torch.Tensor, embs: List[torch.Tensor]) -> torch.Tensor:
        """(B, F, D): every field's embedding times its projection, one batched matmul per group of equal widths.

        The same products as applying each field's `projections[f]` alone (its weight is read, not
        copied into another parameter, so the state dict keeps one Linear per field); an identity
        field passes through as it is; a field without a table gives zeros.
        """
        out: List[Optional[torch.Tensor]] = [None] * len(self.features)
        groups: Dict[int, List[int]] = {}
        for i, f in enumerate(self.features):
            if isinstance(self.projections[f], nn.Identity):
                out[i] = embs[i]
            elif self.feature_dims[f] > 0:
                groups.setdefault(self.feature_dims[f], []).append(i)
        if len(groups) == 1 and len(next(iter(groups.values()))) == len(self.features):  # one group, in order
            return self._project_group(embs, list(range(len(self.features)))).transpose(0, 1)
        for positions in groups.values():
            y = self._project_group(embs, positions)
            for k, i in enumerate(positions):
                out[i] = y[k]
        return torch.stack([x if x is not None else torch.zeros_like(dense) for x in out], dim=1)

    def _project_group(self, embs: List[torch.Tensor], positions: List[int]) -> torch.Tensor:
        """(G, B, D): the fields at `positions` (all of one width d) through their (D, d) weights in one bmm."""
        x = torch.stack([embs[i] for i in positions])  # (G, B, d)
        w = torch.stack([self.projections[self.features[i]].weight for i in positions])  # (G, D, d)
        return torch.bmm(x, w.transpose(1, 2))

    @torch.no_grad()
    def slice_inputs(self, kept: Mapping[str, torch.Tensor]) -> None:
        """Keeps only columns `kept[f]` of each field's projection input (empty = field dropped).

        An identity field keeping all its columns stays an identity; keeping fewer, it becomes a
        Linear whose weight is the identity's kept columns, so it computes what the masked field did.
        """
        device = next(self.dense_arch.parameters()).device
        for f, idx in kept.items():
            old = self.projections[f]
            if isinstance(old, nn.Identity):
                if torch.equal(torch.as_tensor(idx, dtype=torch.long), torch.arange(self.out_dim)):
                    continue
                weight = torch.eye(self.out_dim, device=device)
            else:
                weight = old.weight
            new = nn.Linear(max(len(idx), 1), self.out_dim, bias=False, device=weight.device)
            new.weight.zero_()
            if len(idx):
                new.weight.copy_(weight[:, idx])
            self.projections[f] = new
            self.feature_dims[f] = len(idx)


def projected_fields(keys: Iterable[str]) -> List[str]:
    """The fields with a projection weight among the state-dict keys of a MixedDimDLRM (keys relative to the head)."""
    return [k[len("projections."):-len(".weight")] for k in keys if k.startswith("projections.") and k.endswith(".weight")]


class MixedDimDCN(_MixedDimHead):
    """DCN-v2 style head: LowRankCrossNet over [dense arch output, concatenated field embeddings].

    Args:
        sparse_arch (nn.Module): KJT -> KeyedTensor of pooled embeddings of any widths.
        feature_dims (Dict[str, int]): pooled width per feature, in the model's feature order.
        dense_in_features (int): dense input width.
        dense_arch_layer_sizes (List[int]): the dense MLP.
        over_arch_layer_sizes (List[int]): the over MLP, ending in 1.
        num_layers (int): cross layers.
        low_rank (int): rank of each cross layer's weight.

    Example::

        model = MixedDimDCN(EmbeddingBagCollection(tables=compact), {"C1": 8, "C2": 4}, dense_in_features=4,
                            dense_arch_layer_sizes=[16], over_arch_layer_sizes=[16, 1])
        logits = model(dense_features, sparse_features)  # (B, 1)
    """

    def __init__(
        self,
        sparse_arch: nn.Module,
        feature_dims: Dict[str, int],
        dense_in_features: int,
        dense_arch_layer_sizes: List[int],
        over_arch_layer_sizes: List[int],
        num_layers: int = 2,
        low_rank: int = 16,
    ) -> None:
        super().__init__(sparse_arch, feature_dims, dense_in_features, dense_arch_layer_sizes)
        self.dense_dim = dense_arch_layer_sizes[-1]
        self.over_arch_layer_sizes = list(over_arch_layer_sizes)
        self.num_layers, self.low_rank = num_layers, low_rank
        width = self.dense_dim + sum(self.feature_dims.values())
        self.crossnet = LowRankCrossNet(in_features=width, num_layers=num_layers, low_rank=low_rank)
        self.over_arch = OverArch(width, over_arch_layer_sizes)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Logits of shape (B, 1)."""
        dense, embs = self._dense_and_fields(dense_features, sparse_features)
        return self.over_arch(self.crossnet(torch.cat([dense] + embs, dim=1)))

    @torch.no_grad()
    def slice_inputs(self, kept: Mapping[str, torch.Tensor]) -> None:
        """Keeps only columns `kept[f]` of every layer that reads the concatenation.

        A coordinate that is zero in x_0 stays zero through every cross layer
        (x_{l+1} = x_0 * (W V x_l + b) + x_l), so removing it changes no output.
        """
        keep: List[torch.Tensor] = [torch.arange(self.dense_dim)]
        offset = self.dense_dim
        for f in self.features:
            idx = torch.as_tensor(kept.get(f, torch.arange(self.feature_dims[f])), dtype=torch.long)
            keep.append(idx + offset)
            offset += self.feature_dims[f]
            self.feature_dims[f] = int(idx.numel())
        cols = torch.cat(keep)
        device = self.crossnet.bias[0].device
        crossnet = LowRankCrossNet(in_features=int(cols.numel()), num_layers=self.num_layers, low_rank=self.low_rank).to(device)
        for layer in range(self.num_layers):
            crossnet.V_kernels[layer].copy_(self.crossnet.V_kernels[layer][:, cols])
            crossnet.W_kernels[layer].copy_(self.crossnet.W_kernels[layer][cols])
            crossnet.bias[layer].copy_(self.crossnet.bias[layer][cols])
        self.crossnet = crossnet
        self.over_arch = _over_arch_on_columns(self.over_arch, cols, self.over_arch_layer_sizes)


def _over_arch_on_columns(old: OverArch, cols: torch.Tensor, layer_sizes: List[int]) -> OverArch:
    """A new `OverArch` whose input is columns `cols` of `old`'s input, with `old`'s weights (the first layer's sliced).

    Only public API: the first `nn.Linear` in `modules()` order is the layer that reads the input,
    and a freshly built `OverArch` registers its parameters in the same order as `old`.
    """
    first = next(m for m in old.modules() if isinstance(m, nn.Linear)).weight
    new = OverArch(int(cols.numel()), layer_sizes, device=first.device)
    for target, source in zip(new.parameters(), old.parameters()):
        target.detach().copy_(source[:, cols] if source is first else source)
    return new


def build_head(
    head: str,
    sparse_arch: nn.Module,
    feature_dims: Dict[str, int],
    dense_in_features: int,
    dense_arch_layer_sizes: List[int],
    over_arch_layer_sizes: List[int],
    dcn_layers: int = 2,
    dcn_rank: int = 16,
    full_width: str = "identity",
    projected: Collection[str] = (),
) -> nn.Module:
    """The head named by `ModelConfig.head` ("dlrm" or "dcn") around `sparse_arch` (`full_width`, `projected`: the DLRM head's)."""
    if head == "dlrm":
        return MixedDimDLRM(sparse_arch, feature_dims, dense_in_features, dense_arch_layer_sizes, over_arch_layer_sizes,
                            full_width, projected)
    if head == "dcn":
        return MixedDimDCN(sparse_arch, feature_dims, dense_in_features, dense_arch_layer_sizes,
                           over_arch_layer_sizes, dcn_layers, dcn_rank)
    raise ValueError(f"unknown head {head!r} (dlrm or dcn)")


def find_head(model: nn.Module) -> Optional[nn.Module]:
    """The head inside a (possibly wrapped) model: the module that owns `slice_inputs`."""
    for m in model.modules():
        if isinstance(m, (MixedDimDLRM, MixedDimDCN)):
            return m
    return None
