"""Crash-safe file writing: every file a stage writes goes through these helpers.

A file is written to a temporary name in the same directory, flushed, fsynced and renamed over
the target, so a reader sees either the old complete file or the new complete file, never a
half-written one. Files and directories get the modes an ordinary `open` / `mkdir` would
(0644 / 0755 under the usual umask 022), so a serving process of another user can read them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Optional, Set, Union

from sharded_mde.interrupts import raise_if_pending

PathLike = Union[str, Path]


def current_umask() -> int:
    """The process umask: from /proc on Linux, else by setting and restoring it (not thread-safe)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: PathLike, prefix: str, suffix: str) -> Path:
    """`tempfile.mkdtemp` in `parent`, with the mode `mkdir` gives (mkdtemp's is always 0700)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(d, 0o777 & ~current_umask())
    return d


def _hold_signals() -> Optional[Set[int]]:
    """Blocks SIGINT and SIGTERM (main thread only); returns the mask to restore, None if nothing was done."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _release_signals(previous: Optional[Set[int]]) -> None:
    """Restores the mask of `_hold_signals`: a signal held meanwhile is delivered now."""
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is fsynced and renamed onto `path`."""
    raise_if_pending()  # an interrupt whose exception was swallowed stops the command here
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    held = _hold_signals()  # a Ctrl-C between creating the temp file and the `try` would leave it behind
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except BaseException:  # e.g. a read-only or full file system: nothing to clean up, signals back on
        _release_signals(held)
        raise
    tmp_path = Path(tmp)
    try:
        try:
            _release_signals(held)  # an interrupt held meanwhile is raised here, inside the `try`
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's mode is always 0600
        finally:
            os.close(fd)
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def fsync_dir(d: Path) -> None:
    """Flushes a directory's entries to disk (a rename is durable only after this)."""
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Writes `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Writes `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Writes `obj` as indented JSON to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: PathLike, obj: Any) -> None:
    """`torch.save` to `path` atomically."""
    import torch

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as e:
            failed = failed_write(e, tmp)
            if failed is None:
                raise
            raise failed from None


def failed_write(e: BaseException, path: PathLike) -> Optional[OSError]:
    """The OSError behind torch's zip writer's RuntimeError for a failed write of `path` (a full disk: ENOSPC),
    None for any other error."""
    if not isinstance(e, RuntimeError):
        return None
    # On a full disk the message may name only the writer's position ("unexpected pos 64 vs 0").
    parent = Path(path).parent
    full = parent.exists() and shutil.disk_usage(parent).free < (1 << 20)
    if not full and "write" not in str(e):
        return None
    code = errno.ENOSPC if full else errno.EIO
    return OSError(code, os.strerror(code), str(path))


def read_json(path: PathLike, what: str = "file") -> Any:
    """Reads JSON; a missing or corrupt file raises one ValueError naming it."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p}: {what} not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} line {e.lineno}: {what} is not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{p}: {what} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"{p}: cannot read {what} ({e.strerror or e})") from None


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# What an OS error means for the user, by errno: the fix to try.
_OS_HINTS = {
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.EROFS: "the file system is read-only; use a writable run_dir",
    errno.ENOSPC: "free some space and rerun: finished steps are kept",
    errno.EDQUOT: "free some space and rerun: finished steps are kept",
}


def describe_os_error(e: OSError, action: str, where: PathLike = "") -> str:
    """One line for an OS-level fault: the path (else `where`), what was being done, the system's reason, a hint."""
    path = e.filename if e.filename is not None else (f"{where} (a file in it)" if where else "?")
    hint = _OS_HINTS.get(e.errno or 0)
    reason = e.strerror or " ".join(str(e).split())
    return f"{path}: {reason} while {action}" + (f" ({hint})" if hint else "")
