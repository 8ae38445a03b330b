"""Serving throughput of a compact export against the full-dimension model's export, side by side.

Both exports score the same test split (read once, before timing) with the same serving path
(TorchScript by default), alternating which goes first in each repeat so that drift hits both;
the medians of examples/s and their ratio are printed and saved with the machine they ran on.

    python tools/bench_serving.py CONFIG --compact RUN/export --full RUN/export_full [--dtypes fp32,int8]

Export the full-dimension model with `sharded-mde export CONFIG --checkpoint RUN/baseline --out RUN/export_full`.
`sharded-mde bench speed CONFIG` runs the same comparison (full vs compact) next to the training-step ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

from sharded_mde.bench import save_results
from sharded_mde.bench.serving import bench_dtype
from sharded_mde.config import load_config, parse_overrides
from sharded_mde.export.stage import device_name, load_requests


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", help="run config (YAML): data dir, export.serve_batch_size, export.row_alignment")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--compact", required=True, help="the compact export")
    p.add_argument("--full", required=True, help="the full-dimension model's export")
    p.add_argument("--dtypes", default="fp32,int8", help="serving dtypes to compare at, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="timed passes over the split per model and dtype")
    p.add_argument("--max-batches", type=int, default=0, help="use only this many batches of the split (0 = all)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--eager", action="store_true", help="time the eager modules instead of TorchScript")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", help="results JSON (default: RUN_DIR/bench_serving.json)")
    args = p.parse_args(argv)
    cfg = load_config(args.config, parse_overrides(args.overrides))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    requests = load_requests(cfg.data.dir, "test", cfg.export.serve_batch_size, device, args.max_batches)
    exports = {"compact": Path(args.compact), "full": Path(args.full)}
    results: Dict[str, Any] = {"device": device_name(device), "batch_size": cfg.export.serve_batch_size,
                               "row_alignment": cfg.export.row_alignment, "repeats": args.repeats,
                               "scripted": not args.eager, "threads": torch.get_num_threads(), "dtypes": {}}
    for dtype in args.dtypes.split(","):
        r = bench_dtype(exports, dtype, requests, device, args.repeats, cfg.export.row_alignment, not args.eager)
        results["dtypes"][dtype] = r
        print(f"{dtype}: compact {r['compact']['examples_per_s_median']:,.0f} ex/s (auc {r['compact']['auc']:.4f}), "
              f"full {r['full']['examples_per_s_median']:,.0f} ex/s (auc {r['full']['auc']:.4f}), "
              f"ratio {r['ratio_median']:.2f} (per-repeat median {r['ratio_per_repeat_median']:.2f}), "
              f"table bytes ratio {r['bytes_ratio']:.3f}", flush=True)
    out = Path(args.out) if args.out else Path(cfg.run_dir) / "bench_serving.json"
    doc = save_results(out, "serving", results)
    print(json.dumps({"saved": str(out), "machine": doc["machine"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
