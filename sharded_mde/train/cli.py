"""`sharded-mde train CONFIG`: the full-dimension model, on one process or under torchrun."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from sharded_mde.config import RunConfig, load_config, parse_overrides
from sharded_mde.train.launch import run_with_data

if TYPE_CHECKING:
    from sharded_mde.train.distributed import DistEnv


def add_config_args(p: argparse.ArgumentParser) -> None:
    """CONFIG plus repeated `--set key=value` overrides (shared by every stage command)."""
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=2")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def load_args_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig named by the command line, with overrides applied."""
    return load_config(args.config, parse_overrides(args.overrides))


def _train(args: argparse.Namespace) -> int:
    from sharded_mde.train.checkpoint import discard_checkpoints_of_other_configs
    from sharded_mde.train.run import train_stage

    discard_checkpoints_of_other_configs(args.force)

    def body(cfg: RunConfig, env: DistEnv) -> int:
        _, metrics = train_stage(cfg, env, args.stage)
        if env.is_main:
            print(json.dumps({"stage": args.stage, "test": metrics["test"],
                              "examples_per_s": round(metrics["examples_per_s"])}, indent=2))
        return 0

    return run_with_data(load_args_config(args), body)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the full-dimension model (one process or torchrun)")
    add_config_args(p)
    p.add_argument("--stage", default="baseline", help="stage directory name inside run_dir")
    p.add_argument("--force", action="store_true",
                   help="discard checkpoints made with another training config and train from scratch")
    p.set_defaults(func=_train)
