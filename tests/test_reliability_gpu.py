"""The CUDA paths (marked gpu, skipped without CUDA; run by tools/gpu_checks.sh on the GPU machine):
training a few steps under DistributedModelParallel on CUDA, and serve-check on CUDA with the
row alignment FBGEMM's GPU kernels want (16), against the same commands on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sharded_mde.cli import main
from tiny_configs import write_run_config

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]


def _train_on_cpu(config: Path, stage: str) -> None:
    """`sharded-mde train` with CUDA hidden (gloo, CPU kernels): the reference of the CUDA runs."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "sharded_mde.cli", "train", str(config), "--stage", stage], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gpu")
    path = write_run_config(
        d, data={"format": "synth"},
        train={"batch_size": 256, "epochs": 1, "checkpoint_every": 4, "sharding": "table_wise", "progress": False},
        export={"serve_batch_size": 256})
    return path


def _metrics(config: Path, stage: str) -> dict:
    run = Path(yaml.safe_load(config.read_text())["run_dir"])
    return json.loads((run / stage / "metrics.json").read_text())


def test_dmp_trains_on_cuda_like_on_cpu(config: Path) -> None:
    """`sharded-mde train` on CUDA (NCCL, FBGEMM GPU kernels) takes every step and ends near the CPU run."""
    import torch

    _train_on_cpu(config, "cpu")
    assert torch.cuda.is_available() and main(["train", str(config), "--stage", "cuda"]) == 0  # in-process: on CUDA
    cpu, cuda = _metrics(config, "cpu"), _metrics(config, "cuda")
    assert cuda["steps"] == cpu["steps"] > 0
    assert cuda["test"]["logloss"] == pytest.approx(cpu["test"]["logloss"], abs=0.01)


def test_serve_check_on_cuda_with_row_alignment_16(config: Path, capsys: pytest.CaptureFixture) -> None:
    """The export of the CPU-trained model scores the same on CUDA (fp32, int8 at row alignment 16) as on CPU."""
    run = Path(yaml.safe_load(config.read_text())["run_dir"])
    if not (run / "cpu" / "metrics.json").is_file():
        _train_on_cpu(config, "cpu")
    export = run / "export"
    assert main(["export", str(config), "--checkpoint", str(run / "cpu" / "checkpoints"), "--out", str(export),
                 "--force"]) == 0
    capsys.readouterr()
    scores = {}
    for device, dtype in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "int8")):
        assert main(["serve-check", str(config), "--export", str(export), "--device", device, "--dtype", dtype,
                     "--set", "export.row_alignment=16"]) == 0
        scores[device, dtype] = json.loads(capsys.readouterr().out)
    assert scores["cuda", "fp32"]["row_alignment"] == 16
    assert scores["cuda", "fp32"]["auc"] == pytest.approx(scores["cpu", "fp32"]["auc"], abs=1e-4)
    assert scores["cuda", "int8"]["auc"] == pytest.approx(scores["cpu", "fp32"]["auc"], abs=0.02)
