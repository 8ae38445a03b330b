"""Tiny synthetic run configs shared by the end-to-end tests (4 sparse and 3 dense fields, small MLPs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from sharded_mde.config import load_config
from sharded_mde.data.prepare import prepare


def write_run_config(d: Path, data: Optional[Dict[str, Any]] = None, model: Optional[Dict[str, Any]] = None,
                     **sections: Any) -> Path:
    """Writes `<d>/run.yaml`: run and data under `d`, 3,000 synthetic rows of 4 sparse and 3 dense fields,
    dim 16; `data` and `model` keys are laid over those defaults, other sections are taken as given."""
    path = d / "run.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(d / "run"),
        "data": {"dir": str(d / "data"), "synth_rows": 3000, "synth_num_sparse": 4, "synth_num_dense": 3,
                 "synth_vocab_min": 20, "synth_vocab_max": 300, **(data or {})},
        "model": {"embedding_dim": 16, "dense_arch": [8, 8], "over_arch": [8, 1], **(model or {})},
        **sections,
    }))
    return path


def tiny_planted_config(d: Path, sharding: str, search: Dict[str, Any]) -> Path:
    """Writes `<d>/run.yaml` (6,000 rows, run and data under `d`) with the given sharding and search section,
    prepares its data."""
    path = write_run_config(
        d, data={"synth_rows": 6000, "synth_vocab_min": 30, "synth_vocab_max": 2000},
        train={"batch_size": 256, "epochs": 1, "checkpoint_every": 0, "sharding": sharding, "progress": False},
        search=search)
    prepare(load_config(path).data, progress=False)
    return path
