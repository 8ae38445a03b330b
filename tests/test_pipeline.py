"""`sharded-mde run` end to end on tiny planted data: one process, a re-run that skips, and 2 ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

STAGES = ["data", "baseline", "search", "plan", "retrain", "export", "serve_check", "summary"]


def _config(tmp: Path, name: str) -> Path:
    cfg = {
        "run_dir": str(tmp / name),
        "data": {"format": "synth", "dir": str(tmp / "data"), "synth_rows": 8000, "synth_vocab_max": 800},
        "model": {"embedding_dim": 8, "dense_arch": [16, 8], "over_arch": [16, 1]},
        "train": {"batch_size": 256, "epochs": 1, "checkpoint_every": 10, "sharding": "table_wise", "progress": False},
        "search": {"method": "ham", "budget": 0.6, "epochs": 1},  # every field at dim 4 of 8 is 56%
        "plan": {"world_size": 4, "compute_device": "cuda", "hbm_cap_gb": 16},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(args: list, nproc: int = 1) -> str:
    cmd = [sys.executable, "-m", "sharded_mde.cli", "run", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = _config(tmp, "run1")
    return cfg, _run([str(cfg)]), tmp


def test_run_writes_every_stage_and_a_consistent_summary(one_process_run: tuple) -> None:
    cfg, out, tmp = one_process_run
    run_dir = tmp / "run1"
    ledger = json.loads((run_dir / "stages.json").read_text())
    assert list(ledger["stages"]) == STAGES
    summary = json.loads((run_dir / "summary.json").read_text())
    models = {m["model"].split(" (")[0].split(",")[0]: m for m in summary["models"]}
    assert set(models) == {"teacher", "full-dimension baseline", "compact", "served from the export"}
    # fp32 serving from the export alone reproduces the retrained compact model.
    assert models["served from the export"]["auc"] == pytest.approx(models["compact"]["auc"], abs=1e-6)
    search = ledger["stages"]["search"]["outputs"]
    assert search["kept_bytes"] <= search["budget_bytes"] < search["full_bytes"]
    assert all(d % 4 == 0 for d in search["dims"].values())
    for plot in summary["plots"].values():
        assert Path(plot).stat().st_size > 1000
    assert "| teacher (planted ground truth) |" in out


def test_rerun_skips_finished_stages(one_process_run: tuple) -> None:
    cfg, _, tmp = one_process_run
    before = (tmp / "run1" / "summary.json").stat().st_mtime_ns
    out = _run([str(cfg)])
    assert [line for line in out.splitlines() if line.startswith("[run]")] == \
        [f"[run] {s}: done earlier, skipped" for s in STAGES]
    assert (tmp / "run1" / "summary.json").stat().st_mtime_ns == before


def test_rerun_with_another_config_is_refused(one_process_run: tuple) -> None:
    """A changed search config reruns the search, which refuses to resume the old config's checkpoints."""
    cfg, _, tmp = one_process_run
    cmd = [sys.executable, "-m", "sharded_mde.cli", "run", str(cfg), "--set", "search.budget=0.7"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "[run] baseline: done earlier, skipped" in done.stdout
    assert str(tmp / "run1" / "ham" / "checkpoints") in done.stderr and "another training config" in done.stderr
    assert "--force" in done.stderr


def test_run_on_two_ranks_with_torchrun(one_process_run: tuple) -> None:
    _, _, tmp = one_process_run
    cfg = _config(tmp, "run2")
    _run([str(cfg)], nproc=2)
    summary = json.loads((tmp / "run2" / "summary.json").read_text())
    assert len(summary["models"]) == 4
    metrics = json.loads((tmp / "run2" / "baseline" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
