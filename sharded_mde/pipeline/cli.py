"""`sharded-mde run CONFIG`: the whole pipeline, resumable, on one process or under torchrun."""

from __future__ import annotations

import argparse

from typing import TYPE_CHECKING

from sharded_mde.config import RunConfig
from sharded_mde.train.cli import add_config_args, load_args_config
from sharded_mde.train.launch import run_with_data

if TYPE_CHECKING:
    from sharded_mde.train.distributed import DistEnv


def _run(args: argparse.Namespace) -> int:
    from sharded_mde.pipeline.run import run_pipeline
    from sharded_mde.pipeline.stages import STAGE_INPUTS, STAGES
    from sharded_mde.train.checkpoint import discard_checkpoints_of_other_configs

    discard_checkpoints_of_other_configs(args.force)

    def body(cfg: RunConfig, env: DistEnv) -> int:
        run_pipeline(cfg, env, STAGES, STAGE_INPUTS)
        return 0

    # The pipeline's own data stage prepares the data (and is recorded in the ledger).
    return run_with_data(load_args_config(args), body, prepare_data=False)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole pipeline: data, baseline, search, plan, retrain, export, serve-check")
    add_config_args(p)
    p.add_argument("--force", action="store_true",
                   help="after a change of the training config, discard the old checkpoints and train from scratch")
    p.set_defaults(func=_run)
