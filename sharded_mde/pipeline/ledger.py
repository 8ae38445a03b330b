"""The run directory's record of finished stages (`stages.json`), so a re-run skips them.

A stage is recorded only after all its outputs are written (atomically), so an interrupted stage
is simply not in the ledger and runs again, resuming from its own checkpoints. Each record holds
the fingerprint of the config sections the stage reads (`train.checkpoint.config_fingerprint`;
moving the data directory is not a change: serve-check checks the vocabularies by digest); a rerun with a
changed config drops the first stage whose fingerprint changed and every stage after it, so an old
result is never reported for a new config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from sharded_mde.io import atomic_write_json, read_json


class StageLedger:
    """Reads and appends `<run_dir>/stages.json`: {stages: {name: {fingerprint, outputs, seconds}}}."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "stages.json"
        self.stages: Dict[str, Any] = {}
        if self.path.exists():
            doc = read_json(self.path, "stage ledger")
            stages = doc.get("stages") if isinstance(doc, dict) else None
            if not isinstance(stages, dict) or not all(isinstance(v, dict) and isinstance(v.get("outputs"), dict)
                                                       for v in stages.values()):
                raise ValueError(f"{self.path}: stage ledger is damaged (expected {{stages: {{name: {{outputs}}}}}}); "
                                 "delete it to rerun every stage (training resumes from its checkpoints)")
            self.stages = dict(stages)

    def done(self, name: str) -> bool:
        return name in self.stages

    def get(self, name: str) -> Optional[Dict[str, Any]]:
        return self.stages.get(name)

    def changed(self, fingerprints: Dict[str, str]) -> List[str]:
        """Stages to run again: from the first recorded one whose fingerprint differs, every stage after it."""
        order = list(fingerprints)
        for i, name in enumerate(order):
            st = self.stages.get(name)
            if st is not None and st.get("fingerprint") != fingerprints[name]:
                return [n for n in order[i:] if n in self.stages]
        return []

    def forget(self, names: Sequence[str]) -> None:
        """Drops the records of `names` (their outputs are written again when they rerun)."""
        for n in names:
            self.stages.pop(n, None)
        atomic_write_json(self.path, {"stages": self.stages})

    def record(self, name: str, outputs: Dict[str, Any], seconds: float, fingerprint: str = "") -> None:
        """Marks `name` finished with its outputs (paths and figures) and its config fingerprint."""
        self.stages[name] = {"fingerprint": fingerprint, "outputs": outputs, "seconds": round(seconds, 3)}
        atomic_write_json(self.path, {"stages": self.stages})
