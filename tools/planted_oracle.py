"""Rank-following dims on planted data: what an allocation that knows the planted ranks scores.

For every budget: each field's dim is proportional to its planted rank (floored to a multiple of
4, at least 4 for an informative field, 0 for a field planted at rank 0), scaled as large as the
byte budget allows; then `sharded-mde retrain` trains that compact model from scratch. This is a
reference for HAM's planted-rank targets (docs/ham.md), not a search: it reads the answer.
Where even every informative field at dim 4 exceeds the budget, the row says so and the
allocation at that minimum is trained anyway (its bytes are reported, over the budget).

    .venv/bin/python tools/planted_oracle.py configs/ham_planted.yaml --budgets 0.1,0.25,0.5 --out docs/planted_oracle.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from sharded_mde.config import RunConfig, load_config, parse_overrides
from sharded_mde.io import atomic_write_text, read_json
from sharded_mde.dims import DimsFile, save_dims
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.budget import budget_bytes, make_dims_file
from sharded_mde.search.run import planted_ranks
from sharded_mde.search.report import planted_agreement

METHOD = "planted_oracle"


def rank_dims(tables: Sequence[Any], ranks: Mapping[str, int], scale: float) -> Dict[str, int]:
    """dim = floor4(scale * rank), within [4, full dim] for informative fields; 0 at rank 0."""
    out = {}
    for t in tables:
        r = max(ranks.get(f, 0) for f in t.feature_names)
        out[t.name] = 0 if r == 0 else min(t.embedding_dim, max(4, int(scale * r) // 4 * 4))
    return out


def oracle_dims(cfg: RunConfig, fraction: float) -> DimsFile:
    """The rank-following dims with the largest scale whose bytes fit `fraction` of the full bytes."""
    tables, ranks = full_table_configs(cfg), planted_ranks(cfg)
    if not ranks:
        raise SystemExit(f"{cfg.data.dir}: no ground_truth.json with planted ranks (use planted synthetic data)")

    def dims_at(scale: float) -> DimsFile:
        kept = {n: range(d) for n, d in rank_dims(tables, ranks, scale).items()}
        return make_dims_file(METHOD, tables, kept, fraction, optimizer=cfg.train.embedding_optimizer)

    budget = budget_bytes(tables, fraction, optimizer=cfg.train.embedding_optimizer)
    lo, hi = 0.0, float(max(t.embedding_dim for t in tables))
    for _ in range(50):  # bisection on the scale: bytes grow with it
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if dims_at(mid).kept_bytes <= budget else (lo, mid)
    dims = dims_at(lo)
    dims.planted = planted_agreement(dims, ranks)
    dims.extra["scale"] = lo
    return dims


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--budgets", default="0.1,0.25,0.5")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="docs/planted_oracle.md")
    args = p.parse_args()
    cfg = load_config(args.config, parse_overrides(args.overrides))
    rows: List[Dict[str, Any]] = []
    for fraction in (float(b) for b in args.budgets.split(",")):
        stage = f"oracle_b{fraction:g}"
        dims = oracle_dims(cfg, fraction)
        path = Path(cfg.run_dir) / stage / "dims.json"
        save_dims(path, dims)
        result = Path(cfg.run_dir) / f"retrain_{stage}" / "retrain.json"
        if not result.exists():
            subprocess.run([sys.executable, "-m", "sharded_mde.cli", "retrain", args.config, "--dims", str(path),
                            "--stage", f"retrain_{stage}"] + [x for s in args.overrides for x in ("--set", s)],
                           check=True)
        test = read_json(result, "retrain result")["test"]
        rows.append({"budget": fraction, "kept_fraction": dims.kept_bytes / dims.full_bytes,
                     "over_budget": dims.kept_bytes > dims.budget_bytes, "spearman": dims.planted.spearman,
                     "test_auc": test["auc"], "test_logloss": test["logloss"],
                     "dims": {t.name: t.dim for t in dims.tables}})
    lines = ["# Rank-following dims on planted data (a reference, not a search)", "",
             f"Produced by `python tools/planted_oracle.py {args.config} --budgets {args.budgets}` "
             "(one seed, retrained from scratch).", "",
             "| budget | kept bytes / full | Spearman dims vs planted ranks | test AUC | test logloss |",
             "|---|---|---|---|---|"]
    for r in rows:
        over = " (over the budget: every informative field at dim 4)" if r["over_budget"] else ""
        lines.append(f"| {r['budget']:g} | {r['kept_fraction']:.4f}{over} | {r['spearman']:.3f} | "
                     f"{r['test_auc']:.4f} | {r['test_logloss']:.4f} |")
    lines += ["", "Dims per budget:", ""]
    lines += [f"- {r['budget']:g}: " + ", ".join(f"{k.removeprefix('t_')}={v}" for k, v in r["dims"].items()) for r in rows]
    text = "\n".join(lines) + "\n"
    atomic_write_text(args.out, text)
    atomic_write_text(Path(args.out).with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
