"""`sharded-mde run CONFIG`: data -> baseline -> search -> plan -> retrain -> export -> serve-check -> summary.

Every stage writes its outputs into the run directory and is recorded in `stages.json` when it
finishes, with the fingerprint of the config sections it reads; re-running skips recorded stages
whose config is unchanged, reruns a changed one and every stage after it, and resumes an
interrupted one from its checkpoints. OS errors name the stage that met them.
Training stages run on every rank (collectives); file-only stages run on rank 0 behind barriers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch.distributed as dist

from sharded_mde.config import RunConfig
from sharded_mde.interrupts import raise_if_pending
from sharded_mde.io import describe_os_error
from sharded_mde.pipeline.ledger import StageLedger
from sharded_mde.train.checkpoint import config_fingerprint
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


def _call(name: str, fn: StageFn, cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
    """`fn`, with an OS error (permissions, read-only or full disk) turned into one line naming the stage."""
    try:
        return fn(cfg, env, ledger)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(describe_os_error(e, f"running stage {name}", cfg.run_dir)) from None


# The config sections a stage reads when `run_pipeline` is not told (training stages).
DEFAULT_INPUTS = ("data", "model", "train")


def run_pipeline(cfg: RunConfig, env: DistEnv, stages: List[Tuple[str, StageFn, bool]],
                 inputs: Optional[Mapping[str, Sequence[str]]] = None) -> Dict[str, Any]:
    """Runs `stages` [(name, fn, collective)] in order, skipping those the ledger records for the same config.

    `inputs` names the config sections each stage reads (its fingerprint; default `DEFAULT_INPUTS`).
    """
    ledger = StageLedger(cfg.run_dir)
    fingerprints = {name: config_fingerprint(cfg, (inputs or {}).get(name, DEFAULT_INPUTS)) for name, _, _ in stages}
    stale = ledger.changed(fingerprints)
    if stale and env.is_main:
        print(f"[run] config changed since {stale[0]}: running {', '.join(stale)} again", flush=True)
        ledger.forget(stale)
    _barrier(env)
    for n in stale:
        ledger.stages.pop(n, None)
    for name, fn, collective in stages:
        raise_if_pending()
        if ledger.done(name):
            if env.is_main:
                print(f"[run] {name}: done earlier, skipped", flush=True)
            continue
        if env.is_main:
            print(f"[run] {name} ...", flush=True)
        t0 = time.perf_counter()
        if collective:
            outputs = _call(name, fn, cfg, env, ledger)
        else:
            outputs = _call(name, fn, cfg, env, ledger) if env.is_main else None
            outputs = _broadcast(env, outputs)
        _barrier(env)
        if env.is_main:
            ledger.record(name, outputs, time.perf_counter() - t0, fingerprints[name])
        else:
            ledger.stages[name] = {"outputs": outputs}
        _barrier(env)
    return ledger.stages


def run_dir(cfg: RunConfig) -> Path:
    """The run directory as a Path."""
    return Path(cfg.run_dir)
