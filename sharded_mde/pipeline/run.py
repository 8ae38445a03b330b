"""`sharded-mde run CONFIG`: data -> baseline -> search -> plan -> retrain -> export -> serve-check -> summary.

Every stage writes its outputs into the run directory and is recorded in `stages.json` when it
finishes; re-running skips recorded stages and resumes an interrupted one from its checkpoints.
Training stages run on every rank (collectives); file-only stages run on rank 0 behind barriers.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch.distributed as dist

from sharded_mde.config import RunConfig
from sharded_mde.pipeline.ledger import StageLedger, config_fingerprint
from sharded_mde.train.distributed import DistEnv

StageFn = Callable[[RunConfig, DistEnv, StageLedger], Dict[str, Any]]


def _barrier(env: DistEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def _broadcast(env: DistEnv, obj: Any) -> Any:
    """Rank 0's value of `obj` on every rank."""
    if env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def run_pipeline(cfg: RunConfig, env: DistEnv, stages: List[Tuple[str, StageFn, bool]]) -> Dict[str, Any]:
    """Runs `stages` [(name, fn, collective)] in order, skipping those the ledger records as done."""
    ledger = StageLedger(cfg.run_dir, config_fingerprint(asdict(cfg)))
    for name, fn, collective in stages:
        if ledger.done(name):
            if env.is_main:
                print(f"[run] {name}: done earlier, skipped", flush=True)
            continue
        if env.is_main:
            print(f"[run] {name} ...", flush=True)
        t0 = time.perf_counter()
        if collective:
            outputs = fn(cfg, env, ledger)
        else:
            outputs = fn(cfg, env, ledger) if env.is_main else None
            outputs = _broadcast(env, outputs)
        _barrier(env)
        if env.is_main:
            ledger.record(name, outputs, time.perf_counter() - t0)
        else:
            ledger.stages[name] = {"outputs": outputs}
        _barrier(env)
    return ledger.stages


def run_dir(cfg: RunConfig) -> Path:
    """The run directory as a Path."""
    return Path(cfg.run_dir)
