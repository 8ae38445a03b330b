"""Plans the full and the compact tables of a dims file on a topology and writes both plans and the memory report."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict

from sharded_mde.config import RunConfig
from sharded_mde.dims import DimsFile
from sharded_mde.io import atomic_write_json, atomic_write_text
from sharded_mde.plan.report import memory_report, render_markdown, render_png
from sharded_mde.plan.sharding import plan_sharding, save_plan
from sharded_mde.plan.tables import full_table_configs, mean_bag_lengths, plan_tables


def plan_and_report(cfg: RunConfig, dims: DimsFile, dims_path: str, out: Path) -> Dict[str, Any]:
    """Plans full and compact tables on `cfg.plan`, saves both plans and the report (JSON, markdown, PNG)."""
    full = full_table_configs(cfg)
    compact = plan_tables(dims, full)
    start = time.perf_counter()
    bags = mean_bag_lengths(cfg)
    full_planned = plan_sharding(full, cfg.plan, bag_lengths=bags)
    compact_planned = plan_sharding(compact, cfg.plan, bag_lengths=bags)
    seconds = time.perf_counter() - start
    rep = memory_report(full, compact, cfg.plan, full_planned, compact_planned, row_alignment=cfg.export.row_alignment)
    rep["source"] = {"dims_file": dims_path, "method": dims.method, "budget_fraction": dims.budget_fraction,
                     **({"rule": dataclasses.asdict(dims.rule)} if dims.rule else {}),
                     "extra": dims.extra, "planning_seconds": round(seconds, 2)}
    save_plan(out / "sharding_plan.json", compact_planned[0])
    save_plan(out / "sharding_plan_full.json", full_planned[0])
    atomic_write_json(out / "report.json", rep)
    atomic_write_text(out / "report.md", render_markdown(rep, source_line(rep["source"])))
    render_png(rep, out / "report.png")
    return rep


def source_line(source: Dict[str, Any]) -> str:
    """Where the compact dims came from, said honestly (a search, or a rule with its formula)."""
    line = f"Dims: `{source['dims_file']}` (method {source['method']}, budget {source['budget_fraction']:g} of the full bytes"
    if "rule" in source:
        line += f"; a rule, not a search: {source['rule']['formula']}, alpha {source['rule']['alpha']:g}"
    return line + ")."

