"""The trainable model: a head around a sparse module, with the BCE loss TorchRec pipelines expect.

`RecTrain.forward(batch)` returns `(loss, (loss, logits, labels))` like TorchRec's `DLRMTrain`, and
adds the auxiliary losses (search regularisers) of any submodule that defines `auxiliary_loss()`.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch

from sharded_mde.config import ModelConfig
from sharded_mde.modules.heads import build_head


class RecTrain(nn.Module):
    """BCE-with-logits training wrapper; sums `auxiliary_loss()` of submodules into the loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = nn.BCEWithLogitsLoss()
        self._aux_modules: List[nn.Module] = [m for m in model.modules() if hasattr(m, "auxiliary_loss")]

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        logits = self.model(batch.dense_features, batch.sparse_features).squeeze(-1)
        loss = self.loss_fn(logits, batch.labels.float())
        total = loss
        for m in self._aux_modules:
            aux = m.auxiliary_loss()
            if aux is not None:
                total = total + aux
        return total, (loss.detach(), logits.detach(), batch.labels.detach())


def feature_dims_of(tables: List[EmbeddingBagConfig], features: List[str]) -> Dict[str, int]:
    """Pooled output width per feature, in `features` order; 0 for features without a table."""
    dims = {f: 0 for f in features}
    for t in tables:
        for f in t.feature_names:
            if f not in dims:
                raise ValueError(f"table {t.name}: feature {f!r} is not a sparse feature of the data")
            dims[f] = t.embedding_dim
    return dims


def build_model(
    cfg: ModelConfig,
    tables: List[EmbeddingBagConfig],
    features: List[str],
    dense_in_features: int,
    sparse_arch: Optional[nn.Module] = None,
    device: torch.device = torch.device("meta"),
) -> RecTrain:
    """RecTrain(head(sparse_arch)); the sparse arch defaults to a plain EBC on `device`.

    Build on the meta device and let DistributedModelParallel materialise the tables where they
    are placed; the dense head is built on the CPU and moved by DMP.
    """
    sparse = sparse_arch if sparse_arch is not None else EmbeddingBagCollection(tables=tables, device=device)
    head = build_head(cfg.head, sparse, feature_dims_of(tables, features), dense_in_features,
                      list(cfg.dense_arch), list(cfg.over_arch), cfg.dcn_layers, cfg.dcn_rank, cfg.full_width)
    return RecTrain(head)
