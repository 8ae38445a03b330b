"""Batches from prepared splits: equal per rank, disjoint shares, exact eval coverage, KJT layout, and
streamed input: the documented order (in-memory order within one window, else a block shuffle), resume,
bounded rows held and bounded memory over an epoch."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sharded_mde.config import DataConfig
from sharded_mde.data import (DatasetMeta, iterate_batches, iterate_eval_batches, num_batches, num_eval_batches,
                              prepare)
from sharded_mde.data.batches import TrainStream


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


# ---------------------------------------------------------------- streamed input

def small_row_groups(data_dir, rows: int) -> None:
    """Rewrites every prepared part in row groups of `rows` rows (same rows, same meta.json)."""
    meta = DatasetMeta.load(data_dir)
    for parts in meta.parts.values():
        for p, _ in parts:
            pq.write_table(pq.read_table(data_dir / p), data_dir / p, row_group_size=rows)


@pytest.fixture(scope="module")
def multi_dir(tmp_path_factory):
    """Prepared data with a dense, a single-valued and a multi-valued (list<int32>) field, in row groups of 250."""
    d = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    n = 3000
    tags = [None if i % 17 == 3 else [f"t{j}" for j in rng.integers(0, 30, rng.integers(0, 4))] for i in range(n)]
    pq.write_table(pa.table({"label": pa.array((rng.random(n) < 0.3).astype(np.float32)),
                             "x": pa.array(rng.random(n).astype(np.float32)),
                             "user": [f"u{i}" for i in rng.integers(0, 50, n)],
                             "tags": pa.array(tags, pa.list_(pa.string()))}), d / "in.parquet")
    prepare(DataConfig(format="parquet", paths=[str(d / "in.parquet")], dir=str(d / "data")), progress=False)
    small_row_groups(d / "data", 250)
    return d / "data"


def table_rows(data_dir, split: str) -> list:
    """The split's rows in stored order as (label, dense, ((ids of key) per key)), read whole by pyarrow."""
    meta = DatasetMeta.load(data_dir)
    t = pa.concat_tables([pq.read_table(data_dir / p) for p, _ in meta.parts[split]]).to_pydict()
    return [(t["label"][i], tuple(t[c][i] for c in meta.dense_features),
             tuple(tuple(t[k][i] or []) if k in meta.multi_valued else (t[k][i],) for k in meta.sparse_features))
            for i in range(len(t["label"]))]


def kjt_batch_rows(batch) -> list:
    """A batch's rows in the form of `table_rows`, read back through TorchRec's per-key view."""
    per_key = batch.sparse_features.to_dict()
    keys = batch.sparse_features.keys()
    ids = [[tuple(r.tolist()) for r in per_key[k].to_dense()] for k in keys]
    return [(float(batch.labels[i]), tuple(batch.dense_features[i].tolist()), tuple(ids[j][i] for j in range(len(keys))))
            for i in range(batch.labels.shape[0])]


def documented_order(n_rows: int, group_sizes: list, seed: int, epoch: int, rank: int, window: int) -> np.ndarray:
    """The module docstring's training order over a share's rows, from the whole share at once (the reference)."""
    key = [seed, epoch, rank]
    if n_rows <= window:
        return np.random.default_rng(key).permutation(n_rows)
    starts = np.cumsum([0] + group_sizes)
    windows = []
    for i in np.random.default_rng(key).permutation(len(group_sizes)):
        if not windows or sum(group_sizes[j] for j in windows[-1]) + group_sizes[i] > window:
            windows.append([])
        windows[-1].append(i)
    order = []
    for w, blocks in enumerate(windows):
        rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in blocks])
        order.append(rows[np.random.default_rng(key + [w + 1]).permutation(len(rows))])
    return np.concatenate(order)


@pytest.mark.parametrize("window", [10_000, 700])
@pytest.mark.parametrize("world_size", [1, 2])
def test_streamed_batches_follow_the_documented_order(multi_dir, window, world_size):
    """A share within one window: the in-memory order (one permutation of the share); a larger share:
    the block shuffle. Multi-valued bags arrive whole, per-rank shares are today's contiguous halves."""
    meta = DatasetMeta.load(multi_dir)
    assert meta.multi_valued == ["tags"]
    rows = table_rows(multi_dir, "train")
    per, batch_size = meta.rows["train"] // world_size, 96
    for rank in range(world_size):
        lo = rank * per
        # row groups are 250 rows from the start of the part: the share cuts its first and last
        edges = sorted({lo, lo + per} | set(range(0, meta.rows["train"], 250)))
        sizes = [b - a for a, b in zip(edges, edges[1:]) if lo <= a < lo + per]
        assert len(sizes) > 3
        for epoch in (0, 1):
            order = documented_order(per, sizes, 7, epoch, rank, window)
            got = [r for b in iterate_batches(multi_dir, "train", batch_size, rank, world_size, seed=7, epoch=epoch,
                                              window_rows=window) for r in kjt_batch_rows(b)]
            n = (per // batch_size) * batch_size
            assert got == [rows[lo + i] for i in order[:n]]
            assert any(len(r[2][1]) == 0 for r in got) and any(len(r[2][1]) > 1 for r in got)


def test_streamed_resume_and_epoch_cover_the_share(multi_dir):
    full = [kjt_batch_rows(b) for b in iterate_batches(multi_dir, "train", 64, seed=3, epoch=2, window_rows=600)]
    for start in (1, 9, len(full) - 1):  # batch 9 spans two windows of 600 rows
        resumed = [kjt_batch_rows(b) for b in iterate_batches(multi_dir, "train", 64, seed=3, epoch=2,
                                                               start_batch=start, window_rows=600)]
        assert resumed == full[start:]
    every = [r for b in iterate_batches(multi_dir, "train", 64, seed=3, epoch=2, drop_last=False, window_rows=600)
             for r in kjt_batch_rows(b)]
    assert sorted(every) == sorted(table_rows(multi_dir, "train")) and every != table_rows(multi_dir, "train")
    other = [r for b in iterate_batches(multi_dir, "train", 64, seed=3, epoch=3, window_rows=600)
             for r in kjt_batch_rows(b)]
    assert other[:64] != every[:64]


@pytest.mark.parametrize("window", [300, 600, 1000])
def test_stream_holds_one_window_and_a_batch(multi_dir, window):
    stream = TrainStream(multi_dir, "train", 50, seed=1, window_rows=window)
    assert stream.rows > 2 * window and len(stream.windows) > 2
    assert all(sum(map(len, w)) <= window for w in stream.windows)
    n = sum(b.labels.shape[0] for b in stream.batches())
    assert n == stream.rows and window // 2 < stream.peak_rows < window + 50
    whole = TrainStream(multi_dir, "train", 50, seed=1, window_rows=stream.rows)
    list(whole.batches())
    assert whole.peak_rows == stream.rows  # the check can fail: an unbounded reader holds the share


@pytest.mark.parametrize("world_size, batch_size", [(1, 128), (2, 100), (3, 1000)])
def test_streamed_eval_batches_are_the_rows_in_order_then_padding(multi_dir, world_size, batch_size):
    rows = table_rows(multi_dir, "valid")
    total = len(rows)
    for rank in range(world_size):
        per, extra = divmod(total, world_size)
        lo = rank * per + min(rank, extra)
        size = per + (rank < extra)
        got = [r for b, _ in iterate_eval_batches(multi_dir, "valid", batch_size, rank, world_size)
               for r in kjt_batch_rows(b)]
        assert got == [rows[lo + i % size] for i in range(len(got))] and len(got) >= size


def epoch_peak_bytes(data_dir, window: int) -> int:
    """Peak bytes the Python heap and numpy held over one training epoch (tracemalloc)."""
    tracemalloc.start()
    try:
        for _ in iterate_batches(data_dir, "train", 64, window_rows=window):
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_epoch_memory_does_not_grow_with_rows(tmp_path):
    dirs = []
    for rows in (3000, 12000):
        d = tmp_path / f"r{rows}"
        prepare(DataConfig(dir=str(d), synth_rows=rows, synth_vocab_min=10, synth_vocab_max=50), progress=False)
        small_row_groups(d, 200)
        dirs.append(d)
    small, large = (epoch_peak_bytes(d, 1000) for d in dirs)
    assert large < 1.2 * small
    small, large = (epoch_peak_bytes(d, 1 << 20) for d in dirs)  # in memory: the measurement sees the rows
    assert large > 3 * small
