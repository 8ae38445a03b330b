"""The serving module: dense features + KJT in, logits out, traceable with TorchRec's fx and scriptable.

`ServingModel` wraps a head from `modules.heads` built around the exported (possibly quantised)
EBC. The heads' training forward decides per call which features have embeddings (dropped fields
read zeros); TorchScript and fx cannot follow that, so the serving forward fixes the layout when it
is built and then runs the head's own layers in the head's order, which gives the same numbers.
No `from __future__ import annotations` here: fx copies the forward's annotations into generated
code that TorchScript must resolve, which fails for string annotations.
"""

import time
from typing import List, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sharded_mde.modules.heads import MixedDimDCN, MixedDimDLRM


class ServingModel(nn.Module):
    """Logits (B,) of a mixed-dimension DLRM or DCN head over an EBC or a quantised EBC."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        if not isinstance(head, (MixedDimDLRM, MixedDimDCN)):
            raise ValueError(f"ServingModel: unsupported head {type(head).__name__} (MixedDimDLRM or MixedDimDCN)")
        self.head = head
        self.kind = "dlrm" if isinstance(head, MixedDimDLRM) else "dcn"
        self.features: List[str] = list(head.features)
        self.present: List[str] = [f for f in head.features if head.feature_dims[f] > 0]

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Logits for a batch; `sparse_features` may hold more keys than the tables read."""
        head = self.head
        dense = head.dense_arch(dense_features)
        emb = head.sparse_arch(sparse_features).to_dict()
        if self.kind == "dlrm":
            projected = torch.stack(
                [head.projections[f](emb[f]) if f in self.present else dense.new_zeros(dense.shape)
                 for f in self.features], dim=1)
            logits = head.over_arch(head.inter_arch(dense, projected))
        else:
            logits = head.over_arch(head.crossnet(torch.cat([dense] + [emb[f] for f in self.present], dim=1)))
        return logits.squeeze(-1)


def script(model: ServingModel) -> torch.jit.ScriptModule:
    """TorchRec's fx trace of the serving model, then TorchScript (the form C++ serving loads)."""
    from torchrec.fx import symbolic_trace

    return torch.jit.script(symbolic_trace(model))


Request = Tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor, int]  # dense, sparse, labels, valid rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def score(model: nn.Module, requests: Sequence[Request], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(logits, labels, seconds) over requests already on `device`; only the model calls are timed."""
    _sync(device)
    t0 = time.perf_counter()
    outputs = [model(dense, sparse) for dense, sparse, _, _ in requests]
    _sync(device)
    seconds = time.perf_counter() - t0
    logits = torch.cat([out[:n].cpu() for out, (_, _, _, n) in zip(outputs, requests)])
    labels = torch.cat([lab[:n].cpu() for _, _, lab, n in requests])
    return logits, labels, seconds
