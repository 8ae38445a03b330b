"""Distributed fault tolerance: under `torchrun --max-restarts 1`, rank 1 SIGKILLed mid-training; the
job restarts from the last checkpoint, finishes, and ends with the uninterrupted run's model."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from sharded_mde.train.checkpoint import CheckpointReader, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WRAPPER = Path(__file__).with_name("fault_train.py")  # sharded-mde with the kill hook (tests only)
TABLES = [f"t_C{i}" for i in range(1, 7)]
STEPS = 12  # 2 epochs of 6 global batches
KILL_STEP = 9  # in epoch 2, after the checkpoint of step 8, before the one of step 12
LAST_CHECKPOINT = 8
RTOL, ATOL = 1e-5, 1e-6
TIMEOUT_S = 240  # per torchrun; a run takes 15-40 s on 2 busy cores


def _config(tmp: Path) -> Path:
    """Tiny planted data, every table row-wise over both ranks, a checkpoint (and an eval) every 4 steps."""
    cfg = {
        "run_dir": str(tmp / "run"),
        "data": {"format": "synth", "dir": str(tmp / "data"), "synth_rows": 2000, "synth_vocab_max": 500,
                 "synth_num_sparse": len(TABLES), "synth_seed": 0},
        "model": {"embedding_dim": 8, "dense_arch": [16, 8], "over_arch": [16, 1]},
        "train": {"batch_size": 128, "epochs": 2, "checkpoint_every": 4, "eval_every": 4, "eval_batches": 2,
                  "sharding": "row_wise", "progress": False},
    }
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _torchrun(config: Path, stage: str, kill_step: int) -> str:
    """`sharded-mde train` on 2 gloo ranks under torchrun with one restart allowed; returns its stderr."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", str(WRAPPER), "train", str(config), "--stage", stage]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FAULT_KILL_STEP": str(kill_step), "FAULT_KILL_RANK": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers on SIGTERM (they run in sessions of their own)
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        pytest.fail(f"torchrun ({stage}) still running after {TIMEOUT_S} s:\n{stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    return stderr


def _events(stderr: str) -> List[Dict[str, str]]:
    """The wrapper's `[fault] attempt=A rank=R key=value` lines as dicts."""
    return [dict(re.findall(r"(\w+)=(\S+)", line)) for line in stderr.splitlines() if line.startswith("[fault] ")]


def _pick(events: List[Dict[str, str]], attempt: int, key: str) -> Dict[int, str]:
    """{rank: value of `key`} over the events of one attempt."""
    return {int(e["rank"]): e[key] for e in events if e["attempt"] == str(attempt) and key in e}


def _assert_same(ref: Any, got: Any, key: str, counts: Dict[str, int]) -> None:
    """Walks two checkpoint payloads together; tensors within RTOL/ATOL, everything else equal."""
    if isinstance(ref, torch.Tensor):
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")
        for name in [*TABLES, "dense"]:
            if name in key or (name == "dense" and ".embedding_bags." not in key):
                counts[name] = counts.get(name, 0) + 1
                break
    elif isinstance(ref, dict):
        assert set(got) == set(ref), f"{key}: keys {sorted(set(got) ^ set(ref))} differ"
        for k in ref:
            _assert_same(ref[k], got[k], f"{key}.{k}", counts)
    elif isinstance(ref, (list, tuple)):
        assert len(got) == len(ref), f"{key}: length {len(got)} != {len(ref)}"
        for i, (r, g) in enumerate(zip(ref, got)):
            _assert_same(r, g, f"{key}[{i}]", counts)
    elif isinstance(ref, float):
        assert got == pytest.approx(ref, rel=RTOL, abs=ATOL), key
    else:
        assert got == ref, key


def _saved(d: Path) -> Dict[str, torch.Tensor]:
    """Every tensor entry of a DCP checkpoint (model and optimizer), whole, read in this process."""
    entries = dcp.FileSystemReader(d).read_metadata().state_dict_metadata
    out = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in entries.items()
           if isinstance(m, TensorStorageMetadata) and not k.startswith("trainer.")}
    dcp.load(out, storage_reader=dcp.FileSystemReader(d), no_dist=True)
    return out


def test_rank_killed_under_torchrun_restarts_from_the_checkpoint_and_matches(tmp_path: Path) -> None:
    config = _config(tmp_path)
    run = tmp_path / "run"
    ref_stderr = _torchrun(config, "reference", kill_step=0)  # also prepares the data
    ref_log = _events(ref_stderr)
    # The reference runs without a kill; torchrun restarts it only after a gloo runtime abort
    # (tests/dist_utils.run_ranks), from which it resumes like any restart.
    assert not any("sigkill_at" in e for e in ref_log)
    assert {e["attempt"] for e in ref_log} == {"0"} or "terminate called without an active exception" in ref_stderr

    stderr = _torchrun(config, "killed", kill_step=KILL_STEP)
    log = _events(stderr)
    # Attempt 0 started fresh and rank 1 died by SIGKILL at the chosen step; torchrun saw it (-9) ...
    assert _pick(log, 0, "step") == {0: "0", 1: "0"} and _pick(log, 0, "resumed") == {0: "False", 1: "False"}
    assert _pick(log, 0, "sigkill_at") == {1: str(KILL_STEP)}
    assert "exitcode: -9" in stderr, stderr[-4000:]
    # ... restarted the group once, and both ranks resumed from the last checkpoint, not from step 0.
    assert {e["attempt"] for e in log} == {"0", "1"}
    assert _pick(log, 1, "resumed") == {0: "True", 1: "True"}
    assert _pick(log, 1, "step") == {0: str(LAST_CHECKPOINT), 1: str(LAST_CHECKPOINT)}
    assert _pick(log, 1, "first_step") == {0: str(LAST_CHECKPOINT + 1), 1: str(LAST_CHECKPOINT + 1)}

    ref_metrics = json.loads((run / "reference" / "metrics.json").read_text())
    metrics = json.loads((run / "killed" / "metrics.json").read_text())
    assert ref_metrics["steps"] == metrics["steps"] == STEPS
    # Evals every 4 steps and at each epoch end; those up to step 8 came back from the checkpoint.
    assert [h["step"] for h in metrics["history"]] == [4, 6, 8, 12]
    _assert_same(ref_metrics["history"], metrics["history"], "history", {})
    _assert_same(ref_metrics["test"], metrics["test"], "test", {})

    ref_dir = latest_checkpoint(run / "reference" / "checkpoints")
    got_dir = latest_checkpoint(run / "killed" / "checkpoints")
    assert ref_dir is not None and got_dir is not None and ref_dir.name == got_dir.name == f"step_{STEPS:09d}"
    ref, got = _saved(ref_dir), _saved(got_dir)
    counts: Dict[str, int] = {}
    # Model (every table and the dense parameters) and optimizer state, whole tensors as saved.
    _assert_same(ref, got, "checkpoint", counts)
    # Each table: its weight and row-wise Adagrad state; dense: params + Adam state.
    assert all(counts.get(t, 0) == 2 for t in TABLES), counts
    assert counts["dense"] > 20, counts
    for rank in range(2):  # each rank's step, history, callback states and RNG
        _assert_same(CheckpointReader(ref_dir).trainer_state(rank), CheckpointReader(got_dir).trainer_state(rank),
                     f"trainer state of rank {rank}", {})
