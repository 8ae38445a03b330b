"""`sharded-mde plan`: shard the full and the compact tables on a topology and report the memory saved."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, Union

from sharded_mde.config import CAPS, RunConfig, from_dict, load_config, load_yaml, merge, parse_overrides
from sharded_mde.dims import load_dims, save_dims
from sharded_mde.io import atomic_write_text
from sharded_mde.plan.fit_caps import rule_within_caps
from sharded_mde.plan.report import render_console, render_rank_table
from sharded_mde.plan.rules import RULES, rule_dims
from sharded_mde.plan.run import PLAN_FILES, plan_and_report, source_line
from sharded_mde.plan.tables import full_table_configs, mean_bag_lengths


def register(subparsers: Any) -> None:
    """Adds the `plan` subcommand."""
    p = subparsers.add_parser("plan", help="shard full and compact tables on a topology; per-shard memory report",
                              description=__doc__)
    p.add_argument("config", nargs="?", help="run config YAML (optional with --tables)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dims", help="dims file written by a search (HAM/PME)")
    src.add_argument("--rule", choices=RULES, help="make dims by a rule instead (see docs/plan.md)")
    p.add_argument("--budget", type=budget_arg, default=None,
                   help="budget fraction for --rule, or caps: the largest whose plan fits every rank (default search.budget)")
    p.add_argument("--alpha", type=float, default=0.3, help="power-law exponent for --rule power_law")
    p.add_argument("--topology", help="topology preset YAML (configs/topologies/), merged over the plan section")
    p.add_argument("--tables", help="table preset YAML (configs/tables/), sets plan.tables_preset")
    p.add_argument("--out", help="output directory (default <run_dir>/plan)")
    p.add_argument("--ranks-md", help="also write the headline, fit lines and per-rank table (markdown) to this file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.set_defaults(func=run_plan)


def budget_arg(text: str) -> Union[float, str]:
    """--budget: a fraction, or caps (argparse turns the ValueError into a usage error)."""
    return CAPS if text == CAPS else float(text)


def load_plan_config(args: argparse.Namespace) -> RunConfig:
    """The run config with the topology preset, table preset and --set overrides applied, in that order."""
    over: Dict[str, Any] = {}
    if args.topology:
        preset = load_yaml(args.topology)
        if set(preset) != {"plan"}:
            raise ValueError(f"{args.topology}: a topology preset has one top-level key, plan")
        over = merge(over, preset)
    if args.tables:
        over = merge(over, {"plan": {"tables_preset": args.tables}})
    over = merge(over, parse_overrides(args.set))
    return load_config(args.config, over) if args.config else from_dict(RunConfig, over)


def run_plan(args: argparse.Namespace) -> int:
    """`sharded-mde plan`: the report for a dims file (or a rule's dims), printed and written to --out."""
    cfg = load_plan_config(args)
    out = Path(args.out or Path(cfg.run_dir) / "plan")
    full = full_table_configs(cfg)
    if args.dims:
        dims_path = args.dims
        dims = load_dims(dims_path, full)
    else:
        budget = args.budget if args.budget is not None else cfg.search.budget
        if budget == CAPS:  # the rule at the largest fraction whose plan fits every rank's cap
            dims = rule_within_caps(full, args.rule, cfg.plan, alpha=args.alpha, bags=mean_bag_lengths(cfg))[0]
        else:
            dims = rule_dims(full, args.rule, float(budget), alpha=args.alpha, optimizer=cfg.plan.optimizer)
        dims_path = str(out / f"dims_{args.rule}.json")
        save_dims(dims_path, dims)
    rep = plan_and_report(cfg, dims, dims_path, out)  # compact tables that do not fit: one-line error, exit 2
    print(render_console(rep), end="")
    if args.ranks_md:
        atomic_write_text(args.ranks_md, render_rank_table(rep, source_line(rep['source'])))
    written = [PLAN_FILES[side] for side in ("compact", "full") if rep["fit"][side]["fits"]]
    calls = sum(rep["fit"][side]["planner_calls"] for side in ("full", "compact"))
    print(f"\n{source_line(rep['source'])}\nplanned full + compact in {rep['source']['planning_seconds']:.1f} s "
          f"({calls} planner runs); wrote {out}/{{{', '.join(written + ['report.json', 'report.md', 'report.png'])}}}")
    if dims.caps is not None:
        print(f"sized the dims to the per-rank caps with {dims.caps.planner_calls} planner runs before that")
    return 0
