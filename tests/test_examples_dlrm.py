"""examples/dlrm_search.py runs on small random data and is examples/dlrm_plain.py plus a few marked lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from test_budgeted_search_dlrm import assert_on_budget
from torchrec import EmbeddingBagConfig

from sharded_mde import load_dims
from sharded_mde.train.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
PLAIN, SEARCH = ROOT / "examples" / "dlrm_plain.py", ROOT / "examples" / "dlrm_search.py"
MARK = "# sharded_mde"


def test_search_script_differs_from_plain_only_by_marked_lines() -> None:
    diff = subprocess.run(["diff", str(PLAIN), str(SEARCH)], capture_output=True, text=True)
    assert diff.returncode == 1, diff.stderr  # they differ
    added = [line for line in diff.stdout.splitlines() if line.startswith("> ")]
    removed = [line for line in diff.stdout.splitlines() if line.startswith("< ")]
    unmarked = [line for line in added if MARK not in line]
    assert not unmarked, f"lines added without the {MARK!r} mark: {unmarked}"
    changed = re.findall(r"^\d+(?:,\d+)?([acd])\d+", diff.stdout, flags=re.M)
    assert "d" not in changed, "the search script deletes lines of the plain one"
    assert len(added) <= 10 and len(removed) <= 2, diff.stdout  # a handful: imports, the EBC, the hook, the output


def test_search_script_runs_and_writes_dims_on_budget(tmp_path: Path) -> None:
    out = tmp_path / "dims.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(SEARCH), "--steps", "30", "--num_embeddings", "200", "--budget", "0.4",
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "step 20: loss" in run.stdout
    dims = load_dims(out)
    assert dims.method == "ham" and abs(dims.budget_fraction - 0.4) < 1e-12
    tables = [EmbeddingBagConfig(name=t.name, num_embeddings=t.num_embeddings, embedding_dim=t.full_dim,
                                 feature_names=t.features) for t in dims.tables]
    assert [t.num_embeddings for t in tables] == [200] * 4
    assert_on_budget(dims, tables)
