"""One training stage end to end: plan, shard, (warm start), train, evaluate, write metrics.

Used by `sharded-mde train` (the full-dimension baseline), by the searches (the supernet) and by
`retrain` (the compact model); each stage writes into its own directory of the run.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torchrec import EmbeddingBagConfig
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.types import ShardingPlan

from sharded_mde.config import PlanConfig, RunConfig
from sharded_mde.data.batches import DatasetMeta
from sharded_mde.io import atomic_write_json
from sharded_mde.modules.model import RecTrain, build_model
from sharded_mde.plan.sharding import load_plan, manual_plan, plan_sharding
from sharded_mde.plan.tables import full_table_configs, mean_bag_lengths
from sharded_mde.train.checkpoint import config_fingerprint, guard_config
from sharded_mde.train.distributed import DistEnv
from sharded_mde.train.sharding import ebc_path, wrap_model
from sharded_mde.train.trainer import Callback, Trainer, TrainResult


def sharding_plan(model: nn.Module, tables: List[EmbeddingBagConfig], cfg: RunConfig, env: DistEnv) -> ShardingPlan:
    """The plan to train with: a saved plan file, a manual plan kind, or TorchRec's planner on this cluster."""
    path = ebc_path(model)
    if cfg.train.plan_file:
        saved = load_plan(cfg.train.plan_file, tables, world_size=env.world_size)
        # A saved plan has one embedding module; re-key it to where this model keeps its EBC.
        return ShardingPlan({path: next(iter(saved.plan.values()))})
    if cfg.train.sharding != "planner":
        return manual_plan(tables, cfg.train.sharding, env.world_size, device_type=env.device.type, module_fqn=path)
    here = PlanConfig(world_size=env.world_size, compute_device=env.device.type,
                      local_world_size=env.local_world_size, batch_size=cfg.train.batch_size)
    plan, _ = plan_sharding(tables, here, optimizer=cfg.train.embedding_optimizer, module_fqn=path,
                            bag_lengths=mean_bag_lengths(cfg))
    return plan


def train_stage(
    cfg: RunConfig,
    env: DistEnv,
    stage: str,
    model: Optional[RecTrain] = None,
    tables: Optional[List[EmbeddingBagConfig]] = None,
    callbacks: Optional[List[Callback]] = None,
    warm_start: Optional[Callable[[DistributedModelParallel], None]] = None,
) -> tuple[Trainer, Dict[str, Any]]:
    """Trains `model` (default: the full-dimension model) in `<run_dir>/<stage>/` and scores the test split."""
    meta = DatasetMeta.load(cfg.data.dir)
    tables = tables if tables is not None else full_table_configs(cfg)
    torch.manual_seed(cfg.train.seed)  # the same initialisation in every run (and on every rank)
    if model is None:
        model = build_model(cfg.model, tables, meta.sparse_features, len(meta.dense_features))
    out = Path(cfg.run_dir) / stage
    torch.manual_seed(cfg.train.seed + 1)  # tables are materialised by DMP from the meta device: seeded too
    dmp = wrap_model(model, sharding_plan(model, tables, cfg, env), cfg.train, env.device)
    # Never resume checkpoints of another config (a search also depends on its search section).
    inputs = ("data", "model", "train", "search") if callbacks else ("data", "model", "train")
    guard_config(out / "checkpoints", config_fingerprint(cfg, inputs, [(t.name, t.num_embeddings, t.embedding_dim)
                                                                        for t in tables]), env.is_main)
    trainer = Trainer(dmp, cfg.train, env, cfg.data.dir, out / "checkpoints", callbacks)
    if not trainer.try_resume() and warm_start is not None:
        warm_start(dmp)
    t0 = time.perf_counter()
    result: TrainResult = trainer.fit()
    test = trainer.evaluate("test")
    metrics = {
        "stage": stage,
        "test": test,
        "valid": result.valid,
        "history": result.history,
        "steps": result.steps,
        "examples_per_s": result.examples_per_s,
        "steady_examples_per_s": result.steady_examples_per_s,
        "train_seconds": result.train_seconds,
        "wall_seconds": time.perf_counter() - t0,
        "world_size": env.world_size,
        "tables": [{"name": t.name, "rows": t.num_embeddings, "dim": t.embedding_dim} for t in tables],
        "train_config": asdict(cfg.train),
    }
    if env.is_main:
        atomic_write_json(out / "metrics.json", metrics)
    return trainer, metrics
