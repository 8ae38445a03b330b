"""Retraining the compact model of a dims file, warm-started from the supernet or from scratch.

The compact model keeps each table at its kept dim (dropped tables are gone; their fields feed
zeros) and slices the head's projection / first-layer inputs to the kept columns. A warm start
reads the supernet's final checkpoint (DCP, see train/checkpoint.py) in one process,
assembles each table's kept columns from whatever shards hold them, and copies the dense and
head parameters before slicing them with `slice_inputs`. The supernet's 0/1 mask is folded into
the kept columns (a column that the legal rounding added but the search had masked starts at
zero), so before any update the compact model computes what the supernet computes with the mask
"kept and 1[a > 0]" (the same model the export reproduces).

The registry of search methods (`sharded_mde.dims.methods`) names, per dims file method, the function
that builds its compact model (`compact_ham` here for every column-kept method, PME its own), so a
search plugs in its own model without a new command.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed import DistributedModelParallel

from sharded_mde.config import RunConfig
from sharded_mde.io import atomic_write_json
from sharded_mde.modules.heads import find_head
from sharded_mde.modules.model import RecTrain, build_model
from sharded_mde.dims import DimsFile, load_dims
from sharded_mde.plan.tables import full_table_configs, plan_tables
from sharded_mde.search.registry import compact_builder
from sharded_mde.train.checkpoint import CONFIG, CheckpointReader, find_checkpoint, latest_checkpoint
from sharded_mde.train.state import copy_full_into, hard_gates, is_gate_key, table_of
from sharded_mde.train.distributed import DistEnv

if TYPE_CHECKING:
    from sharded_mde.data import DatasetMeta

WarmStart = Callable[[DistributedModelParallel], None]
CompactBuilder = Callable[[RunConfig, DimsFile, List[EmbeddingBagConfig], "DatasetMeta"],
                          Tuple[RecTrain, List[EmbeddingBagConfig], Optional[WarmStart]]]


def read_supernet(ckpt: str | Path, kept: Dict[str, Sequence[int]]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """(kept columns of each listed table, every replicated dense tensor) from a finished checkpoint.

    `ckpt` is a checkpoint directory or a `checkpoints/` root (its newest finished checkpoint).
    """
    d = find_checkpoint(ckpt)
    if d is None:
        raise FileNotFoundError(f"{ckpt}: no finished supernet checkpoint (run the search first, or retrain from "
                                "scratch with --set search.retrain_warm_start=false)")
    reader = CheckpointReader(d)
    cols = {n: torch.as_tensor(list(c), dtype=torch.long) for n, c in kept.items() if len(c)}
    out: Dict[str, torch.Tensor] = {}
    filled: Dict[str, int] = {n: 0 for n in cols}
    tables = reader.tables()
    for key, name in tables.items():
        if name not in cols:
            continue
        idx = cols[name]
        for (r0, c0), t in reader.pieces(key):
            if name not in out:
                out[name] = torch.zeros(reader.shape(key)[0], len(idx), dtype=t.dtype)
            inside = (idx >= c0) & (idx < c0 + t.shape[1])
            pos = inside.nonzero().squeeze(1)
            out[name][r0:r0 + t.shape[0], pos] = t[:, idx[pos] - c0]
            filled[name] += t.shape[0] * len(pos)
    for n, idx in cols.items():
        if n not in out or filled[n] != out[n].shape[0] * len(idx):
            raise ValueError(f"{reader.dir}: the checkpoint does not hold every kept column of table {n}")
    return out, reader.tensors([k for k in reader.keys if k not in tables])


def compact_ham(cfg: RunConfig, dims: DimsFile, full: List[EmbeddingBagConfig],
                meta: "DatasetMeta") -> Tuple[RecTrain, List[EmbeddingBagConfig], Optional[WarmStart]]:
    """Compact model of a column-kept dims file (HAM, baselines); warm start when configured and a checkpoint is named."""
    tables = plan_tables(dims, full)
    if not tables:
        raise ValueError("the dims file keeps no table (every table dropped)")
    ckpt = dims.supernet_checkpoints
    if not (cfg.search.retrain_warm_start and ckpt):
        return build_model(cfg.model, tables, meta.sparse_features, len(meta.dense_features)), tables, None
    kept = {t.name: t.kept_columns for t in dims.tables}
    weights, dense = read_supernet(ckpt, kept)
    masks = hard_gates(dense, full)
    dense = {k: v for k, v in dense.items() if not is_gate_key(k)}
    if masks is not None:  # fold the search's hard mask into the kept columns
        for name, w in weights.items():
            w.mul_(masks[name][torch.as_tensor(kept[name], dtype=torch.long)])
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    model = build_model(cfg.model, full, meta.sparse_features, len(meta.dense_features), sparse_arch=ebc)
    load_dense(model, dense)
    head = find_head(model)
    head.slice_inputs({f: torch.as_tensor(t.kept_columns, dtype=torch.long) for t in dims.tables for f in t.features})
    return model, tables, table_warm_start(weights)


def table_warm_start(weights: Dict[str, torch.Tensor]) -> WarmStart:
    """A warm start that copies whole tables (by name) into a DMP's (sharded) tables, leaving the rest as it is."""

    def warm(dmp: DistributedModelParallel) -> None:
        live = dmp.state_dict()
        src: Dict[str, Any] = {}
        for k, v in live.items():
            name = table_of(k)
            src[k] = weights[name] if name is not None else v
        copy_full_into(live, src)

    return warm


def load_dense(model: nn.Module, dense: Dict[str, torch.Tensor]) -> None:
    """Copies the supernet's dense tensors into the model's parameters and buffers of the same name and shape."""
    state = model.state_dict()
    missing = [k for k in state if table_of(k) is None and k not in dense]
    if missing:
        raise ValueError(f"supernet checkpoint lacks dense tensor {missing[0]} (different model config?)")
    with torch.no_grad():
        for k, v in state.items():
            if table_of(k) is not None:
                continue
            if dense[k].shape != v.shape:
                raise ValueError(f"supernet tensor {k} has shape {tuple(dense[k].shape)}, the model {tuple(v.shape)}")
            v.copy_(dense[k])


def train_record(cfg: RunConfig) -> Dict[str, Any]:
    """What makes two compact trainings of the same dims identical: the train and data config, the warm-start flag."""
    qat = {"qat_fraction": cfg.search.precision.qat_fraction} if cfg.search.precision.qat_fraction else {}
    return json.loads(json.dumps({"train": dataclasses.asdict(cfg.train), "data_dir": cfg.data.dir,
                                  "warm_start": cfg.search.retrain_warm_start,
                                  "retrain_embedding_lr": cfg.search.retrain_embedding_lr, **qat}))


def reuse_check(cfg: RunConfig, env: DistEnv, dims: DimsFile, stage: str) -> bool:
    """Copies the final checkpoint of HAM's check training of the returned allocation into
    `<stage>/checkpoints` when it was trained exactly as this retrain would train it, so the
    retrain resumes at its end instead of training the same model again; returns whether it did."""
    src = dims.check.winner_checkpoints if dims.check else None
    if not src or dims.check.winner_trained_as != train_record(cfg):
        return False
    last = latest_checkpoint(src)
    dst = Path(cfg.run_dir) / stage / "checkpoints"
    record = Path(src) / CONFIG  # the training config the checkpoint was made with (the resume guard reads it)
    reuse = last is not None and record.is_file() and latest_checkpoint(dst) is None
    if dist.is_initialized():
        dist.barrier()  # every rank has decided before rank 0 writes (a late rank would see the copy and train)
    if not reuse:
        return False
    if env.is_main:
        shutil.copytree(last, dst / last.name)
        shutil.copy2(record, dst / CONFIG)
    if dist.is_initialized():
        dist.barrier()
    return True


def train_compact(cfg: RunConfig, env: DistEnv, dims: DimsFile, stage: str) -> Tuple[Dict[str, Any], bool]:
    """Trains the compact model of `dims` in `<run_dir>/<stage>/`; (train_stage's metrics, warm-started?)."""
    from sharded_mde.search.precision import served_metrics

    trainer, metrics, warm = compact_trainer(cfg, env, dims, stage)
    return served_metrics(trainer, dims, metrics), warm  # per-table dtypes: scored as served


def compact_trainer(cfg: RunConfig, env: DistEnv, dims: DimsFile, stage: str) -> Tuple[Any, Dict[str, Any], bool]:
    """(trainer, fp32 metrics, warm-started?) of the compact model of `dims` trained in `<run_dir>/<stage>/`:
    the trainer stays live for scoring it further (the joint search over PME groups measures it)."""
    from sharded_mde.data import DatasetMeta
    from sharded_mde.search.precision import qat_callbacks
    from sharded_mde.train.run import train_stage

    meta = DatasetMeta.load(cfg.data.dir)
    torch.manual_seed(cfg.train.seed)  # a from-scratch compact model starts the same in every run
    build: CompactBuilder = compact_builder(dims.method)
    model, tables, warm = build(cfg, dims, full_table_configs(cfg), meta)
    if dims.data_dir:  # the search renumbered the ids (PME): train on its copy of the data
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=dims.data_dir))
    if cfg.search.retrain_embedding_lr:  # every method's compact model alike
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, embedding_lr=cfg.search.retrain_embedding_lr))
    trainer, metrics = train_stage(cfg, env, stage, model=model, tables=tables, warm_start=warm,
                                   callbacks=qat_callbacks(cfg, dims) or None)
    return trainer, metrics, warm is not None


def run_retrain(cfg: RunConfig, env: DistEnv, dims_path: str | Path, stage: Optional[str] = None) -> Dict[str, Any]:
    """Trains the compact model of `dims_path` in `<run_dir>/<stage>/` and returns its metrics."""
    full = full_table_configs(cfg)
    dims = load_dims(dims_path, full)
    compact_builder(dims.method, str(dims_path))  # an unknown method fails before any work
    stage = stage or f"retrain_{dims.method}"
    reused = reuse_check(cfg, env, dims, stage)
    metrics, warm = train_compact(cfg, env, dims, stage)
    summary = {"dims_file": str(dims_path), "method": dims.method, "init": "warm" if warm else "scratch",
               "budget_fraction": dims.budget_fraction, "budget_bytes": dims.budget_bytes,
               "kept_bytes": dims.kept_bytes, "full_bytes": dims.full_bytes, "test": metrics["test"],
               "valid": metrics["valid"], "steps": metrics["steps"], "train_seconds": metrics["train_seconds"],
               "reused_check_training": reused, **{k: metrics[k] for k in ("served_dtypes", "fp32") if k in metrics}}
    if env.is_main:
        atomic_write_json(Path(cfg.run_dir) / stage / "retrain.json", summary)
    return summary
