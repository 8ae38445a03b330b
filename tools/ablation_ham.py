"""HAM ablation: orthogonal regularity on/off, the straight-through surrogates and the column price, one table in docs/.

Each variant is a `sharded-mde search` (stage `abl_<variant>`) followed by a
`sharded-mde retrain` (stage `abl_<variant>_retrain`) of the same config; finished stages are
reused, so an interrupted ablation continues where it stopped. The markdown table reports the
planted-rank agreement, the kept bytes, the supernet's last validation AUC and the retrained
test AUC of every variant.

    .venv/bin/python tools/ablation_ham.py configs/ham_planted.yaml --out docs/ham_ablation.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

from sharded_mde.config import load_config, parse_overrides
from sharded_mde.dims import load_dims
from sharded_mde.io import atomic_write_text, read_json

VARIANTS: Dict[str, List[str]] = {
    "identity + ortho (default)": ["search.surrogate=identity"],
    "identity, no ortho": ["search.surrogate=identity", "search.ortho_weight=0"],
    "identity + ortho, bytes-only price": ["search.surrogate=identity", "search.uniform_price=0"],
    "clipped + ortho": ["search.surrogate=clipped"],
    "sigmoid + ortho": ["search.surrogate=sigmoid"],
}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.split(" (")[0]).strip("_").replace("__", "_")


def _run(cmd: List[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})


def run_variant(config: str, name: str, sets: List[str], common: List[str]) -> Dict[str, Any]:
    """Search + retrain of one variant (skipping finished stages); its row of the table."""
    stage = f"abl_{_slug(name)}"
    overrides = [x for s in common + sets for x in ("--set", s)]
    run_dir = Path(load_config(config, parse_overrides(common)).run_dir)
    dims_path = run_dir / stage / "dims.json"
    exe = [sys.executable, "-m", "sharded_mde.cli"]
    if not dims_path.exists():
        _run(exe + ["search", config, "--stage", stage] + overrides)
    retrain = run_dir / f"{stage}_retrain" / "retrain.json"
    if not retrain.exists():
        _run(exe + ["retrain", config, "--dims", str(dims_path), "--stage", f"{stage}_retrain"] + overrides)
    dims, trace, rt = load_dims(dims_path), read_json(run_dir / stage / "trace.json"), read_json(retrain)
    planted = dims.planted
    evals = [e for e in trace["evals"] if e.get("auc") is not None]
    return {
        "variant": name, "overrides": " ".join(sets),
        "spearman": planted.spearman if planted else None, "rank0_ok": planted.rank0_at_most_4 if planted else None,
        "kept_fraction": dims.kept_bytes / dims.full_bytes,
        "supernet_valid_auc": evals[-1]["auc"] if evals else float("nan"),
        "retrain_test_auc": rt["test"]["auc"], "retrain_test_logloss": rt["test"]["logloss"],
        "dims": {t.name: t.dim for t in dims.tables},
    }


def render(rows: List[Dict[str, Any]], config: str, common: List[str]) -> str:
    """The markdown page: one row per variant."""
    lines = [
        "# HAM ablation", "",
        f"Produced by `python tools/ablation_ham.py {config}{''.join(' --set ' + s for s in common)}` "
        "(search, then retrain, per variant).", "",
        "| variant | Spearman (kept dims vs planted ranks) | rank-0 fields <= 4 columns | kept bytes / full "
        "| supernet valid AUC | retrained test AUC | retrained test logloss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sp = "n/a" if r["spearman"] is None else f"{r['spearman']:.3f}"
        lines.append(f"| {r['variant']} | {sp} | {r['rank0_ok']} | {r['kept_fraction']:.4f} | "
                     f"{r['supernet_valid_auc']:.4f} | {r['retrain_test_auc']:.4f} | {r['retrain_test_logloss']:.4f} |")
    lines += ["", "Kept dims per variant:", ""]
    for r in rows:
        lines.append(f"- {r['variant']}: " + ", ".join(f"{k.removeprefix('t_')}={v}" for k, v in r["dims"].items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--set", dest="common", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every variant (e.g. search.budget=0.25)")
    p.add_argument("--only", action="append", default=[], help="run only these variants (names as in the table)")
    p.add_argument("--out", default="docs/ham_ablation.md")
    args = p.parse_args()
    rows = [run_variant(args.config, name, sets, args.common) for name, sets in VARIANTS.items()
            if not args.only or name in args.only]
    atomic_write_text(args.out, render(rows, args.config, args.common))
    atomic_write_text(Path(args.out).with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    print(render(rows, args.config, args.common))


if __name__ == "__main__":
    main()
