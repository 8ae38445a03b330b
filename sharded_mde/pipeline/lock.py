"""One writer per run directory: an advisory lock held by the command that writes it.

`run_dir/.lock` is locked with `flock` (released by the kernel when the holder exits, even by
SIGKILL) and holds the holder's pid and command line, so a second writer is refused with one line
naming them. Taking the lock also proves, before any step runs, that the run directory is writable.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Iterator

from sharded_mde.io import describe_os_error

LOCK_FILE = ".lock"


def _holder(path: Path) -> str:
    """The pid and command recorded in a held lock file (best effort: it may be half-written)."""
    try:
        doc = json.loads(path.read_text())
        return f"pid {doc['pid']} ({doc['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def check_writable(run_dir: Path) -> None:
    """Creates `run_dir` and a probe file in it; a failure is one ValueError naming the path and the reason."""
    probe = run_dir / f".write_probe.{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as e:
        raise ValueError(describe_os_error(e, "checking that the run directory is writable")) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[Path]:
    """Holds `run_dir`'s lock for the block; a held lock is a one-line ValueError naming the holder."""
    root = Path(run_dir)
    check_writable(root)
    path = root / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{root}: run directory is in use by {_holder(path)}; wait for it to finish "
                             "or use another run_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": " ".join(["sharded-mde", *sys.argv[1:]])}).encode())
        yield path
    finally:
        os.close(fd)  # closing releases the lock; the file stays (removing it would race a new holder)
