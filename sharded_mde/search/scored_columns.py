"""What the magnitude and saliency baselines share: the trained full model, and columns kept by score.

Both score every (table, column) of the full-dimension baseline model (`sharded-mde train`,
stage `baseline`), reused when that stage finished and trained here otherwise, then keep the
highest-scoring columns under the byte budget with `select_dims` (value per byte, legal dims,
every field at least 4 columns and at most its row cap, never above the budget, within one
4-column step of it; no field is dropped). The dims file names the scored
checkpoint (`supernet_checkpoints`), so `retrain` warm-starts from its kept columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from sharded_mde.config import RunConfig
from sharded_mde.dims import DimsFile, check_feasible
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.budget import make_dims_file, select_dims
from sharded_mde.search.report import save_search_result
from sharded_mde.train.checkpoint import latest_checkpoint
from sharded_mde.train.distributed import DistEnv

BASELINE_STAGE = "baseline"  # the stage `sharded-mde train` writes by default
WEIGHT_DTYPE = "fp32"  # tables train in fp32


def baseline_checkpoint(cfg: RunConfig, env: DistEnv) -> Path:
    """The full-dimension baseline's final checkpoint in `<run_dir>/baseline/`, training it first if unfinished.

    An infeasible budget (`check_feasible`) fails here, before any training.
    """
    check_feasible(full_table_configs(cfg), cfg.search.budget, WEIGHT_DTYPE, cfg.train.embedding_optimizer,
                   method=cfg.search.method)
    stage = Path(cfg.run_dir) / BASELINE_STAGE
    found = latest_checkpoint(stage / "checkpoints")
    if found is None or not (stage / "metrics.json").is_file():
        from sharded_mde.train.run import train_stage

        train_stage(cfg, env, BASELINE_STAGE)
        found = latest_checkpoint(stage / "checkpoints")
    if found is None:
        raise FileNotFoundError(f"{stage / 'checkpoints'}: the baseline run left no finished checkpoint")
    return found


def save_scored_dims(method: str, cfg: RunConfig, env: DistEnv, stage: str, scores: Mapping[str, torch.Tensor],
                     checkpoint: Path, ranks: Optional[Dict[str, int]], extra: Dict[str, Any]) -> DimsFile:
    """Keeps the best columns by score under the budget; rank 0 writes `<run_dir>/<stage>/` dims.json and PNG."""
    tables = full_table_configs(cfg)
    optimizer = cfg.train.embedding_optimizer
    kept = select_dims(scores, tables, cfg.search.budget, (), WEIGHT_DTYPE, optimizer)
    extra = {**extra, "scores": {n: [float(f"{float(x):.6g}") for x in v] for n, v in scores.items()}}
    dims = make_dims_file(method, tables, kept, cfg.search.budget, WEIGHT_DTYPE, optimizer, extra,
                          supernet_checkpoints=str(checkpoint))  # retrain warm-starts from the scored model
    if env.is_main:
        save_search_result(Path(cfg.run_dir) / stage, dims, None, ranks)
    return dims
