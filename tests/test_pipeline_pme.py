"""`sharded-mde run` with search.method=pme on tiny planted data, one process: every stage, on the renumbered data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_pipeline import STAGES, _config, _run


@pytest.fixture(scope="module")
def pme_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    tmp = tmp_path_factory.mktemp("pipeline_pme")
    path = _config(tmp, "run")
    cfg = yaml.safe_load(path.read_text())
    cfg["data"].update(synth_rows=6000, synth_num_sparse=6, synth_tail_capacity=True)
    cfg["search"] = {"method": "pme", "budget": 0.3, "pme": {"score_fraction": 0.1}}
    path.write_text(yaml.safe_dump(cfg))
    return tmp / "run", _run([str(path)])


def test_pme_run_plans_retrains_exports_and_serves_the_token_groups(pme_run: tuple) -> None:
    run_dir, out = pme_run
    stages = json.loads((run_dir / "stages.json").read_text())["stages"]
    assert list(stages) == STAGES
    dims = json.loads((run_dir / "pme" / "dims.json").read_text())
    groups = sorted(f"{t['name']}_s{g['size']}" for t in dims["tables"] for g in t["groups"] if g["size"] and g["rows"])
    assert len(groups) > len(dims["tables"])  # some field has tokens of two sizes
    # the plan shards exactly the token-group tables, and the export holds exactly them
    plan = json.loads((run_dir / "plan" / "sharding_plan.json").read_text())
    assert sorted(next(iter(plan["modules"].values()))) == groups
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert sorted(t["name"] for t in manifest["tables"]) == groups
    # retrain, export and serving read the search's renumbered data
    data = str(Path(dims["data_dir"]).resolve())
    assert stages["serve_check"]["outputs"]["data_dir"] == data and manifest["source"]["data_dir"] == data
    assert stages["serve_check"]["outputs"]["export_bytes"]["remap"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    models = {m["model"].split(" (")[0].split(",")[0]: m for m in summary["models"]}
    assert models["served from the export"]["auc"] == pytest.approx(models["compact"]["auc"], abs=1e-6)
    assert "Tokens per size (size:tokens) per field:" in out and "planted capacity" in out
