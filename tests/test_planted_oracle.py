"""tools/planted_oracle.py: rank-following dims that fit the budget (the reference of docs/ham.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sharded_mde.config import DataConfig, ModelConfig, RunConfig
from sharded_mde.data import prepare
from sharded_mde.dims.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
RANKS = [0, 2, 8, 16]


def _tool():
    spec = importlib.util.spec_from_file_location("planted_oracle", ROOT / "tools" / "planted_oracle.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    d = tmp_path_factory.mktemp("oracle")
    data = DataConfig(format="synth", dir=str(d / "data"), synth_rows=2000, synth_num_sparse=4, synth_num_dense=2,
                      synth_vocab_min=50, synth_vocab_max=2000, synth_ranks=RANKS)
    prepare(data, progress=False)
    return RunConfig(run_dir=str(d / "run"), data=data, model=ModelConfig(embedding_dim=16))


@pytest.mark.parametrize("fraction", [0.3, 0.6])
def test_oracle_dims_follow_the_ranks_within_the_budget(cfg: RunConfig, fraction: float) -> None:
    dims = _tool().oracle_dims(cfg, fraction)
    assert dims.kept_bytes <= dims.budget_bytes and dims.method in METHODS
    by_rank = {r: t.dim for t, r in zip(dims.tables, RANKS)}
    assert by_rank[0] == 0 and all(by_rank[r] >= 4 and by_rank[r] % 4 == 0 for r in RANKS[1:])
    assert by_rank[2] <= by_rank[8] <= by_rank[16] <= 16
    assert dims.planted.spearman > 0.7  # ties at dim 4 keep it below 1


def test_oracle_flags_a_budget_below_every_informative_field_at_dim_4(cfg: RunConfig) -> None:
    dims = _tool().oracle_dims(cfg, 0.01)
    assert dims.kept_bytes > dims.budget_bytes  # the minimum allocation, reported as over the budget
    assert [t.dim for t in dims.tables] == [0, 4, 4, 4]
