"""The saliency baseline: single-shot first-order saliency of each column of the trained full model.

Score of column c of table t: sum over `search.saliency_batches` training batches of
|sum over rows i of E[i, c] * dL/dE[i, c]|, the first-order change of the loss when the column is
zeroed. Fused TBE kernels never expose a table's gradient, so it is taken from the pooled output:
with sum (or mean, or weighted) pooling, sum_i E[i, c] dL/dE[i, c] = sum over bags b of
pooled[b, c] dL/dpooled[b, c]. Each rank computes that for its batch, the ranks' sums are
averaged (the global batch's gradient, as DMP trains) and the absolute value is taken per global
batch. Columns are kept by score per byte under the budget (scored_columns).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.distributed import DistributedModelParallel
from tqdm import tqdm

from sharded_mde.config import RunConfig
from sharded_mde.modules.model import build_model
from sharded_mde.dims import DimsFile
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.pme_score import PooledCapture
from sharded_mde.search.retrain import load_dense, read_supernet, table_warm_start
from sharded_mde.search.scored_columns import baseline_checkpoint, save_scored_dims
from sharded_mde.train.distributed import DistEnv
from sharded_mde.train.sharding import unwrap, wrap_model


def column_saliency(model: nn.Module, tables: List[EmbeddingBagConfig], batches: Iterable[Batch], num_batches: int,
                    device: torch.device, progress: bool = True) -> Dict[str, torch.Tensor]:
    """Per table column: sum over batches of |sum_b pooled[b, c] dL/dpooled[b, c]| (float64), ranks' batches as one.

    `model` (a RecTrain, DMP-wrapped or not) must hold its sparse arch in exactly one PooledCapture.
    """
    capture = PooledCapture.find(model, "saliency scoring")
    world = dist.get_world_size() if dist.is_initialized() else 1
    net = unwrap(model)  # DDP would wait for parameter gradients that scoring never computes
    acc = torch.zeros(sum(t.embedding_dim for t in tables), dtype=torch.float64, device=device)
    bar = tqdm(total=num_batches, desc="saliency", unit="batch",
               disable=not (progress and (not dist.is_initialized() or dist.get_rank() == 0)), dynamic_ncols=True)
    for done, batch in enumerate(batches, 1):
        loss, _ = net(batch.to(device))
        pooled = capture.last
        (grad,) = torch.autograd.grad(loss, pooled.values())
        per_column = (pooled.values().detach().double() * grad.double()).sum(0)
        per_feature = dict(zip(pooled.keys(), torch.split(per_column, pooled.length_per_key())))
        step = torch.cat([sum((per_feature[f] for f in t.feature_names if f in per_feature),
                              torch.zeros(t.embedding_dim, dtype=torch.float64, device=device)) for t in tables])
        if world > 1:
            dist.all_reduce(step)
            step /= world
        acc += step.abs()
        capture.last = None
        bar.update(1)
        if done >= num_batches:
            break
    bar.close()
    return dict(zip([t.name for t in tables], torch.split(acc.cpu(), [t.embedding_dim for t in tables])))


def trained_scorer(cfg: RunConfig, env: DistEnv, tables: List[EmbeddingBagConfig], features: List[str], dense_in: int,
                   checkpoint: Path) -> DistributedModelParallel:
    """The run's model with the checkpoint's weights (any world size or plan), its EBC in a PooledCapture, under DMP."""
    from sharded_mde.train.run import sharding_plan

    weights, dense = read_supernet(checkpoint, {t.name: range(t.embedding_dim) for t in tables})
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    model = build_model(cfg.model, tables, features, dense_in, sparse_arch=PooledCapture(ebc))
    load_dense(model, dense)
    dmp = wrap_model(model, sharding_plan(model, tables, cfg, env), cfg.train, env.device)
    table_warm_start(weights)(dmp)
    return dmp


def run_saliency(cfg: RunConfig, env: DistEnv, stage: str = "saliency",
                 ranks: Optional[Dict[str, int]] = None) -> DimsFile:
    """Scores the baseline's columns by saliency on the first training batches and writes `<run_dir>/<stage>/`."""
    from sharded_mde.data import DatasetMeta, num_batches
    from sharded_mde.search.pme_data import scoring_batches

    ckpt = baseline_checkpoint(cfg, env)
    meta = DatasetMeta.load(cfg.data.dir)
    tables = full_table_configs(cfg)
    dmp = trained_scorer(cfg, env, tables, meta.sparse_features, len(meta.dense_features), ckpt)
    n = min(cfg.search.saliency_batches, num_batches(cfg.data.dir, "train", cfg.train.batch_size, env.world_size))
    if n < 1:
        raise ValueError(f"{cfg.data.dir}: the train split has no full batch of {cfg.train.batch_size} rows per rank "
                         "to score saliency on (lower train.batch_size)")
    batches = scoring_batches(cfg.data.dir, cfg.train.batch_size, n, env.rank, env.world_size)
    scores = column_saliency(dmp, tables, batches, n, env.device, cfg.train.progress)
    return save_scored_dims("saliency", cfg, env, stage, scores, ckpt, ranks,
                            {"score": "sum over batches of |sum_b pooled[b, c] * dL/dpooled[b, c]|",
                             "saliency_batches": n})
