"""Quantisation-aware fine-tuning ablation: the cells of a finished `bench quality` run retrained with QAT, paired.

For every seed and budget of one serving-byte method (default `joint`) in `<run_dir>/bench_quality/`,
the cell's dims file is retrained with `search.precision.qat_fraction` set (`sharded-mde retrain`,
stage `retrain_qat<f>_<cell>` in the seed's directory, `train.seed` = the seed), and its test AUC (as
served) is paired with the same cell's retrain without QAT from `results.json`: mean difference and
95% t interval over the seeds (`bench/paired.py`). Cells without an int8 / int4 table are listed as
such (QAT changes nothing there). Finished retrains are reused, so an interrupted ablation continues.

    .venv/bin/python tools/ablation_qat.py configs/quality_precision.yaml --fraction 0.3 --out docs/quality_precision_qat.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

from sharded_mde.bench.paired import paired_difference
from sharded_mde.bench.quality import BENCH_DIR, cell_stage
from sharded_mde.config import load_config, parse_overrides
from sharded_mde.dims import load_dims
from sharded_mde.io import atomic_write_text, read_json
from sharded_mde.search.precision import QAT_DTYPES


def retrain_qat(config: str, common: List[str], seed_dir: Path, seed: int, dims_file: str, stage: str,
                fraction: float) -> Dict[str, Any]:
    """retrain.json of the cell's dims file retrained with QAT (reused when already there)."""
    out = seed_dir / stage / "retrain.json"
    if not out.is_file():
        sets = [*common, f"run_dir={seed_dir}", f"train.seed={seed}", f"search.precision.qat_fraction={fraction}"]
        cmd = [sys.executable, "-m", "sharded_mde.cli", "retrain", config, "--dims", dims_file, "--stage", stage]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, check=True, env=os.environ.copy(), stdout=subprocess.DEVNULL)
    return read_json(out, "retrain summary")


def run(config: str, common: List[str], method: str, fraction: float) -> Dict[str, Any]:
    """Per budget: the paired difference of test AUC (QAT minus no QAT) over the seeds with int8/int4 tables."""
    cfg = load_config(config, parse_overrides(common))
    root = Path(cfg.run_dir) / BENCH_DIR
    doc = read_json(root / "results.json", "bench quality results")
    rows = []
    for budget in doc["budgets"]:
        base, qat, skipped = {}, {}, []
        for r in doc["records"]:
            if r["method"] != method or r["budget"] != budget or not r["feasible"]:
                continue
            dims = load_dims(r["dims_file"])
            if not any(t.dim and t.dtype in QAT_DTYPES for t in dims.tables):
                skipped.append(r["seed"])
                continue
            stage = f"retrain_qat{fraction:g}_{cell_stage(method, budget)}"
            s = retrain_qat(config, common, root / f"seed{r['seed']}", r["seed"], r["dims_file"], stage, fraction)
            base[r["seed"]], qat[r["seed"]] = r["test_auc"], s["test"]["auc"]
        rows.append({"budget": budget, "no_int_tables": skipped, "qat_auc": qat, "auc": base,
                     **paired_difference(qat, base)})
    return {"config": config, "overrides": common, "method": method, "qat_fraction": fraction, "rows": rows}


def render(doc: Dict[str, Any]) -> str:
    """The markdown table: per budget, mean test AUC without and with QAT and the paired difference."""
    lines = [f"QAT ablation of `{doc['method']}` (`search.precision.qat_fraction: {doc['qat_fraction']:g}`), "
             f"`python tools/ablation_qat.py {doc['config']} --fraction {doc['qat_fraction']:g}"
             + "".join(f" --set {s}" for s in doc["overrides"]) + "`: test AUC as served, paired over seeds "
             "(same seed, same dims file); better / worse when the 95% t interval excludes 0.", "",
             "| budget | seeds | test AUC without QAT | with QAT | QAT minus without [95% interval] |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        n = r["n"]
        mean = lambda d: sum(d.values()) / len(d) if d else float("nan")  # noqa: E731
        diff = "n/a" if r["lo"] is None else f"{r['mean']:+.4f} [{r['lo']:+.4f}, {r['hi']:+.4f}] {r['verdict']}"
        lines.append(f"| {r['budget']:g} | {n} | {mean(r['auc']):.4f} | {mean(r['qat_auc']):.4f} | {diff} |")
    skipped = [f"{r['budget']:g}: seeds {r['no_int_tables']}" for r in doc["rows"] if r["no_int_tables"]]
    if skipped:
        lines += ["", "Cells without an int8 / int4 table (nothing to fine-tune): " + "; ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                   help="the overrides the bench run was made with (e.g. run_dir=..., data.dir=...)")
    p.add_argument("--method", default="joint")
    p.add_argument("--fraction", type=float, default=0.3, help="search.precision.qat_fraction")
    p.add_argument("--out", default="docs/quality_precision_qat.md")
    args = p.parse_args()
    doc = run(args.config, args.common, args.method, args.fraction)
    atomic_write_text(args.out, render(doc))
    atomic_write_text(Path(args.out).with_suffix(".json"), json.dumps(doc, indent=2) + "\n")
    print(render(doc))


if __name__ == "__main__":
    main()
