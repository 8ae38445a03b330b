"""Peak resident memory of one training epoch at two data sizes: streamed input must not grow with the rows.

Prepares planted synthetic data (`sharded-mde data prepare`, format synth) of each row count into
the scratch directory (reused when already prepared), then trains the same small model for one epoch
on each with `sharded-mde train`, one fresh process per size, and reads each process's peak RSS
(ru_maxrss from wait4). The vocabulary is kept small so that every size has the same tables, hence
the same model. Writes docs/bench_stream.json (issue #18: RSS at the larger size <= 1.2x the smaller).

    .venv/bin/python tools/bench_stream_rss.py --rows 1000000 4000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sharded_mde.bench import machine_info  # noqa: E402
from sharded_mde.data import DatasetMeta  # noqa: E402

CONFIG = """\
# tools/bench_stream_rss.py: Criteo-shaped planted data with small vocabularies, a small DLRM
data:
  format: synth
  synth_vocab_min: 100
  synth_vocab_max: 1000
model:
  head: dlrm
  embedding_dim: 16
  dense_arch: [32, 16]
  over_arch: [32, 1]
train:
  batch_size: {batch_size}
  epochs: 1
  checkpoint_every: 0
  sharding: table_wise
  progress: false
"""


def _cli(code: Path, args: List[str], log: Path) -> Dict[str, Any]:
    """Runs `python -m sharded_mde.cli ARGS` from checkout `code`; its exit code, wall seconds and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sharded_mde.cli", *args], cwd=code, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed (exit {proc.returncode}); see {log}:\n"
                         + log.read_text()[-3000:])
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # Linux: KiB


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs=2, default=[1_000_000, 4_000_000], metavar=("SMALL", "LARGE"))
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--scratch", default="/work/scratch/stream/bench", help="data and runs (outside git)")
    p.add_argument("--code", default=str(ROOT), help="checkout whose sharded_mde trains (default: this one)")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_stream.json"))
    args = p.parse_args()

    scratch, code = Path(args.scratch), Path(args.code).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    config = scratch / "config.yaml"
    config.write_text(CONFIG.format(batch_size=args.batch_size))
    runs: Dict[str, Dict[str, Any]] = {}
    for rows in args.rows:
        data_dir, run_dir = scratch / f"data_{rows}", scratch / f"run_{rows}_{code.name}"
        sets = [a for o in (f"data.dir={data_dir}", f"data.synth_rows={rows}", f"run_dir={run_dir}")
                for a in ("--set", o)]
        shutil.rmtree(run_dir, ignore_errors=True)  # a finished checkpoint there would skip the training
        prep = _cli(code, ["data", "prepare", str(config), *sets], scratch / f"prepare_{rows}.log")
        train = _cli(code, ["train", str(config), *sets, "--force"], scratch / f"train_{rows}.log")
        meta = DatasetMeta.load(data_dir)
        metrics = json.loads((run_dir / "baseline" / "metrics.json").read_text())
        runs[str(rows)] = {"train_rows": meta.rows["train"], "eval_rows": meta.rows["valid"] + meta.rows["test"],
                           "tables": meta.num_embeddings, "steps": metrics["steps"],
                           "test_auc": round(metrics["test"]["auc"], 4), "prepare_seconds": prep["seconds"],
                           "train_seconds": train["seconds"], "train_peak_rss_mb": train["peak_rss_mb"]}
        print(f"{rows} rows: train peak RSS {train['peak_rss_mb']} MB, {train['seconds']} s", flush=True)
    small, large = (runs[str(r)] for r in args.rows)
    if small["tables"] != large["tables"]:
        raise SystemExit(f"the two sizes have different tables (not the same model): {small['tables']} vs {large['tables']}")
    ratio = large["train_peak_rss_mb"] / small["train_peak_rss_mb"]
    doc = {
        "command": " ".join(["python", "tools/bench_stream_rss.py", "--rows", *map(str, args.rows),
                             "--batch-size", str(args.batch_size)]),
        "code": str(code),
        "machine": machine_info(),
        "load_average_at_end": list(os.getloadavg()),
        "model": CONFIG.format(batch_size=args.batch_size).split("\n", 1)[1],
        "runs": runs,
        "rss_large_over_small": round(ratio, 3),
        "within_1_2x": ratio <= 1.2,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("rss_large_over_small", "within_1_2x")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
