"""The `sharded-mde` command: a thin argparse layer over the library API.

Each pipeline stage registers its own subcommands (`register(subparsers)` in its `cli` module);
errors from bad input are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

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


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the console script."""
    from sharded_mde.train.distributed import tune_cpu_process

    parser = build_parser()
    args = parser.parse_args(argv)
    tune_cpu_process()
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"sharded-mde {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
