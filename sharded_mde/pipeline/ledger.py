"""The run directory's record of finished stages (`stages.json`), so a re-run skips them.

A stage is recorded only after all its outputs are written (atomically), so an interrupted stage
is simply not in the ledger and runs again, resuming from its own checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional

from sharded_mde.io import atomic_write_json, read_json


def config_fingerprint(cfg_dict: Dict[str, Any]) -> str:
    """A short hash of a config mapping; a run directory belongs to one config."""
    return hashlib.sha256(json.dumps(cfg_dict, sort_keys=True).encode()).hexdigest()[:16]


class StageLedger:
    """Reads and appends `<run_dir>/stages.json`: {fingerprint, stages: {name: {outputs, seconds}}}."""

    def __init__(self, run_dir: str | Path, fingerprint: str) -> None:
        self.path = Path(run_dir) / "stages.json"
        self.fingerprint = fingerprint
        if self.path.exists():
            doc = read_json(self.path, "stage ledger")
            if doc.get("fingerprint") != fingerprint:
                raise ValueError(f"{self.path}: this run directory was made with a different config "
                                 "(use another run_dir, or delete it to start over)")
            self.stages: Dict[str, Any] = dict(doc.get("stages", {}))
        else:
            self.stages = {}

    def done(self, name: str) -> bool:
        return name in self.stages

    def get(self, name: str) -> Optional[Dict[str, Any]]:
        return self.stages.get(name)

    def record(self, name: str, outputs: Dict[str, Any], seconds: float) -> None:
        """Marks `name` finished with its outputs (paths and figures)."""
        self.stages[name] = {"outputs": outputs, "seconds": round(seconds, 3)}
        atomic_write_json(self.path, {"fingerprint": self.fingerprint, "stages": self.stages})
