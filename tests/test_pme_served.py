"""PME's serve weights (each token's held-out count plus the prior over its training count) and its row values
(search.pme.row_value x each token's scored rows), read from the splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torchrec import EmbeddingBagConfig

from sharded_mde.config import ConfigError, DataConfig, PmeConfig
from sharded_mde.data import prepare
from sharded_mde.search.pme import HELD_OUT_PRIOR, row_values, served_weights, tail_tables
from sharded_mde.search.pme_data import split_counts


def _counts(meta, split: str, feature: str) -> Counter:
    """Occurrences of each id of `feature` in `split`, counted row by row in Python (the reference)."""
    rows = pa.concat_tables([pq.read_table(p, columns=[feature]) for p, _ in meta.split_parts(split)])
    return Counter(rows.column(feature).to_pylist())


def test_served_weights_are_held_out_over_training_counts(tmp_path: Path) -> None:
    meta = prepare(DataConfig(format="synth", dir=str(tmp_path / "data"), synth_rows=3000, synth_num_sparse=3,
                              synth_num_dense=1, synth_vocab_min=20, synth_vocab_max=400), progress=False)
    tables = [EmbeddingBagConfig(num_embeddings=meta.num_embeddings[f], embedding_dim=8, name=f"t_{f}", feature_names=[f])
              for f in meta.sparse_features]
    weights = served_weights(tmp_path / "data", "valid", tables)
    valid = split_counts(tmp_path / "data", "valid", tables)
    absent = 0
    for t in tables:
        f = t.feature_names[0]
        train, held = _counts(meta, "train", f), _counts(meta, "valid", f)
        assert valid[t.name].tolist() == [held.get(i, 0) for i in range(t.num_embeddings)]
        want = np.array([(held.get(i, 0) + HELD_OUT_PRIOR) / max(train.get(i, 0), 1) for i in range(t.num_embeddings)])
        np.testing.assert_allclose(weights[t.name], want)
        absent += sum(1 for i in train if i not in held)
    assert absent > 0  # some training tokens never occur in validation: they get the prior only


def test_row_values_are_the_scored_rows_times_the_value_per_row(tmp_path: Path) -> None:
    meta = prepare(DataConfig(format="synth", dir=str(tmp_path / "data"), synth_rows=2000, synth_num_sparse=2,
                              synth_num_dense=1, synth_vocab_min=20, synth_vocab_max=200), progress=False)
    tables = [EmbeddingBagConfig(num_embeddings=meta.num_embeddings[f], embedding_dim=8, name=f"t_{f}", feature_names=[f])
              for f in meta.sparse_features]
    added = row_values(tmp_path / "data", tables, 0.03, 0.5)  # half an epoch scored
    for t in tables:
        train = _counts(meta, "train", t.feature_names[0])
        want = np.array([0.03 * 0.5 * train.get(i, 0) for i in range(t.num_embeddings)])
        np.testing.assert_allclose(added[t.name], want)
        assert added[t.name].max() > 0


def test_tail_tables_are_those_whose_oov_id_the_serve_split_reads(tmp_path: Path) -> None:
    meta = prepare(DataConfig(format="synth", dir=str(tmp_path / "data"), synth_rows=3000, synth_num_sparse=3,
                              synth_num_dense=1, synth_vocab_min=20, synth_vocab_max=2000), progress=False)
    tables = [EmbeddingBagConfig(num_embeddings=meta.num_embeddings[f], embedding_dim=8, name=f"t_{f}", feature_names=[f])
              for f in meta.sparse_features]
    want = [t.name for t in tables if _counts(meta, "valid", t.feature_names[0]).get(1, 0) > 0]  # id 1: OOV
    assert want  # some validation values were never seen in training
    assert tail_tables(tmp_path / "data", "valid", tables) == want
    assert tail_tables(tmp_path / "data", "", tables) == [t.name for t in tables]  # no serve split: every table


def test_serve_split_and_row_value_are_validated() -> None:
    with pytest.raises(ConfigError, match="serve_split"):
        PmeConfig(serve_split="test").validate()
    with pytest.raises(ConfigError, match="row_value"):
        PmeConfig(row_value=-0.1).validate()
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="tail_share"):
            PmeConfig(tail_share=bad).validate()
