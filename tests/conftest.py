"""Shared pytest set-up: quiet TorchRec logging, the `gpu` marker skipped without CUDA, the
process-wide float mode reset after each test (the CLI, run in-process by tests, flushes subnormals),
and a summary line for every gloo runtime abort that `dist_utils.run_ranks` retried."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # for tests/dist_utils.py in spawned ranks
logging.getLogger("torchrec").setLevel(logging.ERROR)


def pytest_collection_modifyitems(config: pytest.Config, items: list) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Lists the gloo aborts `run_ranks` retried (an intermittent crash must not pass silently)."""
    dist_utils = sys.modules.get("dist_utils")
    retried = getattr(dist_utils, "RETRIED_ABORTS", [])
    if retried:
        terminalreporter.write_sep("=", f"{len(retried)} gloo runtime abort(s) retried by run_ranks", yellow=True)
        for line in retried:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True)
def _subnormals_back_on():
    """`sharded-mde` flushes subnormal floats process-wide (`tune_cpu_process`); hypothesis refuses to
    generate floats in that mode, so every test starts and ends with IEEE-754 subnormals."""
    torch.set_flush_denormal(False)
    yield
    torch.set_flush_denormal(False)


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 KiB tmpfs (needs root; skipped where it cannot be mounted): a file system that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)])
