"""PME end to end on tiny planted data, on 2 real gloo ranks: search (method pme), then retrain.

Checks what a user relies on: the dims file is valid and under budget, the renumbered data says
the same thing as the original (every id maps back to the same raw value through its own
vocabulary), planted correlations are recorded, and `retrain` trains the token-group model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dist_utils import run_ranks
from sharded_mde.config import load_config
from sharded_mde.data import DatasetMeta, prepare
from sharded_mde.dims import load_dims
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.train.distributed import init_distributed
from tiny_configs import write_run_config


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pme_search")
    path = write_run_config(
        d, data={"synth_rows": 12000, "synth_vocab_min": 30, "synth_vocab_max": 2000, "synth_tail_capacity": True},
        train={"batch_size": 256, "epochs": 1, "checkpoint_every": 0, "sharding": "row_wise", "progress": False},
        search={"method": "pme", "budget": 0.2, "pme": {"score_fraction": 0.25}})
    prepare(load_config(path).data, progress=False)
    return path


def _search_and_retrain(rank: int, world: int, config: str) -> None:
    from sharded_mde.search.run import run_search
    from sharded_mde.search.retrain import run_retrain

    cfg = load_config(config)
    env = init_distributed(prefer_cuda=False)
    dims = run_search(cfg, env)
    assert dims.method == "pme" and dims.kept_bytes <= dims.budget_bytes
    summary = run_retrain(cfg, env, Path(cfg.run_dir) / "pme" / "dims.json")
    assert summary["method"] == "pme" and 0.5 < summary["test"]["auc"] <= 1


def test_pme_search_and_retrain_on_two_ranks(config: Path) -> None:
    run_ranks(_search_and_retrain, str(config))
    cfg = load_config(config)
    out = Path(cfg.run_dir) / "pme"
    dims = load_dims(out / "dims.json", full_table_configs(cfg))
    assert dims.kept_bytes <= dims.budget_bytes
    assert any(len({g.size for g in t.groups}) > 1 for t in dims.tables)  # token-wise sizes, not one per field
    pme = dims.pme
    assert pme.timing["score_batches"] >= 1 and set(pme.tokens) == set(DatasetMeta.load(cfg.data.dir).sparse_features)
    assert any(v["spearman_frequency"] and v["spearman_frequency"] > 0 for v in pme.tokens.values())
    assert pme.combine == cfg.search.pme.combine and set(pme.reserved_sizes) == {t.name for t in dims.tables}
    # the renumbered copy encodes the same rows: the raw value of every (row, field) is unchanged, or the value was
    # pruned, left out of the renumbered vocabulary, and the row reads the out-of-vocabulary id as serving would
    src, dst = Path(cfg.data.dir), Path(dims.data_dir)
    meta = DatasetMeta.load(src)
    for f in meta.sparse_features:
        values = {d: np.array([None, "<oov>"] + pq.read_table(d / "vocab" / f"{f}.parquet").column("value").to_pylist(),
                              dtype=object) for d in (src, dst)}
        for (p_src, _), (p_dst, _) in zip(meta.split_parts("test"), DatasetMeta.load(dst).split_parts("test")):
            a = pq.read_table(p_src, columns=[f]).column(f).to_numpy()
            b = pq.read_table(p_dst, columns=[f]).column(f).to_numpy()
            kept = b != 1
            assert (values[src][a][kept] == values[dst][b][kept]).all(), f
            assert not set(values[src][a][~kept][a[~kept] > 1]) & set(values[dst][2:]), f
    metrics = Path(cfg.run_dir) / "retrain_pme" / "retrain.json"
    assert metrics.is_file()
