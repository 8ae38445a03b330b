"""`sharded-mde search CONFIG` and `sharded-mde retrain CONFIG --dims FILE` (one process or torchrun).

`search` runs the search that `search.method` names in the registry (`sharded_mde.dims.methods`:
ham, pme, and the baselines uniform, power_law, magnitude, saliency: docs/baselines.md), each writing
`<run_dir>/<stage>/dims.json` (stage defaults to the method name). `retrain` trains the compact
model of any dims file whose method the registry knows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sharded_mde.config import RunConfig
from sharded_mde.search.run import run_search
from sharded_mde.train.cli import add_config_args, load_args_config
from sharded_mde.train.launch import run_with_data
from sharded_mde.train.distributed import DistEnv


def _search(args: argparse.Namespace) -> int:
    from sharded_mde.train.checkpoint import discard_checkpoints_of_other_configs

    discard_checkpoints_of_other_configs(args.force)

    def body(cfg: RunConfig, env: DistEnv) -> int:
        dims = run_search(cfg, env, args.stage)
        if env.is_main:
            out = Path(cfg.run_dir) / (args.stage or cfg.search.method) / "dims.json"
            summary = {"dims_file": str(out), "method": dims.method, "budget_bytes": dims.budget_bytes,
                       "kept_bytes": dims.kept_bytes, "kept_fraction": round(dims.kept_bytes / dims.full_bytes, 4),
                       "dims": {t.name: t.dim for t in dims.tables}}
            if dims.planted is not None:
                summary["planted_spearman"] = dims.planted.spearman
            if dims.check is not None:  # HAM's candidate check: who won, by how much, every candidate's score
                c = dims.check
                summary["check"] = {"winner": c.winner, "margin_vs_ham": c.margin_vs_ham,
                                    "runner_up": c.runner_up, "margin_vs_runner_up": c.margin_vs_runner_up,
                                    "valid_auc": {r.name: r.valid_auc for r in c.candidates}}
            if cfg.search.front:  # HAM's front: each budget's dims file, or why it is not feasible
                from sharded_mde.search.ham_front import FRONT_FILE

                front = json.loads((out.parent / FRONT_FILE).read_text())
                summary["front"] = {f"{p['budget']:g}": p["dims_file"] if p["feasible"] else p["reason"]
                                    for p in front["points"]}
            print(json.dumps(summary, indent=2))
        return 0

    return run_with_data(load_args_config(args), body)


def _retrain(args: argparse.Namespace) -> int:
    from sharded_mde.search.retrain import run_retrain
    from sharded_mde.train.checkpoint import discard_checkpoints_of_other_configs

    discard_checkpoints_of_other_configs(args.force)

    def body(cfg: RunConfig, env: DistEnv) -> int:
        summary = run_retrain(cfg, env, args.dims, args.stage)
        if env.is_main:
            print(json.dumps({k: summary[k] for k in ("method", "init", "kept_bytes", "budget_bytes", "test")}, indent=2))
        return 0

    return run_with_data(load_args_config(args), body)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="search per-table dims under a byte budget (HAM, PME, baselines)")
    add_config_args(p)
    p.add_argument("--stage", default=None, help="stage directory inside run_dir (default: the method name)")
    p.add_argument("--force", action="store_true", help="discard checkpoints made with another config and start over")
    p.set_defaults(func=_search)
    p = sub.add_parser("retrain", help="train the compact model of a dims file (warm start or from scratch)")
    add_config_args(p)
    p.add_argument("--dims", required=True, help="dims file written by `sharded-mde search`")
    p.add_argument("--stage", default=None, help="stage directory inside run_dir (default: retrain_<method>)")
    p.add_argument("--force", action="store_true", help="discard checkpoints made with another config and start over")
    p.set_defaults(func=_retrain)
