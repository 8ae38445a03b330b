"""The `sharded-mde` command: a thin argparse layer over the library API.

Each pipeline stage registers its own subcommands (`register(subparsers)` in its `cli` module).
Bad input and OS-level faults (permissions, a read-only or full disk) are printed as one line and
exit with status 2; SIGINT / SIGTERM end the command with 130 / 143 after the current file write
(every write is atomic, so nothing is left half-done and a rerun resumes). Commands that write a
run directory hold its lock (`pipeline.lock`) and check it is writable before their first step.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Iterator, List, Optional

from sharded_mde.config import ConfigError

# Stage modules that register subcommands, in the order they appear in --help.
STAGE_CLIS = [
    "sharded_mde.data.cli",
    "sharded_mde.train.cli",
    "sharded_mde.search.cli",
    "sharded_mde.plan.cli",
    "sharded_mde.export.cli",
    "sharded_mde.pipeline.cli",
    "sharded_mde.bench.cli",
]


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every stage's subcommands."""
    parser = argparse.ArgumentParser(prog="sharded-mde", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGE_CLIS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # stage not present in this build
                continue
            raise
        module.register(sub)
    return parser


# Commands that write into the config's run_dir (and so hold its lock while they run).
RUN_DIR_WRITERS = {"run", "train", "search", "retrain"}


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) // int(period))))
    return max(1, cores)


def default_cpu_threads() -> Optional[int]:
    """CPU threads per process when the user has not set OMP_NUM_THREADS: its share of the idle cores.

    As with torchrun, each of the host's ranks gets cores / local ranks; cores that other processes
    already keep busy (the 1-minute load average) are left out, since an OpenMP thread that must
    wait for a core holds up every operator (on the shared 2-core machine, 2 threads made a whole
    run about 2x slower than 1). None (keep the user's setting) when OMP_NUM_THREADS is set. The
    thread count can change the low-order bits of float sums: set OMP_NUM_THREADS for bitwise
    reproducibility across machines.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return None
    cores = usable_cores()
    idle = cores - int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else cores
    return max(1, min(cores, idle) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


@contextlib.contextmanager
def _writer_lock(args: argparse.Namespace) -> Iterator[None]:
    """Holds the run directory's lock (rank 0 only) for commands that write a run directory."""
    if args.command not in RUN_DIR_WRITERS or os.environ.get("RANK", "0") != "0":
        yield
        return
    from sharded_mde.pipeline.lock import run_dir_lock
    from sharded_mde.train.cli import load_args_config

    with run_dir_lock(load_args_config(args).run_dir):
        yield


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the console script."""
    threads = default_cpu_threads()
    if threads is not None:
        # Before torch, numpy and pyarrow are loaded: their OpenMP, BLAS and Arrow thread pools are
        # sized from it (a 1-thread torch beside 2-thread pools was still 1.7x slower here).
        os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    from sharded_mde.interrupts import Interrupted, interruptible
    from sharded_mde.io import describe_os_error
    from sharded_mde.train.distributed import tune_cpu_process

    if threads is not None:
        torch.set_num_threads(threads)  # torch may have been loaded before (a caller in this process)
    parser = build_parser()
    args = parser.parse_args(argv)
    tune_cpu_process()
    prefix = f"sharded-mde {args.command}: error:"
    try:
        with interruptible(), _writer_lock(args):
            return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"{prefix} {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, read-only or full file system: the path and what was being done
        if getattr(args, "debug", False):
            raise
        print(f"{prefix} {describe_os_error(e, f'running sharded-mde {args.command}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"sharded-mde {args.command}: interrupted by {signal.Signals(signum).name}; finished steps are "
              "kept, run the same command again to resume", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
