"""FBGEMM TBE forward and backward time of table sets (full vs compact) on a CUDA device.

Every table set becomes one `SplitTableBatchedEmbeddingBagsCodegen` (FBGEMM's fused table-batched
embedding bag, the kernel TorchRec's fused EBC runs) in device memory with the run's row-wise
Adagrad or SGD applied inside backward, as in training. The batch has one id per field per example
(Criteo-shaped), drawn uniformly from each table's rows, seeded per table name.
Mixed dims are native to the TBE (each table its own dim, a multiple of 4).
"""

from __future__ import annotations

import zlib
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torchrec import EmbeddingBagConfig

from sharded_mde.bench.common import median_time
from sharded_mde.dims import table_bytes


def _optimizer(name: str) -> Any:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    kinds = {"rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
             "sgd": EmbOptimType.EXACT_SGD}
    if name not in kinds:
        raise ValueError(f"train.embedding_optimizer {name!r}: the TBE benchmark knows {', '.join(kinds)}")
    return kinds[name]


def build_tbe(tables: Sequence[EmbeddingBagConfig], device: torch.device, optimizer: str = "rowwise_adagrad",
              lr: float = 0.05) -> torch.nn.Module:
    """One fused TBE over `tables` (sum pooling, weights in device memory, the optimizer fused into backward)."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice,
        SplitTableBatchedEmbeddingBagsCodegen,
    )

    cuda = device.type == "cuda"
    specs = [(t.num_embeddings, t.embedding_dim, EmbeddingLocation.DEVICE if cuda else EmbeddingLocation.HOST,
              ComputeDevice.CUDA if cuda else ComputeDevice.CPU) for t in tables]
    return SplitTableBatchedEmbeddingBagsCodegen(specs, optimizer=_optimizer(optimizer), learning_rate=lr,
                                                 pooling_mode=PoolingMode.SUM, device=device)


def tbe_inputs(tables: Sequence[EmbeddingBagConfig], batch: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """(indices, offsets): one uniform id per table per example, tables in order (the TBE's layout).

    Each table's ids are seeded by its name, so a table kept in the compact set sees the same ids.
    """
    ids = [torch.randint(0, t.num_embeddings, (batch,), generator=torch.Generator().manual_seed(zlib.crc32(t.name.encode())))
           for t in tables]
    return torch.cat(ids).to(device), torch.arange(len(tables) * batch + 1, device=device)


def tbe_times(table_sets: Dict[str, List[EmbeddingBagConfig]], batch: int, device: torch.device, repeats: int,
              optimizer: str = "rowwise_adagrad", lr: float = 0.05) -> Dict[str, Any]:
    """Median forward and forward+backward ms and the bytes of every table set (dropped tables are absent)."""
    out: Dict[str, Any] = {"batch": batch, "ids_per_example_per_field": 1, "optimizer": optimizer}
    for name, tables in table_sets.items():
        indices, offsets = tbe_inputs(tables, batch, device)
        tbe = build_tbe(tables, device, optimizer, lr)
        grad = torch.ones(batch, sum(t.embedding_dim for t in tables), device=device)
        fwd = median_time(lambda: tbe(indices, offsets), repeats)
        fwd_bwd = median_time(lambda: tbe(indices, offsets).backward(grad), repeats)
        out[name] = {"tables": len(tables), "dims_sum": sum(t.embedding_dim for t in tables),
                     "bytes": sum(table_bytes(t.num_embeddings, t.embedding_dim, "fp32", optimizer).total for t in tables),
                     "forward_ms": 1000 * fwd, "forward_backward_ms": 1000 * fwd_bwd,
                     "backward_ms": 1000 * (fwd_bwd - fwd)}
        del tbe
    return out
