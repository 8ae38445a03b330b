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
from sharded_mde.search.pme import HELD_OUT_PRIOR, carry_over, row_values, served_weights, served_windows, tail_tables
from sharded_mde.search.pme_data import split_counts


def _counts(meta, split: str, feature: str, start: int = 0, stop: int | None = None) -> Counter:
    """Occurrences of each id of `feature` in rows [start, stop) of `split`, counted row by row in Python (the reference)."""
    rows = pa.concat_tables([pq.read_table(p, columns=[feature]) for p, _ in meta.split_parts(split)])
    return Counter(rows.column(feature).to_pylist()[start:stop])


def _dense(c: Counter, n: int) -> np.ndarray:
    return np.array([c.get(i, 0) for i in range(n)])


def _synth(tmp_path: Path, rows: int, num_sparse: int, vocab_max: int):
    """A prepared synthetic data set under tmp_path/data and a dim-8 table per field."""
    meta = prepare(DataConfig(format="synth", dir=str(tmp_path / "data"), synth_rows=rows, synth_num_sparse=num_sparse,
                              synth_num_dense=1, synth_vocab_min=20, synth_vocab_max=vocab_max), progress=False)
    return meta, [EmbeddingBagConfig(num_embeddings=meta.num_embeddings[f], embedding_dim=8, name=f"t_{f}",
                                     feature_names=[f]) for f in meta.sparse_features]


def test_served_weights_are_held_out_over_training_counts(tmp_path: Path) -> None:
    meta, tables = _synth(tmp_path, rows=3000, num_sparse=3, vocab_max=400)
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
    meta, tables = _synth(tmp_path, rows=2000, num_sparse=2, vocab_max=200)
    added = row_values(tmp_path / "data", tables, 0.03, 0.5)  # half an epoch scored
    for t in tables:
        train = _counts(meta, "train", t.feature_names[0])
        want = np.array([0.03 * 0.5 * train.get(i, 0) for i in range(t.num_embeddings)])
        np.testing.assert_allclose(added[t.name], want)
        assert added[t.name].max() > 0


def test_tail_tables_are_those_whose_oov_id_the_serve_split_reads(tmp_path: Path) -> None:
    meta, tables = _synth(tmp_path, rows=3000, num_sparse=3, vocab_max=2000)
    want = [t.name for t in tables if _counts(meta, "valid", t.feature_names[0]).get(1, 0) > 0]  # id 1: OOV
    assert want  # some validation values were never seen in training
    assert tail_tables(tmp_path / "data", "valid", tables) == want
    assert tail_tables(tmp_path / "data", "", tables) == [t.name for t in tables]  # no serve split: every table


def test_serve_split_and_row_value_are_validated() -> None:
    with pytest.raises(ConfigError, match="serve_split"):
        PmeConfig(serve_split="test").validate()
    PmeConfig(serve_split="recent", serve_carry=True).validate()
    with pytest.raises(ConfigError, match="row_value"):
        PmeConfig(row_value=-0.1).validate()
    for bad in (-0.1, 1.0):
        with pytest.raises(ConfigError, match="tail_share"):
            PmeConfig(tail_share=bad).validate()


def test_served_windows_are_the_serve_split_and_the_rows_before_it(tmp_path: Path) -> None:
    meta, tables = _synth(tmp_path, rows=3000, num_sparse=2, vocab_max=300)
    n, w = meta.rows["train"], meta.rows["valid"]
    assert n > 2 * w > 0
    want = {"valid": [("valid", 0, None), ("train", n - w, None), ("train", 0, n - w)],
            "recent": [("train", n - w, None), ("train", n - 2 * w, n - w), ("train", 0, n - 2 * w)]}
    for split, windows in want.items():
        got = served_windows(tmp_path / "data", split, tables)
        for t in tables:
            f = t.feature_names[0]
            for counts, (sp, lo, hi) in zip(got, windows):
                np.testing.assert_array_equal(counts[t.name], _dense(_counts(meta, sp, f, lo, hi), t.num_embeddings))
    # recent reads training rows only: the OOV id never occurs there, so tail rows follow validation's OOV ids
    assert tail_tables(tmp_path / "data", "recent", tables) == tail_tables(tmp_path / "data", "valid", tables)


def test_carry_over_recovers_a_fields_forecast_and_never_goes_negative() -> None:
    rng = np.random.default_rng(0)
    last = np.r_[0, 0, rng.integers(0, 50, 300)].astype(float)
    earlier = np.r_[0, 0, rng.integers(0, 400, 300)].astype(float)
    scaled = earlier * last[2:].sum() / earlier[2:].sum()
    a, b = carry_over(0.6 * last + 0.3 * scaled, last, earlier)
    assert a == pytest.approx(0.6) and b == pytest.approx(0.3)
    # a field whose history says the opposite of its next window (users who leave): b would be negative, is 0
    a, b = carry_over(np.maximum(0.0, last - 0.5 * scaled), last, earlier)
    assert b == 0.0 and a > 0
    assert carry_over(np.zeros(5), np.zeros(5), np.zeros(5)) == (1.0, 0.0)  # no evidence: the served counts as they are


def test_carried_served_weights_follow_each_fields_forecast(tmp_path: Path) -> None:
    meta, tables = _synth(tmp_path, rows=3000, num_sparse=2, vocab_max=300)
    plain = served_weights(tmp_path / "data", "recent", tables)
    carried = served_weights(tmp_path / "data", "recent", tables, carry=True)
    served, last, earlier = served_windows(tmp_path / "data", "recent", tables)
    for t in tables:
        train = split_counts(tmp_path / "data", "train", tables)[t.name]
        np.testing.assert_allclose(plain[t.name], (served[t.name] + HELD_OUT_PRIOR) / np.maximum(train, 1))
        a, b = carry_over(served[t.name], last[t.name], earlier[t.name])
        scale = served[t.name][2:].sum() / train[2:].sum()
        np.testing.assert_allclose(carried[t.name], (a * served[t.name] + b * scale * train + HELD_OUT_PRIOR) / np.maximum(train, 1))
        assert not np.allclose(carried[t.name], plain[t.name])
