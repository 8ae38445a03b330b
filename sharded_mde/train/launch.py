"""How every stage command runs: start the process group, prepare the data on rank 0, run the body on every rank."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from sharded_mde.config import RunConfig

if TYPE_CHECKING:  # torch loads on use: `sharded-mde --help` stays fast
    from sharded_mde.train.distributed import DistEnv


def run_with_data(cfg: RunConfig, body: Callable[[RunConfig, DistEnv], int], prepare_data: bool = True) -> int:
    """Starts the process group, prepares `cfg.data` on rank 0 (the others wait), then runs `body` on every rank.

    Args:
        cfg (RunConfig): the run config.
        body (Callable[[RunConfig, DistEnv], int]): the stage; its return value is the exit status.
        prepare_data (bool): prepare the data first (the pipeline prepares it as a stage of its own).

    Example::

        run_with_data(load_config("configs/demo.yaml"), lambda cfg, env: 0)
    """
    from sharded_mde.data import prepare
    from sharded_mde.train.distributed import init_distributed, shutdown_distributed

    env = init_distributed()
    finished = False
    try:
        if prepare_data:
            if env.is_main:
                prepare(cfg.data)
            if env.world_size > 1:
                import torch.distributed as dist

                dist.barrier()
        result = body(cfg, env)
        finished = True
        return result
    finally:
        shutdown_distributed(wait_for_peers=finished)
