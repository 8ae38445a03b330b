"""Tiny planted run configs shared by the end-to-end search tests (6,000 rows, 4 fields, dim 16)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import yaml

from sharded_mde.config import load_config
from sharded_mde.data.prepare import prepare


def tiny_planted_config(d: Path, sharding: str, search: Dict[str, Any]) -> Path:
    """Writes `<d>/run.yaml` (run and data under `d`) with the given sharding and search section, prepares its data."""
    path = d / "run.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(d / "run"),
        "data": {"dir": str(d / "data"), "synth_rows": 6000, "synth_num_sparse": 4, "synth_num_dense": 3,
                 "synth_vocab_min": 30, "synth_vocab_max": 2000},
        "model": {"embedding_dim": 16, "dense_arch": [8, 8], "over_arch": [8, 1]},
        "train": {"batch_size": 256, "epochs": 1, "checkpoint_every": 0, "sharding": sharding, "progress": False},
        "search": search,
    }))
    prepare(load_config(path).data, progress=False)
    return path
