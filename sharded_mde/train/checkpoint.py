"""Checkpoints on torch.distributed.checkpoint (DCP): crash-safe, reshardable, readable without a process group.

A checkpoint is a `step_<9 digits>/` directory holding a DCP checkpoint of the DMP model's own
state dict (tables as ShardedTensors) and the optimizer's (the fused table optimizer's
ShardedTensor state, e.g. row-wise Adagrad's momentum, and the dense optimizer's), plus each
rank's small trainer state (step, history, callback states, RNG) as a `torch.save` blob read back
with `weights_only=True`. After every rank has written, rank 0 writes `COMPLETE.json` (after a
barrier): a directory without it is an interrupted write and is ignored. DCP reshards on load, so
a run resumes on another world size or sharding plan. `CONFIG.json` beside the step directories
records the fingerprint of the training config they were made with: a stage never resumes (or
reports) the checkpoints of another config unless told to discard them (`--force`).
`CheckpointReader` reads the model's tensors without a process group (export, warm starts,
scorers): whole dense tensors, and tables one saved piece at a time.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from sharded_mde.io import atomic_write_json, failed_write, read_json
from sharded_mde.train.state import table_of

COMPLETE = "COMPLETE.json"
CONFIG = "CONFIG.json"
FORMAT = "dcp"  # COMPLETE.json's "format"; the per-rank `rank<R>.pt` checkpoints of earlier versions have none
MODEL = "model"  # top-level entries of the saved state
OPTIMIZER = "optimizer"
_LOCAL = "trainer.rank{}"  # a rank's trainer state blob (uint8 tensor)
_STEP_DIR = re.compile(r"^step_(\d{9})$")


def step_dir(root: Path, step: int) -> Path:
    """The directory of the checkpoint taken after `step` optimizer steps."""
    return Path(root) / f"step_{step:09d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _first_failure(e: BaseException) -> BaseException:
    """The first rank's exception inside DCP's CheckpointException (`e` itself otherwise)."""
    failures = getattr(e, "failures", None)
    if isinstance(e, dcp.CheckpointException) and failures:
        return failures[min(failures)][0]
    return e


def _save_error(e: BaseException, d: Path) -> BaseException:
    """A failed DCP write as the OSError the CLI prints in one line (a full disk: ENOSPC naming `d`)."""
    cause = _first_failure(e)
    if isinstance(cause, OSError):
        return cause
    return failed_write(cause, d) or cause


def _blob(obj: Any) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def save_checkpoint(root: str | Path, step: int, state: Mapping[str, Any], info: Dict[str, Any],
                    local: Any = None, keep: int = 2) -> Path:
    """Writes `state` (nested dicts of tensors and ShardedTensors, collectively on every rank) and this rank's
    `local` trainer state with DCP, then (rank 0, after a barrier) the COMPLETE marker; prunes old ones."""
    d = step_dir(Path(root), step)
    rank = _rank()
    if rank == 0 and d.exists():  # a write of this step that was interrupted: start it afresh
        shutil.rmtree(d)
    _barrier()  # every rank waits for the clean-up, whatever it found
    payload = dict(state)
    if local is not None:
        payload[_LOCAL.format(rank)] = _blob(local)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(payload, storage_writer=dcp.FileSystemWriter(d))
    except (Exception, dcp.CheckpointException) as e:
        raise _save_error(e, d) from None
    _barrier()
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        atomic_write_json(d / COMPLETE, {"step": step, "world_size": world, "format": FORMAT, **info})
        for old in complete_checkpoints(Path(root))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
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


def find_checkpoint(path: str | Path) -> Optional[Path]:
    """A finished checkpoint directory: `path` itself, its newest `step_*`, or that of `path/checkpoints`; or None."""
    p = Path(path)
    if (p / COMPLETE).is_file():
        return p
    for root in (p, p / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """`find_checkpoint`, refusing a path without a finished checkpoint (one line)."""
    found = find_checkpoint(path)
    if found is not None:
        return found
    p = Path(path)
    raise ValueError(f"{p}: no finished checkpoint (a step_* directory with {COMPLETE}) here or under checkpoints/")


def _old_format_error(d: Path) -> ValueError:
    return ValueError(f"{d}: a checkpoint in the per-rank format of an earlier version (rank<R>.pt), which this "
                      f"version does not read; convert it with `python tools/convert_checkpoint.py {d}`, or rerun "
                      "the stage that wrote it with --force to train it again")


def read_marker(d: Path) -> Dict[str, Any]:
    """The COMPLETE marker of a finished checkpoint; one ValueError for a damaged one or the old per-rank format."""
    try:
        info = read_json(d / COMPLETE, "checkpoint marker")
    except ValueError as e:
        raise ValueError(f"{e}; delete {d} to resume from the checkpoint before it") from None
    if not (isinstance(info, dict) and isinstance(info.get("step"), int) and isinstance(info.get("world_size"), int)):
        raise ValueError(f"{d / COMPLETE}: checkpoint marker is damaged (no integer step and world_size); "
                         f"delete {d} to resume from the checkpoint before it")
    if info.get("format") != FORMAT:
        raise _old_format_error(d)
    return info


def _is_old_format(d: Path) -> bool:
    """Whether `d` is a finished checkpoint of the earlier per-rank format (a readable marker without a format)."""
    try:
        info = read_json(d / COMPLETE, "checkpoint marker")
    except ValueError:
        return False  # a damaged marker: reported when the checkpoint is read
    return isinstance(info, dict) and info.get("format") != FORMAT


def _read_metadata(d: Path) -> Any:
    try:
        return dcp.FileSystemReader(d).read_metadata()
    except Exception as e:  # a missing or damaged .metadata: several unrelated types
        raise ValueError(f"{d}: checkpoint metadata unreadable ({e.__class__.__name__}); "
                         f"delete {d} to resume from the checkpoint before it") from None


def _load(d: Path, state: Dict[str, Any], planner: Any = None, no_dist: bool = True) -> None:
    """dcp.load into `state` in place; a damaged or mismatching checkpoint is one ValueError naming `d`."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=dcp.FileSystemReader(d), planner=planner, no_dist=no_dist)
    except (Exception, dcp.CheckpointException) as e:
        cause = _first_failure(e)
        if isinstance(cause, KeyboardInterrupt):
            raise cause from None
        detail = " ".join(str(cause).split())[:300]
        raise ValueError(f"{d}: checkpoint does not load ({cause.__class__.__name__}: {detail})") from None


def _optimizer_key(param: str, name: str) -> str:
    """The saved key of an optimizer state entry: DCP flattens nested dicts by joining keys with dots."""
    return f"{OPTIMIZER}.state.{param}.{name}"


def load_checkpoint(d: Path, model: Dict[str, Any], optimizer: Dict[str, Any]) -> Any:
    """Loads a finished checkpoint into the live `model` and `optimizer` state dicts in place (collectively, any
    world size and plan: DCP reshards) and returns this rank's trainer state (rank 0's on another world size).

    Optimizer state the checkpoint lacks keeps its live value: a parameter that never had a gradient
    (e.g. the projection of a field the search dropped) has none saved, and `init_state()` gave it
    what it would have had.
    """
    info = read_marker(d)
    saved = _read_metadata(d).state_dict_metadata
    missing = [k for k in model if f"{MODEL}.{k}" not in saved]
    if missing:
        raise ValueError(f"{d}: checkpoint lacks model entry {missing[0]} (made with another model config?)")
    opt_state = {p: {n: v for n, v in entries.items() if _optimizer_key(p, n) in saved}
                 for p, entries in optimizer.get("state", {}).items()}
    _load(d, {MODEL: model, OPTIMIZER: {"state": opt_state}}, no_dist=not dist.is_initialized())  # in place
    same_world = info["world_size"] == (dist.get_world_size() if dist.is_initialized() else 1)
    return _trainer_state(d, saved, _rank() if same_world else 0)


def _trainer_state(d: Path, saved: Mapping[str, Any], rank: int) -> Any:
    """Rank `rank`'s trainer state blob of the checkpoint (None if it has none)."""
    key = _LOCAL.format(rank)
    if key not in saved:
        return None
    blob = torch.empty(saved[key].size, dtype=torch.uint8)
    _load(d, {key: blob})
    try:
        return torch.load(io.BytesIO(blob.numpy().tobytes()), weights_only=True)
    except Exception as e:  # a damaged blob: torch raises several unrelated types
        raise ValueError(f"{d}: trainer state {key} unreadable ({e.__class__.__name__})") from None


class _PiecePlanner(dcp.DefaultLoadPlanner):
    """Reads one saved piece of one tensor into a tensor of its own (DCP's LoadPlanner extension point)."""

    def __init__(self, key: str, offsets: Sequence[int], out: torch.Tensor) -> None:
        super().__init__()
        self.key, self.offsets, self.out = key, torch.Size(offsets), out

    def create_local_plan(self) -> LoadPlan:
        index = MetadataIndex(self.key, self.offsets)
        zero = torch.Size([0] * len(self.offsets))
        return LoadPlan([ReadItem(type=LoadItemType.TENSOR, dest_index=index, dest_offsets=zero, storage_index=index,
                                  storage_offsets=zero, lengths=self.out.shape)])

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        return self.out

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        """The piece is already in `out`."""


class CheckpointReader:
    """The model tensors of a finished checkpoint, read in one process without a process group."""

    def __init__(self, path: str | Path) -> None:
        self.dir = resolve_checkpoint(path)
        self.info = read_marker(self.dir)
        self._saved = saved = _read_metadata(self.dir).state_dict_metadata
        prefix = f"{MODEL}."
        self._meta: Dict[str, TensorStorageMetadata] = {
            k[len(prefix):]: m for k, m in saved.items() if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}

    @property
    def keys(self) -> List[str]:
        """The model state keys, in saved order."""
        return list(self._meta)

    def shape(self, key: str) -> Tuple[int, ...]:
        """The global shape of model entry `key`."""
        return tuple(self._meta[key].size)

    def tables(self) -> Dict[str, str]:
        """{model key: table name} of every embedding table."""
        return {k: t for k in self._meta if (t := table_of(k)) is not None}

    def tensors(self, keys: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Whole tensors of the model entries `keys` (for dense tensors: tables are read by `pieces`)."""
        out = {k: torch.empty(self._meta[k].size, dtype=self._meta[k].properties.dtype) for k in keys}
        _load(self.dir, {MODEL: out})
        return out

    def trainer_state(self, rank: int) -> Any:
        """Rank `rank`'s trainer state (step, history, callback states, RNG), None if it saved none."""
        return _trainer_state(self.dir, self._saved, rank)

    def pieces(self, key: str) -> Iterator[Tuple[List[int], torch.Tensor]]:
        """(global offsets, tensor) of every piece of model entry `key` as saved (a shard), one read at a time."""
        meta = self._meta[key]
        for chunk in meta.chunks:
            out = torch.empty(chunk.sizes, dtype=meta.properties.dtype)
            _load(self.dir, {}, planner=_PiecePlanner(f"{MODEL}.{key}", chunk.offsets, out))
            yield list(chunk.offsets), out


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
    """Refuses to resume checkpoints under `root` made with another config or in the old per-rank format (one
    line), or discards them under `--force`; then records `fingerprint` as the config of the checkpoints to come."""
    root = Path(root)
    found = complete_checkpoints(root)
    try:
        doc = read_json(root / CONFIG, "checkpoint config record") if (root / CONFIG).is_file() else {}
    except ValueError as e:
        raise ValueError(f"{e}; rerun with --force to discard the checkpoints beside it") from None
    recorded = doc.get("fingerprint") if isinstance(doc, dict) else None
    old = [d for d in found if _is_old_format(d)]
    if found and (recorded != fingerprint or old):
        if not _discard_other_configs:
            if old:
                raise _old_format_error(old[-1])
            raise ValueError(f"{root}: checkpoints up to step {found[-1].name[5:].lstrip('0') or 0} were made with "
                             f"another training config ({recorded or 'unrecorded'}, now {fingerprint}); rerun with "
                             "--force to discard them and train from scratch, or use another run_dir")
        if is_main:
            for d in found:
                shutil.rmtree(d)
    _barrier()  # every rank has read the record before rank 0 rewrites it
    if is_main and recorded != fingerprint:
        atomic_write_json(root / CONFIG, {"fingerprint": fingerprint})
    _barrier()
