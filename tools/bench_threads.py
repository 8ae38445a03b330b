"""Times `sharded-mde run CONFIG` with the CLI's own CPU thread default beside `OMP_NUM_THREADS=1`.

Both runs start from scratch in fresh run directories (the data directory is prepared once,
untimed, first), alternate (default, 1, default, 1, ...) so that a change of machine load hits both
the same way, and are compared on wall time and on their test metrics (the summary's models).
Writes docs/bench_threads.json by default. Meaningful only on an otherwise idle machine.

    .venv/bin/python tools/bench_threads.py configs/demo.yaml --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sharded_mde.bench import machine_info  # noqa: E402


def _env(threads: str) -> Dict[str, str]:
    """The environment of one run: OMP_NUM_THREADS removed (the CLI's default) or set by hand."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if threads != "default":
        env["OMP_NUM_THREADS"] = threads
    return env


def _cli(args: List[str], threads: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sharded_mde.cli", *args], cwd=ROOT, env=_env(threads),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def timed_run(config: str, run_dir: Path, overrides: List[str], threads: str) -> Dict[str, Any]:
    """One whole `sharded-mde run` in `run_dir`: wall seconds and the summary's test metrics."""
    sets = [a for o in [f"run_dir={run_dir}", *overrides] for a in ("--set", o)]
    t0 = time.perf_counter()
    proc = _cli(["run", config, *sets], threads)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run with threads={threads} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    models = {m["model"]: {"auc": m["auc"], "logloss": m["logloss"]} for m in summary["models"]}
    serve = json.loads((run_dir / "stages.json").read_text())["stages"]["serve_check"]["outputs"]
    return {"seconds": round(seconds, 2), "models": models, "threads": serve["device"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config", nargs="?", default="configs/demo.yaml")
    p.add_argument("--repeats", type=int, default=1, help="runs of each setting")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_threads.json"))
    args = p.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bench_threads."))
    sets = [a for o in args.overrides for a in ("--set", o)]
    prep = _cli(["data", "prepare", args.config, *sets], "1")  # the data, untimed: both settings reuse it
    if prep.returncode != 0:
        raise SystemExit(f"data prepare failed:\n{prep.stdout[-3000:]}")
    runs: Dict[str, List[Dict[str, Any]]] = {"default": [], "1": []}
    try:
        for i in range(args.repeats):
            for threads in runs:
                r = timed_run(args.config, scratch / f"{threads}_{i}", args.overrides, threads)
                runs[threads].append(r)
                print(f"threads={threads} run {i}: {r['seconds']:.1f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    median = {t: statistics.median(r["seconds"] for r in rs) for t, rs in runs.items()}
    doc = {
        "command": " ".join(["python", "tools/bench_threads.py", args.config, "--repeats", str(args.repeats),
                             *[f"--set {o}" for o in args.overrides]]),
        "machine": machine_info(),
        "load_average_at_end": list(os.getloadavg()),
        "seconds": {t: [r["seconds"] for r in rs] for t, rs in runs.items()},
        "median_seconds": median,
        "default_over_one_thread": round(median["default"] / median["1"], 3),
        "same_metrics": all(a["models"] == b["models"] for a, b in zip(runs["default"], runs["1"])),
        "models": {t: rs[0]["models"] for t, rs in runs.items()},
        "threads_chosen_by_default": [r["threads"] for r in runs["default"]],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: doc[k] for k in ("median_seconds", "default_over_one_thread", "same_metrics")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
