"""`sharded-mde run` with `search.front`: the search walks the front, retrain trains every point, the summary shows it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from test_pipeline import _config, _run


def test_run_with_a_front_retrains_every_point(tmp_path: Path) -> None:
    path = _config(tmp_path, "front")
    cfg = yaml.safe_load(path.read_text())
    cfg["search"].update(budget=0.6, front=[0.9, 0.75, 0.6], epochs=2)  # every field at dim 4 of 8 is 56%
    path.write_text(yaml.safe_dump(cfg))
    _run([str(path)])
    run_dir = tmp_path / "front"
    ledger = json.loads((run_dir / "stages.json").read_text())["stages"]
    search, retrain = ledger["search"]["outputs"], ledger["retrain"]["outputs"]
    front = retrain["front"]
    assert [p["budget"] for p in front] == [0.9, 0.75, 0.6] and all(p["feasible"] for p in front)
    assert front[-1]["test"] == retrain["test"] and front[-1]["kept_bytes"] == search["kept_bytes"]
    for p in front[:-1]:
        done = json.loads((run_dir / f"retrain_front_b{p['budget']:g}" / "retrain.json").read_text())
        assert done["test"] == p["test"] and done["kept_bytes"] == p["kept_bytes"] <= p["budget_bytes"]
    assert front[-1]["kept_bytes"] < front[0]["budget_bytes"]  # not monotone in general: bytes without worth stay unspent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["front"] == front
    text = (run_dir / "summary.md").read_text()
    assert "HAM front from one search" in text and text.count("| 0.") >= 3
