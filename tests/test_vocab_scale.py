"""Vocabulary encoding through a persistent index and counting in bounded memory: same ids as before."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from sharded_mde.config import DataConfig
from sharded_mde.data import prepare
from sharded_mde.data.lookup import ValueIndex, hash_strings, prefix_keys
from sharded_mde.data.vocab import (MISSING_ID, NUM_RESERVED, OOV_ID, ValueCounter, Vocabulary, build_vocab,
                                   vocab_order)


def reference_encode(values: pa.Array, column: pa.Array) -> np.ndarray:
    """The encoding before the persistent index: `pc.index_in` over the whole vocabulary."""
    found = pc.index_in(column, value_set=values)
    ids = pc.fill_null(pc.add(found.cast(pa.int32()), NUM_RESERVED), OOV_ID)
    return pc.if_else(pc.is_null(column), MISSING_ID, ids).to_numpy(zero_copy_only=False).astype(np.int32)


WORDS = pa.array([("é" if i % 7 == 0 else "") + f"v{i:x}" * (i % 9) for i in range(30_000)])  # 0 to 55 bytes


def random_values(rng: np.random.Generator, n: int, pool: int) -> pa.Array:
    """n strings drawn from the first `pool` WORDS (ASCII and multi-byte, "" included), a tenth null."""
    return WORDS.take(pa.array(rng.integers(0, pool, n), mask=rng.random(n) < 0.1))


def random_bags(rng: np.random.Generator, n: int, pool: int) -> pa.ListArray:
    """n bags of 0 to 3 random_values, some bags null."""
    offsets = np.concatenate([[0], np.cumsum(rng.integers(0, 4, n))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, mask=np.r_[rng.random(n) < 0.05, False]),
                                    random_values(rng, int(offsets[-1]), pool))


@pytest.mark.parametrize("seed", range(5))
def test_vocab_order_is_arrows_sort_by_count_then_value(seed):
    """NumPy's sort by count and 8-byte prefix, ties sorted whole by Arrow: the order of Arrow's own sort, for
    values that share their first 8 bytes, hold NUL or multi-byte characters, are empty, in several chunks."""
    rng = np.random.default_rng(seed)
    parts = ["a", "b", "\x00", "é", "z", "ab", "abcdefgh", "abcdefg\x00", "\U0001F600"]
    values = sorted({"".join(rng.choice(parts, int(rng.integers(0, 6)))) for _ in range(3000)})
    values = [values[i] for i in rng.permutation(len(values))]
    counts = rng.integers(1, 1 + int(rng.integers(1, 5)), len(values))  # many ties on count
    table = pa.table({"value": pa.array(values, pa.string()), "count": pa.array(counts, pa.int64())})
    chunked = pa.concat_tables([table.slice(0, 500), table.slice(500)])
    want = table.sort_by([("count", "descending"), ("value", "ascending")])
    assert vocab_order(chunked).equals(want)
    top = prefix_keys(want.column("value"))[want.column("count").to_numpy() == want.column("count")[0].as_py()]
    assert np.all(top[1:] >= top[:-1]) and np.any(top[1:] == top[:-1])  # keys follow the values; some tie
    assert vocab_order(table.slice(0, 0)).num_rows == 0


def test_hash_is_per_string_not_per_position():
    a = pa.array(["", "a", "ab", "abcdefgh", "abcdefghi", "é", None, "a"])
    h = hash_strings(a)
    assert len(set(h[[0, 1, 2, 3, 4, 5]].tolist())) == 6 and h[1] == h[7]
    # a slice, a chunked array and a large_string array hash like the plain array
    assert hash_strings(a.slice(2, 3)).tolist() == h[2:5].tolist()
    assert hash_strings(pa.chunked_array([a.slice(0, 3), a.slice(3)])).tolist() == h.tolist()
    assert hash_strings(a.cast(pa.large_string()))[:6].tolist() == h[:6].tolist()


@pytest.mark.parametrize("hash_bits", [64, 5, 0])
def test_value_index_matches_index_in_even_when_hashes_collide(hash_bits):
    rng = np.random.default_rng(hash_bits)
    values = pc.unique(pc.drop_null(random_values(rng, 3000, 2000)))
    index = ValueIndex(values, hash_bits=hash_bits)
    assert hash_bits == 64 or len(index._shared) > 0  # the exact path for shared hashes is exercised
    column = pa.concat_arrays([random_values(rng, 5000, 4000), pa.array(["unseen", "", None])])
    expect = pc.fill_null(pc.index_in(column, value_set=values), -1).to_numpy(zero_copy_only=False)
    assert np.array_equal(index.find(column), expect)
    assert np.array_equal(index.find(column.slice(123, 1000)), expect[123:1123])


def test_encoder_equals_old_reference_on_single_and_multi_valued_fields():
    rng = np.random.default_rng(0)
    counter = ValueCounter(["f", "bag"])
    train = pa.table({"f": random_values(rng, 4000, 3000), "bag": random_bags(rng, 4000, 500)})
    counter.update(train)
    vocab_f, vocab_bag = (Vocabulary(build_vocab(counter.counts(n), min_count=2).column("value").combine_chunks())
                          for n in ("f", "bag"))
    for size in (500, 700, 20_000):  # blocks smaller than the vocabulary share one index; larger: index_in
        column = random_values(rng, size, 6000)
        got = vocab_f.encode(column)
        assert got.dtype == np.int32 and np.array_equal(got, reference_encode(vocab_f.values, column))
        assert (got[pc.is_null(column).to_numpy(zero_copy_only=False)] == MISSING_ID).all()
    bags = random_bags(rng, 2000, 900)
    got = vocab_bag.encode_bags(bags)
    assert got.type == pa.list_(pa.int32())
    flat = pc.list_flatten(bags)
    assert np.array_equal(pc.list_flatten(got).to_numpy(), reference_encode(vocab_bag.values, flat))
    assert pc.list_value_length(got).to_pylist() == pc.fill_null(pc.list_value_length(bags), 0).to_pylist()
    assert vocab_f._index is not None and len(vocab_f.values) > 700  # both paths were taken
    assert vocab_f.encode(pa.chunked_array([column.slice(0, 5), column.slice(5, 600)])).tolist() == \
        vocab_f.encode(column.slice(0, 605)).tolist()
    assert vocab_f.encode(["definitely unseen", None]).tolist() == [OOV_ID, MISSING_ID]


@pytest.mark.parametrize("min_count,max_vocab", [(1, 0), (2, 0), (1, 300), (3, 50)])
def test_counting_with_a_tiny_bound_spills_and_gives_the_same_vocabulary(tmp_path, min_count, max_vocab):
    rng = np.random.default_rng(min_count * 10 + max_vocab)
    bounded = ValueCounter(["f", "bag"], memory_mb=1, spill_dir=tmp_path)
    free = ValueCounter(["f", "bag"])
    for _ in range(12):
        table = pa.table({"f": random_values(rng, 6000, 20000), "bag": random_bags(rng, 6000, 3000)})
        bounded.update(table)
        free.update(table)
    assert bounded.spill_count >= 2 and len(list(tmp_path.iterdir())) >= 4
    got, expect = bounded.counts("f"), free.counts("f")
    assert dict(zip(*got.to_pydict().values())) == dict(zip(*expect.to_pydict().values()))
    for f in ("f", "bag"):
        assert bounded.vocab(f, min_count, max_vocab).equals(free.vocab(f, min_count, max_vocab))
    assert list(tmp_path.iterdir()) == []  # building the vocabularies removed the spill files


def test_prepare_with_a_tiny_count_bound_writes_the_same_data(tmp_path, monkeypatch):
    spills = []
    real_spill = ValueCounter._spill
    monkeypatch.setattr(ValueCounter, "_spill", lambda self, f: (spills.append(f), real_spill(self, f)))
    rng = np.random.default_rng(3)
    n = 30_000
    pq.write_table(pa.table({
        "label": pa.array(rng.integers(0, 2, n).astype(np.float32)),
        "I1": pa.array(rng.random(n).astype(np.float32)),
        "C1": pa.array([f"{v:08x}" for v in rng.integers(0, 25_000, n)]),
        "C2": random_values(rng, n, 40),
        "tags": random_bags(rng, n, 5000),
    }), tmp_path / "in.parquet")
    metas = {}
    for name, mb in (("free", 0), ("bounded", 1)):
        cfg = DataConfig(format="parquet", paths=[str(tmp_path / "in.parquet")], dir=str(tmp_path / name),
                         count_memory_mb=mb)
        metas[name] = prepare(cfg, progress=False)
        assert bool(spills) == bool(mb)  # the bounded run spilled
        assert [p.name for p in (tmp_path / name).iterdir() if p.name.startswith("_counting")] == []
    assert metas["free"].fingerprint == metas["bounded"].fingerprint  # the bound does not change the data
    for f in ("C1", "C2", "tags"):
        assert pq.read_table(tmp_path / "free" / "vocab" / f"{f}.parquet").equals(
            pq.read_table(tmp_path / "bounded" / "vocab" / f"{f}.parquet"))
    assert metas["free"].rows == metas["bounded"].rows
    for split in ("train", "test"):
        a = pq.read_table(tmp_path / "free" / split)
        b = pq.read_table(tmp_path / "bounded" / split)
        assert a.equals(b)


def test_count_memory_bound_is_validated():
    from sharded_mde.config import ConfigError

    with pytest.raises(ConfigError, match="count_memory_mb"):
        DataConfig(count_memory_mb=-1).validate()
