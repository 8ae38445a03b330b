"""Wrapping a model in DistributedModelParallel with fused FBGEMM table optimizers.

Tables train with an optimizer fused into the TBE backward (row-wise Adagrad by default); dense
parameters (heads, masks, projections) with Adam through TorchRec's KeyedOptimizerWrapper.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DataParallelWrapper
from torchrec.distributed.types import ShardingEnv
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from sharded_mde.config import TrainConfig

EMBEDDING_OPTIMIZERS = {
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "sgd": EmbOptimType.EXACT_SGD,
}


def fused_params(cfg: TrainConfig) -> Dict[str, Any]:
    """FBGEMM fused-optimizer parameters for the table sharder."""
    params: Dict[str, Any] = {"optimizer": EMBEDDING_OPTIMIZERS[cfg.embedding_optimizer], "learning_rate": cfg.embedding_lr}
    if cfg.embedding_optimizer != "sgd":
        params["eps"] = 1e-8
    return params


def make_sharder(cfg: TrainConfig) -> EmbeddingBagCollectionSharder:
    """TorchRec's stock EBC sharder with our fused optimizer."""
    return EmbeddingBagCollectionSharder(fused_params=fused_params(cfg))


def ebc_path(model: nn.Module) -> str:
    """Dotted path of the (single) EmbeddingBagCollection inside `model` (plans are keyed by it)."""
    found = [name for name, m in model.named_modules() if isinstance(m, EmbeddingBagCollection)]
    if len(found) != 1:
        raise ValueError(f"expected exactly one EmbeddingBagCollection in the model, found {found}")
    return found[0]


class _OneRankDense(DataParallelWrapper):
    """Leaves the dense part unwrapped (one CPU rank): DDP's gradient all-reduce over one process is the
    identity but still costs a gloo call and its hooks every step (about 6% of the step's CPU time)."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        """Nothing to wrap."""


def wrap_model(model: nn.Module, plan: ShardingPlan, cfg: TrainConfig, device: torch.device) -> DistributedModelParallel:
    """DistributedModelParallel over `model` with `plan` and the fused sharder (the dense part in DDP,
    except on one CPU rank, where DDP would do nothing but cost time)."""
    one_cpu_rank = device.type == "cpu" and (not dist.is_initialized() or dist.get_world_size() == 1)
    return DistributedModelParallel(model, device=device, plan=plan, sharders=[make_sharder(cfg)],
                                    data_parallel_wrapper=_OneRankDense() if one_cpu_rank else None)


def make_optimizer(dmp: DistributedModelParallel, cfg: TrainConfig) -> CombinedOptimizer:
    """Fused table optimizer + Adam/SGD for every parameter not trained in backward."""
    dense = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    if cfg.dense_optimizer == "adam":
        dense_opt = KeyedOptimizerWrapper(dense, lambda ps: torch.optim.Adam(ps, lr=cfg.dense_lr))
    else:
        dense_opt = KeyedOptimizerWrapper(dense, lambda ps: torch.optim.SGD(ps, lr=cfg.dense_lr))
    return CombinedOptimizer([dmp.fused_optimizer, dense_opt])


def unwrap(dmp: nn.Module) -> nn.Module:
    """The user's model inside DMP (and its DDP wrapper)."""
    module = dmp.module if isinstance(dmp, DistributedModelParallel) else dmp
    return getattr(module, "module", module) if isinstance(module, nn.parallel.DistributedDataParallel) else module

