"""The ranks a `prepare` runs on: one process (no torch needed), or every rank of torch.distributed's group.

`prepare` on many processes and hosts uses the training's engine, torch.distributed (gloo on CPU),
for what is small: row counts, the list of spill files, part lists, errors, and a progress counter in
the process group's store. What is large (partial value counts, kept values, encoded parts) goes
through files in the data directory, which every rank reads and writes (on several hosts: a shared
file system, as training reads the prepared parts from every rank anyway). Files keep each rank's
memory bounded by `data.count_memory_mb` whatever the vocabulary size, where a collective would hold
a whole partition's counts in flight.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any, Callable, List, Optional

from tqdm import tqdm

_PASS_IDS = itertools.count()  # each progress bar's keys in the store; every rank counts the same passes


class Group:
    """One process: rank 0 of 1. `TorchGroup` is the same over torch.distributed's default group."""

    rank = 0
    world = 1

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        return [obj]

    def agree(self, fn: Callable[[], Any], share: bool = False) -> Any:
        """Runs `fn` here and returns its result (with `share`: every rank's, in rank order); an error on any
        rank raises on all, so no rank goes on (or marks the directory complete) after a peer failed."""
        try:
            result, error = fn(), None
        except Exception as e:  # reported to the peers, then re-raised here
            result, error = None, e
        message = None if error is None else f"{type(error).__name__}: {error}"
        gathered = self.gather((message, result if share else None))
        if error is not None:
            raise error
        failed = [(r, msg) for r, (msg, _) in enumerate(gathered) if msg is not None]
        if failed:
            r, msg = failed[0]
            raise ValueError(f"prepare: rank {r} of {self.world} failed: {msg}")
        return [res for _, res in gathered] if share else result

    def progress(self, desc: str, enabled: bool, total: Optional[int] = None) -> "Progress":
        """A progress bar on rank 0 counting the rows of every rank (rows/s across ranks)."""
        return Progress(self, desc, enabled, total)

    def _store(self) -> Any:
        return None


class TorchGroup(Group):
    """Every rank of torch.distributed's default process group (initialised by the caller)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise ValueError("TorchGroup: no process group (call train.distributed.init_distributed first)")
        self._dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def gather(self, obj: Any) -> List[Any]:
        out: List[Any] = [None] * self.world
        self._dist.all_gather_object(out, obj)
        return out

    def _store(self) -> Any:
        """The default group's key-value store (the one place that touches a private torch API: torch has no
        public getter for it, and a counter there costs one round trip per block instead of a collective)."""
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()


class Progress:
    """Rows done by every rank, shown on rank 0 by tqdm: each rank adds its rows to a counter in the
    process group's store (one round trip per block); rank 0 shows the sum, so its rate is the total."""

    def __init__(self, group: Group, desc: str, enabled: bool, total: Optional[int] = None) -> None:
        self.group = group
        self.store = group._store() if group.world > 1 else None
        # every rank of a group makes the same bars in the same order; a restarted job counts afresh
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        key = f"sharded_mde/prepare/progress/{attempt}/{next(_PASS_IDS) if self.store is not None else 0}"
        self.rows_key, self.done_key = f"{key}/rows", f"{key}/done"
        self.bar = tqdm(total=total, desc=desc, unit=" rows", disable=not (enabled and group.rank == 0))
        self.rows = 0  # this rank's

    def add(self, rows: int) -> None:
        """Counts `rows` done on this rank."""
        self.rows += rows
        if self.store is None:
            self.bar.update(rows)
            return
        total = self.store.add(self.rows_key, rows)
        if self.group.rank == 0:
            self.bar.update(total - self.bar.n)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        self.close(wait_s=0 if kind is not None else None)  # a failing rank tells the others, waits for none

    def close(self, wait_s: Optional[float] = None) -> None:
        """This rank is done; rank 0 keeps the bar moving until every rank is (at most `wait_s`, default the
        process group's timeout), then closes it."""
        if self.store is not None:
            self.store.add(self.done_key, 1)
            if self.group.rank == 0:
                from sharded_mde.train.distributed import process_group_timeout

                deadline = time.monotonic() + (wait_s if wait_s is not None else
                                               process_group_timeout().total_seconds())
                while self.store.add(self.done_key, 0) < self.group.world and time.monotonic() < deadline:
                    self.bar.update(self.store.add(self.rows_key, 0) - self.bar.n)
                    time.sleep(0.2)
                self.bar.update(self.store.add(self.rows_key, 0) - self.bar.n)
        self.bar.close()
