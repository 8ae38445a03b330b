"""Process-group set-up: torchrun (env://) when launched by it, else a one-rank gloo group.

Every training entry point runs under DistributedModelParallel, also on one process, so the
single-process and multi-rank paths are the same code.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Rank, world size and the device this process computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    local_world_size: int = 1  # ranks on this host (torchrun's LOCAL_WORLD_SIZE)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_group_timeout() -> timedelta:
    """How long a collective waits: 2 h unless SHARDED_MDE_PG_TIMEOUT_S says otherwise.

    In `sharded-mde run`, rank 0 alone prepares the data, exports and serve-checks while the
    other ranks wait at a barrier; NCCL's default of 10 minutes would abort a large run there.
    """
    return timedelta(seconds=float(os.environ.get("SHARDED_MDE_PG_TIMEOUT_S", 7200)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _restart_scoped_store() -> Dict[str, Any]:
    """init_process_group arguments that give each torchrun restart of a one-node job its own store keys.

    torchrun (torch >= 2.5) keeps one TCPStore for every restart of a job and the process group's
    keys are not scoped by attempt, so a restarted rank can read the gloo/NCCL address of a peer
    from the failed attempt and fail with "Connection refused" or hang (pytorch/pytorch#135712;
    3 of 6 restarts here). One agent gives all its ranks the same TORCHELASTIC_RESTART_COUNT, so on
    one node that count scopes the keys; across nodes counts can differ, so nothing changes there
    (launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, docs/reliability.md).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    world = os.environ["WORLD_SIZE"]
    if attempt is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or \
            os.environ.get("LOCAL_WORLD_SIZE") != world:
        return {}
    rank = int(os.environ["RANK"])
    store, _, _ = next(dist.rendezvous("env://", rank, int(world)))
    return {"store": dist.PrefixStore(f"sharded_mde/attempt_{attempt}", store), "rank": rank, "world_size": int(world)}


def tune_cpu_process() -> None:
    """CPU settings for the processes this package owns (the `sharded-mde` CLI, the `tools/` benchmarks).

    Both are process-wide, so library users who train from their own code opt in by calling this:
    subnormal floats are flushed to zero (late in training, products of small gradients and
    activations underflow to subnormals, which x86 multiplies many times slower: the masked
    supernet's backward 3x here), and freed memory is kept for reuse (`keep_freed_memory`).
    """
    torch.set_flush_denormal(True)
    keep_freed_memory()


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of unmapping it (CPU training).

    Every training step allocates and frees tensors of the whole pooled batch (13 MiB at batch 4096
    x 832 columns); by default glibc returns such blocks to the kernel on free and page-faults them
    in again on the next step, which made the masked supernet's step 1.3x the plain one here. This is
    what jemalloc or tcmalloc, the allocators PyTorch's CPU tuning guide recommends, do anyway.
    Returns False where the C library is not glibc (nothing is changed there).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30)
                and mallopt(m_top_pad, 256 << 20))


def init_distributed(prefer_cuda: bool = True) -> DistEnv:
    """Initialises (or reuses) the default process group: NCCL on GPUs, gloo on CPU."""
    use_cuda = prefer_cuda and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend=backend, timeout=process_group_timeout(), **_restart_scoped_store())
        else:
            # One process: a private TCP rendezvous, not MASTER_* variables, which would leak into
            # this process's environment and so into every subprocess it starts (a later torchrun
            # or CLI run would then try to listen on this group's port).
            addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
            port = os.environ.get("MASTER_PORT") or str(free_port())
            dist.init_process_group(backend=backend, init_method=f"tcp://{addr}:{port}", rank=0, world_size=1,
                                    timeout=process_group_timeout())
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if world > 1 and "OMP_NUM_THREADS" not in os.environ:
            # 2 processes x all cores oversubscribe the CPU (3-8x slower measured here).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistEnv(rank, world, local_rank, device, dist.get_backend(), local_world)


def shutdown_distributed(wait_for_peers: bool = False) -> None:
    """Destroys the default process group if this process created one.

    With `wait_for_peers` (a rank that finished its work) every rank first passes a barrier: a rank
    destroying the group while its peer still finishes aborted the peer now and then ("terminate
    called without an active exception"), which torchrun then restarted as a failure. Not on an
    error path, where a peer may never arrive.
    """
    if dist.is_initialized():
        if wait_for_peers and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
