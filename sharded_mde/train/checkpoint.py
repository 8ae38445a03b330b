"""Sharded checkpoints that are crash-safe and readable without a process group.

Each rank writes `rank<R>.pt` holding its local shards as plain tensors (with their global
offsets), then rank 0 writes `COMPLETE.json` after a barrier: a checkpoint directory without it
is an interrupted write and is ignored. Resuming needs the same world size and plan; `export`
reads the per-rank files directly. `CONFIG.json` beside the step directories records the
fingerprint of the training config they were made with: a stage never resumes (or reports) the
checkpoints of another config unless told to discard them (`--force`).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from sharded_mde.io import atomic_torch_save, atomic_write_json, read_json

COMPLETE = "COMPLETE.json"
CONFIG = "CONFIG.json"
_STEP_DIR = re.compile(r"^step_(\d{9})$")


def to_portable(obj: Any) -> Any:
    """Replaces every ShardedTensor in a (nested) state dict by its local shards and offsets."""
    if isinstance(obj, ShardedTensor):
        return {
            "__sharded__": True,
            "global_size": list(obj.size()),
            "shards": [(list(s.metadata.shard_offsets), s.tensor.detach().clone()) for s in obj.local_shards()],
        }
    if isinstance(obj, dict):
        return {k: to_portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_portable(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    return obj


def load_portable(live: Any, saved: Any, key: str = "") -> Any:
    """Copies a portable state dict into the live one (ShardedTensors in place) and returns it."""
    if isinstance(live, ShardedTensor):
        if not (isinstance(saved, dict) and saved.get("__sharded__")):
            raise ValueError(f"checkpoint entry {key}: expected sharded tensor")
        by_offset = {tuple(o): t for o, t in saved["shards"]}
        for s in live.local_shards():
            off = tuple(s.metadata.shard_offsets)
            if off not in by_offset or by_offset[off].shape != s.tensor.shape:
                raise ValueError(f"checkpoint entry {key}: shard at {list(off)} does not match the plan "
                                 "(resume needs the same world size and sharding plan)")
            s.tensor.detach().copy_(by_offset[off])
        return live
    if isinstance(live, dict):
        if not isinstance(saved, dict):
            raise ValueError(f"checkpoint entry {key}: expected a mapping")
        out = {}
        for k, v in live.items():
            if k not in saved and key == "state":
                # An optimizer's per-parameter state: a parameter that never had a gradient (e.g. the
                # projection of a field the search dropped) has none in the checkpoint; the live
                # state `init_state()` gave it is what it would have had.
                out[k] = v
                continue
            if k not in saved:
                raise ValueError(f"checkpoint entry {key}.{k}: missing from checkpoint")
            out[k] = load_portable(v, saved[k], f"{key}.{k}" if key else str(k))
        for k in saved:
            if k not in live:
                out[k] = saved[k]
        return out
    return saved


def step_dir(root: Path, step: int) -> Path:
    """The directory of the checkpoint taken after `step` optimizer steps."""
    return Path(root) / f"step_{step:09d}"


def save_checkpoint(root: str | Path, step: int, rank: int, world_size: int, payload: Dict[str, Any],
                    info: Dict[str, Any], keep: int = 2) -> Path:
    """Writes this rank's payload, then (rank 0, after a barrier) the COMPLETE marker; prunes old ones."""
    d = step_dir(Path(root), step)
    d.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(d / f"rank{rank}.pt", to_portable(payload))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        atomic_write_json(d / COMPLETE, {"step": step, "world_size": world_size, **info})
        for old in complete_checkpoints(Path(root))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return d


def complete_checkpoints(root: Path) -> List[Path]:
    """Finished checkpoint directories under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).is_file())


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest finished checkpoint directory, or None."""
    found = complete_checkpoints(Path(root))
    return found[-1] if found else None


def load_checkpoint(d: Path, rank: int, world_size: int) -> tuple[Dict[str, Any], Dict[str, Any]]:
    """(payload for this rank, info) of a finished checkpoint; refuses another world size or a damaged marker."""
    try:
        info = read_json(d / COMPLETE, "checkpoint marker")
    except ValueError as e:
        raise ValueError(f"{e}; delete {d} to resume from the checkpoint before it") from None
    if not (isinstance(info, dict) and isinstance(info.get("step"), int) and isinstance(info.get("world_size"), int)):
        raise ValueError(f"{d / COMPLETE}: checkpoint marker is damaged (no integer step and world_size); "
                         f"delete {d} to resume from the checkpoint before it")
    if info["world_size"] != world_size:
        raise ValueError(f"{d}: written by {info['world_size']} ranks, cannot resume on {world_size}")
    path = d / f"rank{rank}.pt"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ValueError(f"{path}: checkpoint shard missing") from None
    except Exception as e:  # a damaged file: torch raises several unrelated types
        raise ValueError(f"{path}: checkpoint shard unreadable ({e.__class__.__name__})") from None
    return payload, info


# Config keys that change no training result: where the processed data lives, progress bars.
_NEUTRAL = {"data": ("dir",), "train": ("progress",)}


def config_fingerprint(cfg: Any, sections: Sequence[str], extra: Any = None) -> str:
    """A short hash of the named sections of a RunConfig (without keys that change no result) and `extra`."""
    doc: Dict[str, Any] = {"extra": extra}
    for name in sections:
        doc[name] = {k: v for k, v in asdict(getattr(cfg, name)).items() if k not in _NEUTRAL.get(name, ())}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


_discard_other_configs = False


def discard_checkpoints_of_other_configs(flag: bool) -> None:
    """`--force`: a stage whose checkpoints were made with another config deletes them and starts over."""
    global _discard_other_configs
    _discard_other_configs = flag


def guard_config(root: str | Path, fingerprint: str, is_main: bool) -> None:
    """Refuses to resume checkpoints under `root` made with another config (one line), or discards them
    under `--force`; then records `fingerprint` as the config of the checkpoints to come."""
    root = Path(root)
    found = complete_checkpoints(root)
    try:
        doc = read_json(root / CONFIG, "checkpoint config record") if (root / CONFIG).is_file() else {}
    except ValueError as e:
        raise ValueError(f"{e}; rerun with --force to discard the checkpoints beside it") from None
    recorded = doc.get("fingerprint") if isinstance(doc, dict) else None
    if found and recorded != fingerprint:
        if not _discard_other_configs:
            raise ValueError(f"{root}: checkpoints up to step {found[-1].name[5:].lstrip('0') or 0} were made with "
                             f"another training config ({recorded or 'unrecorded'}, now {fingerprint}); rerun with "
                             "--force to discard them and train from scratch, or use another run_dir")
        if is_main:
            for d in found:
                shutil.rmtree(d)
    if dist.is_initialized():
        dist.barrier()  # every rank has read the record before rank 0 rewrites it
    if is_main and recorded != fingerprint:
        atomic_write_json(root / CONFIG, {"fingerprint": fingerprint})
    if dist.is_initialized():
        dist.barrier()


def copy_full_into(live: Dict[str, Any], full: Dict[str, torch.Tensor]) -> None:
    """Copies unsharded tensors `full[k]` into the live (possibly sharded) state dict, slice by slice.

    Used to warm-start a sharded model from gathered weights and to start sharded tests from the
    same weights as their unsharded reference.
    """
    for k, t in live.items():
        if k not in full:
            raise ValueError(f"state entry {k}: no source tensor")
        src = full[k]
        if isinstance(t, ShardedTensor):
            for s in t.local_shards():
                o, z = s.metadata.shard_offsets, s.tensor.shape
                s.tensor.detach().copy_(src[o[0]:o[0] + z[0], o[1]:o[1] + z[1]])
        elif isinstance(t, torch.Tensor):
            t.detach().copy_(src)
