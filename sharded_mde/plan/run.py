"""Plans the full and the compact tables of a dims file on a topology and writes both plans and the memory report.

A table set that does not fit the caps has no plan file (a stale one is removed); its figures in
the report are of the plan at the smallest cap that fits. Compact tables that do not fit are an
error (PlanningError, one line) raised after the report is written.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict

from sharded_mde.config import RunConfig
from sharded_mde.dims import DimsFile
from sharded_mde.dims.file import serving_dtypes
from sharded_mde.io import atomic_write_json, atomic_write_text
from sharded_mde.plan.caps import fit_plan
from sharded_mde.plan.report import memory_report, render_markdown, render_png
from sharded_mde.plan.sharding import PlanningError, save_plan
from sharded_mde.plan.tables import full_table_configs, mean_bag_lengths, plan_tables

PLAN_FILES = {"compact": "sharding_plan.json", "full": "sharding_plan_full.json"}


def plan_and_report(cfg: RunConfig, dims: DimsFile, dims_path: str, out: Path) -> Dict[str, Any]:
    """Plans full and compact tables on `cfg.plan`, saves the plans that fit and the report (JSON, markdown, PNG)."""
    full = full_table_configs(cfg)
    compact = plan_tables(dims, full)
    start = time.perf_counter()
    bags = mean_bag_lengths(cfg)
    fits = {"full": fit_plan(full, cfg.plan, bags), "compact": fit_plan(compact, cfg.plan, bags)}
    seconds = time.perf_counter() - start
    rep = memory_report(full, compact, cfg.plan, fits["full"], fits["compact"], row_alignment=cfg.export.row_alignment,
                        dtypes=serving_dtypes(dims.tables, cfg.export.dtype))
    rep["source"] = {"dims_file": dims_path, "method": dims.method, "budget_fraction": dims.budget_fraction,
                     **({"rule": dataclasses.asdict(dims.rule)} if dims.rule else {}),
                     **({"caps": dataclasses.asdict(dims.caps)} if dims.caps else {}),
                     "extra": dims.extra, "planning_seconds": round(seconds, 2)}
    for side, name in PLAN_FILES.items():
        if rep["fit"][side]["fits"]:
            save_plan(out / name, fits[side].planned[0])
        else:  # no plan on this topology: a file from an earlier run would be mistaken for one
            (out / name).unlink(missing_ok=True)
    atomic_write_json(out / "report.json", rep)
    atomic_write_text(out / "report.md", render_markdown(rep, source_line(rep["source"])))
    render_png(rep, out / "report.png")
    if not rep["fit"]["compact"]["fits"]:
        raise PlanningError(f"{rep['fit']['compact']['line']}; figures in {out / 'report.json'}")
    return rep


def source_line(source: Dict[str, Any]) -> str:
    """Where the compact dims came from, said honestly (a search, or a rule with its formula)."""
    line = f"Dims: `{source['dims_file']}` (method {source['method']}, budget {source['budget_fraction']:g} of the full bytes"
    if "rule" in source:
        line += f"; a rule, not a search: {source['rule']['formula']}, alpha {source['rule']['alpha']:g}"
    if "caps" in source:
        how = "the largest fraction whose plan fits" if "rule" in source else "searched under"
        line += f"; sized to the per-rank caps ({how} every rank's {source['caps']['tier'].upper()} cap)"
    return line + ")."

