"""Shared pytest set-up: quiet TorchRec logging, the `gpu` marker skipped without CUDA."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

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
