"""Training throughput (examples/s) on planted data: one process vs 2 ranks under torchrun, one run.

Usage: python tools/bench_train.py [--config configs/demo.yaml] [--out docs/bench_train.json]
       [--set train.epochs=0.5 ...]
Both runs train the same full-dimension model on the same prepared data (prepared first, outside
the timing); examples/s is the trainer's steady-state figure: training steps only, the first
WARMUP_STEPS steps of each run left out. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from sharded_mde.bench import save_results
from sharded_mde.config import load_config, parse_overrides
from sharded_mde.data import prepare


def _train(config: str, run_dir: str, overrides: list[str], nproc: int) -> dict:
    sets = [f"--set=run_dir={run_dir}", "--set=train.progress=false", "--set=train.checkpoint_every=0", *[f"--set={o}" for o in overrides]]
    cli = [sys.executable, "-m", "sharded_mde.cli", "train", config, *sets]
    if nproc > 1:
        cli = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "sharded_mde.cli", "train", config, *sets]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    subprocess.run(cli, check=True, env=env)
    return json.loads((Path(run_dir) / "baseline" / "metrics.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default="docs/bench_train.json")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, parse_overrides(args.overrides))
    prepare(cfg.data)
    results = {}
    for nproc in (1, 2):
        m = _train(args.config, f"runs/bench_train_{nproc}p", args.overrides, nproc)
        results[f"{nproc}_process"] = {"examples_per_s": round(m["steady_examples_per_s"], 1),
                                       "examples_per_s_incl_warmup": round(m["examples_per_s"], 1), "steps": m["steps"],
                                       "batch_size_per_rank": cfg.train.batch_size, "test_auc": m["test"]["auc"]}
    results["ratio_2_over_1"] = round(results["2_process"]["examples_per_s"] / results["1_process"]["examples_per_s"], 3)
    doc = save_results(args.out, "train_throughput", results)
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
