"""The serving module: dense features + KJT in, logits out, traceable with TorchRec's fx and scriptable.

`ServingModel` wraps a head from `modules.heads` built around the exported (possibly quantised)
EBC; the heads fix at construction which fields have tables, so TorchRec's fx tracer and
TorchScript follow their forward. No `from __future__ import annotations` here: fx copies the
forward's annotations into generated code that TorchScript must resolve, which fails for strings.
"""

import time
from typing import Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sharded_mde.modules.token_groups import GroupCombiner, TokenGroupRouter


class ServingModel(nn.Module):
    """Logits (B,) of a mixed-dimension DLRM or DCN head over an EBC or a quantised EBC."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Logits for a batch; `sparse_features` may hold more keys than the tables read."""
        return self.head(dense_features, sparse_features).squeeze(-1)


# Modules the fx trace keeps whole (TorchScript compiles them as they are): the PME token-group router
# rewrites the KJT with data-dependent checks, and the combiner sums groups per field.
LEAF_MODULES = [TokenGroupRouter.__name__, GroupCombiner.__name__]


def script(model: ServingModel) -> torch.jit.ScriptModule:
    """TorchRec's fx trace of the serving model, then TorchScript (the form C++ serving loads)."""
    from torchrec.fx import symbolic_trace

    return torch.jit.script(symbolic_trace(model, leaf_modules=LEAF_MODULES))


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
