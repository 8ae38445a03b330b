"""`sharded-mde run CONFIG`: the whole pipeline, resumable, on one process or under torchrun."""

from __future__ import annotations

import argparse

from sharded_mde.train.cli import add_config_args, load_args_config


def _run(args: argparse.Namespace) -> int:
    from sharded_mde.pipeline.run import run_pipeline
    from sharded_mde.pipeline.stages import STAGES
    from sharded_mde.train.distributed import init_distributed, shutdown_distributed

    cfg = load_args_config(args)
    env = init_distributed()
    try:
        run_pipeline(cfg, env, STAGES)
    finally:
        shutdown_distributed()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the whole pipeline: data, baseline, search, plan, retrain, export, serve-check")
    add_config_args(p)
    p.set_defaults(func=_run)
