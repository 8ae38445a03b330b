"""Crash safety: `sharded-mde run` killed with SIGKILL during its search resumes and gives the uninterrupted dims.

The rerun goes through `tests/fault_train.py` (the CLI with a logging Trainer callback, no kill), so
the test sees that the search resumed from its newest complete checkpoint and trained on from the
step after it: a restart from step 0 gives the same dims (training is deterministic) and would
otherwise pass unnoticed.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from sharded_mde.train.checkpoint import COMPLETE, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp: Path) -> Path:
    """A tiny synth run: 6 fields, 75 search steps (at least 66 after the kill point), a checkpoint every 3."""
    cfg = {
        "run_dir": str(tmp / "run"),
        "data": {"format": "synth", "dir": str(tmp / "data"), "synth_rows": 12000, "synth_vocab_max": 500,
                 "synth_num_sparse": 6, "synth_seed": 0},
        "model": {"embedding_dim": 8, "dense_arch": [16, 8], "over_arch": [16, 1]},
        "train": {"batch_size": 128, "epochs": 1, "checkpoint_every": 3, "sharding": "table_wise"},
        "search": {"method": "ham", "budget": 0.6, "epochs": 1},  # every field at dim 4 of 8 is 56%
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(config: Path, run_dir: Path, logged: bool = False) -> subprocess.Popen:
    """The whole pipeline (data, baseline, search, plan, retrain, export, serve-check) in `run_dir`;
    `logged`: through tests/fault_train.py, which logs each Trainer's resume and first step."""
    env = dict(os.environ, OMP_NUM_THREADS="1", FAULT_KILL_STEP="0")
    entry = [str(ROOT / "tests" / "fault_train.py")] if logged else ["-m", "sharded_mde.cli"]
    return subprocess.Popen([sys.executable, *entry, "run", str(config), "--set", f"run_dir={run_dir}"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def _result(run: Path) -> dict:
    """What must not depend on an interruption (not timings or paths): the dims file and the compact model's test."""
    raw = json.loads((run / "ham" / "dims.json").read_text())
    extra = raw.get("extra", {})
    return {"tables": raw["tables"], "kept_bytes": raw["kept_bytes"], "mask_values": extra.get("mask_values"),
            "supernet_test": extra.get("supernet_test"),
            "retrain_test": json.loads((run / "retrain" / "metrics.json").read_text())["test"]}


def test_sigkill_of_run_during_search_resumes_to_the_same_dims(tmp_path: Path) -> None:
    config = _config(tmp_path)
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _finish(_run(config, reference))  # also prepares the data

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kill_after = rng.choice([3, 6, 9])  # the newest finished checkpoint when the kill lands
    extra_delay = rng.uniform(0.0, 0.03)  # somewhere between two checkpoints (or inside a save)
    ckpts = killed / "ham" / "checkpoints"
    proc = _run(config, killed)
    deadline = time.monotonic() + 240
    while not (ckpts / f"step_{kill_after:09d}" / COMPLETE).is_file():
        assert proc.poll() is None, f"search finished before the kill (seed {seed})"
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    time.sleep(extra_delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"not killed mid-search (seed {seed})"
    assert not (killed / "ham" / "dims.json").exists(), f"killed after the search had finished (seed {seed})"

    newest = latest_checkpoint(ckpts)
    assert newest is not None
    resumed_at = int(newest.name.removeprefix("step_"))
    log = _finish(_run(config, killed, logged=True))
    # The first Trainer of the rerun is the search's (baseline is recorded as done): it must resume there.
    first = re.findall(r"\[fault\] attempt=0 rank=0 (resumed=\w+ step=\d+|first_step=\d+)", log)[:2]
    assert first == [f"resumed=True step={resumed_at}", f"first_step={resumed_at + 1}"], (
        f"the rerun did not resume the search at its checkpoint step {resumed_at} (seed {seed}): {first}")
    assert _result(killed) == _result(reference), (
        f"resumed search differs from the uninterrupted one (seed {seed}, killed after step {kill_after} "
        f"+ {extra_delay:.2f}s)")

