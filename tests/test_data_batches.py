"""Batches from prepared splits: equal per rank, disjoint shares, exact eval coverage, KJT layout."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sharded_mde.config import DataConfig
from sharded_mde.data import (DatasetMeta, iterate_batches, iterate_eval_batches, num_batches, num_eval_batches,
                              prepare)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("batches") / "data"
    prepare(DataConfig(dir=str(d), synth_rows=4000, synth_vocab_min=10, synth_vocab_max=500), progress=False)
    return d


def split_rows(data_dir, split: str) -> np.ndarray:
    """The split as one matrix [n, 1 + D + F] (label, dense, sparse ids) in stored order."""
    meta = DatasetMeta.load(data_dir)
    table = pa.concat_tables([pq.read_table(data_dir / p) for p, _ in meta.parts[split]])
    return np.stack([table.column(c).to_numpy().astype(np.float64) for c in table.column_names], axis=1)


def batch_rows(batch, n: int | None = None) -> np.ndarray:
    """A batch as rows [B, 1 + D + F], checking the KJT layout on the way."""
    kjt = batch.sparse_features
    b = batch.labels.shape[0]
    assert kjt.stride() == b and torch.all(kjt.lengths() == 1) and kjt.values().dtype == torch.int64
    ids = kjt.values().reshape(len(kjt.keys()), b).T
    rows = torch.cat([batch.labels[:, None].double(), batch.dense_features.double(), ids.double()], 1).numpy()
    return rows if n is None else rows[:n]


def as_sorted(rows: np.ndarray) -> np.ndarray:
    return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.parametrize("world_size, batch_size", [(1, 256), (2, 128), (3, 100)])
def test_train_batches_equal_per_rank_and_disjoint(data_dir, world_size, batch_size):
    meta = DatasetMeta.load(data_dir)
    n = num_batches(data_dir, "train", batch_size, world_size)
    assert n == (meta.rows["train"] // world_size) // batch_size > 0
    seen = []
    for rank in range(world_size):
        batches = list(iterate_batches(data_dir, "train", batch_size, rank, world_size, seed=1, epoch=0))
        assert len(batches) == n and all(b.labels.shape[0] == batch_size for b in batches)
        assert batches[0].sparse_features.keys() == meta.sparse_features
        assert batches[0].dense_features.shape == (batch_size, len(meta.dense_features))
        seen.append(np.concatenate([batch_rows(b) for b in batches]))
    every = as_sorted(np.concatenate(seen))
    rows = split_rows(data_dir, "train")
    # each batch row is a real row and no row is served twice within an epoch
    stored = {r.tobytes(): c for r, c in zip(*np.unique(rows, axis=0, return_counts=True))}
    got = {r.tobytes(): c for r, c in zip(*np.unique(every, axis=0, return_counts=True))}
    assert all(stored.get(k, 0) >= c for k, c in got.items()) and len(every) == n * batch_size * world_size


def test_shuffle_per_epoch_and_resume(data_dir):
    a0 = [batch_rows(b) for b in iterate_batches(data_dir, "train", 200, seed=5, epoch=0)]
    again = [batch_rows(b) for b in iterate_batches(data_dir, "train", 200, seed=5, epoch=0)]
    a1 = [batch_rows(b) for b in iterate_batches(data_dir, "train", 200, seed=5, epoch=1)]
    resumed = [batch_rows(b) for b in iterate_batches(data_dir, "train", 200, seed=5, epoch=0, start_batch=3)]
    assert all(np.array_equal(x, y) for x, y in zip(a0, again))
    assert not np.array_equal(a0[0], a1[0])
    for epoch in (0, 1):  # every epoch serves the whole share (one rank: the whole split), in a new order
        full = [batch_rows(b) for b in iterate_batches(data_dir, "train", 200, seed=5, epoch=epoch, drop_last=False)]
        assert np.array_equal(as_sorted(np.concatenate(full)), as_sorted(split_rows(data_dir, "train")))
    assert len(resumed) == len(a0) - 3 and all(np.array_equal(x, y) for x, y in zip(a0[3:], resumed))
    last = list(iterate_batches(data_dir, "train", 300, drop_last=False))
    assert len(last) == num_batches(data_dir, "train", 300, drop_last=False) and last[-1].labels.shape[0] < 300


@pytest.mark.parametrize("world_size, batch_size", [(1, 128), (2, 64), (3, 50), (7, 1000)])
def test_eval_batches_cover_every_row_once(data_dir, world_size, batch_size):
    rows = split_rows(data_dir, "valid")
    n = num_eval_batches(data_dir, "valid", batch_size, world_size)
    got = []
    for rank in range(world_size):
        batches = list(iterate_eval_batches(data_dir, "valid", batch_size, rank, world_size))
        assert len(batches) == n and all(b.labels.shape[0] == batch_size for b, _ in batches)
        valid = [k for _, k in batches]
        assert valid == sorted(valid, reverse=True)  # real rows first, padding only at the end
        got += [batch_rows(b, k) for b, k in batches]
    assert np.array_equal(as_sorted(np.concatenate(got)), as_sorted(rows))
    limited = list(iterate_eval_batches(data_dir, "valid", batch_size, 0, world_size, max_batches=1))
    assert len(limited) == 1


def test_tiny_split_pads_empty_ranks(tmp_path):
    d = tmp_path / "tiny"
    meta = prepare(DataConfig(dir=str(d), synth_rows=30, synth_vocab_min=5, synth_vocab_max=20,
                              split=[0.8, 0.1, 0.1]), progress=False)
    world = meta.rows["test"] + 2  # more ranks than rows: some ranks only pad
    out = [list(iterate_eval_batches(d, "test", 4, r, world)) for r in range(world)]
    assert {len(o) for o in out} == {1} and sum(o[0][1] for o in out) == meta.rows["test"]
    assert out[-1][0][0].labels.shape[0] == 4 and out[-1][0][1] == 0


def test_bad_arguments_and_missing_data(tmp_path, data_dir):
    with pytest.raises(ValueError, match="meta.json: not found"):
        num_batches(tmp_path / "nothing", "train", 10)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        list(iterate_batches(data_dir, "dev", 10))
    with pytest.raises(ValueError, match="rank < world_size"):
        list(iterate_batches(data_dir, "train", 10, rank=2, world_size=2))
