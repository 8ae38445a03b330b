"""The magnitude baseline: keep the columns of the trained full model with the largest L2 norm.

Score of column c of table t: ||E_t[:, c]||_2 over all rows, read shard by shard from the
baseline's checkpoint (any world size and sharding: row-wise shards add their
squared sums, column-wise shards fill their columns). Columns are kept by score per byte under
the budget (scored_columns); `retrain` warm-starts from them or trains from scratch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from torchrec import EmbeddingBagConfig

from sharded_mde.config import RunConfig
from sharded_mde.dims import DimsFile
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.scored_columns import baseline_checkpoint, save_scored_dims
from sharded_mde.train.checkpoint import CheckpointReader
from sharded_mde.train.distributed import DistEnv

BLOCK_ROWS = 1 << 16  # rows squared at a time (bounds the float64 copy of a shard)


def column_norms(checkpoint: str | Path, tables: Sequence[EmbeddingBagConfig]) -> Dict[str, torch.Tensor]:
    """L2 norm over rows of every column of every table (float64), from a finished checkpoint's shards."""
    reader = CheckpointReader(checkpoint)
    d = reader.dir
    sq = {t.name: torch.zeros(t.embedding_dim, dtype=torch.float64) for t in tables}
    covered = {t.name: 0 for t in tables}
    shapes = {t.name: (t.num_embeddings, t.embedding_dim) for t in tables}
    for key, name in reader.tables().items():
        if name not in sq:
            continue
        for (r0, c0), w in reader.pieces(key):
            rows, dim = shapes[name]
            if r0 + w.shape[0] > rows or c0 + w.shape[1] > dim:
                raise ValueError(f"{d}: table {name} has a shard at {[r0, c0]} of {tuple(w.shape)} outside its "
                                 f"{rows} x {dim} in the config (another data or model config?)")
            for b in range(0, w.shape[0], BLOCK_ROWS):
                sq[name][c0:c0 + w.shape[1]] += w[b:b + BLOCK_ROWS].double().pow(2).sum(0)
            covered[name] += w.numel()
    for name, (rows, dim) in shapes.items():
        if covered[name] != rows * dim:
            raise ValueError(f"{d}: the checkpoint holds {covered[name]} of the {rows * dim} weights of table {name}")
    return {n: v.sqrt() for n, v in sq.items()}


def run_magnitude(cfg: RunConfig, env: DistEnv, stage: str = "magnitude",
                  ranks: Optional[Dict[str, int]] = None) -> DimsFile:
    """Scores the baseline's columns by L2 norm and writes the dims file to `<run_dir>/<stage>/`."""
    ckpt = baseline_checkpoint(cfg, env)
    norms = column_norms(ckpt, full_table_configs(cfg))
    return save_scored_dims("magnitude", cfg, env, stage, norms, ckpt, ranks,
                            {"score": "L2 norm of the column over rows"})
