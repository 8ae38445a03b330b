"""Per-field vocabularies: raw value -> embedding row id, built by streaming counts.

Id 0 is the missing (empty) value, id 1 is out-of-vocabulary (rarer than `min_count`, beyond
`max_vocab`, or unseen at serving), then 2.. by descending frequency, ties broken by value so the
order is deterministic. Saved as `vocab/<field>.parquet` (value, id, count) beside the data and
reused unchanged at serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sharded_mde.data.lookup import ValueIndex, hash_strings, prefix_keys
from sharded_mde.io import atomic_path

MISSING_ID = 0
OOV_ID = 1
NUM_RESERVED = 2
_MERGE_ROWS = 4_000_000  # merge partial counts once the unmerged ones hold this many (value, count) rows
_GROUP_ROWS = 1 << 20  # spilled buckets are added up together until they hold this many rows
_MEMORY_OVERHEAD = 4  # the process memory of held counts per byte of their Arrow tables (merging included)
_SPILL_BITS = 8
SPILL_BUCKETS = 1 << _SPILL_BITS  # hash partitions of spilled counts: one is added up at a time
_COUNTS_SCHEMA = pa.schema([("value", pa.string()), ("count", pa.int64())])


class ValueCounter:
    """Streaming per-field value counts (the vocabulary's first pass), in bounded memory when asked.

    With `memory_mb` > 0, once the counts held in memory (times the working overhead of merging
    them) outgrow that bound, every field's counts are merged and spilled to one Arrow IPC file
    per field under `spill_dir`, hash-partitioned into `SPILL_BUCKETS` record batches. `vocab`
    then adds up one bucket at a time over all spills, so the counting never holds more than a
    bound's worth of counts plus the values kept for the vocabulary.
    """

    def __init__(self, fields: Sequence[str], memory_mb: int = 0, spill_dir: Optional[Path] = None) -> None:
        if memory_mb > 0 and spill_dir is None:
            raise ValueError("ValueCounter: a memory bound needs a spill directory")
        self.fields = list(fields)
        self._budget = memory_mb << 20
        self._spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._parts: Dict[str, List[pa.Table]] = {f: [] for f in self.fields}
        self._pending: Dict[str, int] = {f: 0 for f in self.fields}  # rows not yet merged
        self._merged: Dict[str, int] = {f: 0 for f in self.fields}  # rows of the merged table
        self._held = 0  # bytes of every field's parts
        self._spills: Dict[str, List[Path]] = {f: [] for f in self.fields}
        self.spill_count = 0  # times the counts were spilled to disk

    def update(self, table: pa.Table) -> None:
        """Adds the non-null values of every field of `table`."""
        for f in self.fields:
            col = table.column(f)
            if pa.types.is_list(col.type):  # a multi-valued field: every value of every bag counts
                col = pc.list_flatten(col)
            vc = pc.value_counts(pc.drop_null(col))
            part = pa.table({"value": vc.field("values").cast(pa.string()), "count": vc.field("counts").cast(pa.int64())})
            self._parts[f].append(part)
            self._held += part.nbytes
            self._pending[f] += part.num_rows
            # Merge only when the new parts outgrow the merged table as well: a field with many
            # distinct values would otherwise re-merge all of its counts on every block (quadratic).
            if self._pending[f] > max(_MERGE_ROWS, self._merged[f]):
                self._merge(f)
        if self._budget and self._held * _MEMORY_OVERHEAD > self._budget:
            for f in self.fields:
                self._spill(f)
            self.spill_count += 1

    def _merge(self, f: str) -> None:
        before = sum(p.nbytes for p in self._parts[f])
        merged = pa.concat_tables(self._parts[f]).group_by("value").aggregate([("count", "sum")])
        self._parts[f] = [merged.rename_columns(["value", "count"])]
        self._pending[f], self._merged[f] = 0, self._parts[f][0].num_rows
        self._held += self._parts[f][0].nbytes - before

    def _spill(self, f: str) -> None:
        """Writes the merged counts of `f` to a new spill file, bucket b as record batch b, and drops them."""
        if not self._parts[f]:
            return
        self._merge(f)
        counts = self._parts[f][0]
        bucket = (hash_strings(counts.column("value")) >> np.uint64(64 - _SPILL_BITS)).astype(np.int64)
        order = pa.array(np.argsort(bucket, kind="stable"))
        columns = [counts.column(n).combine_chunks().take(order) for n in ("value", "count")]
        ends = np.cumsum(np.bincount(bucket, minlength=SPILL_BUCKETS))
        path = self._spill_dir / f"{self.fields.index(f)}.{len(self._spills[f])}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, _COUNTS_SCHEMA) as writer:
            for b in range(SPILL_BUCKETS):  # one record batch per bucket, empty ones included
                start = ends[b - 1] if b else 0
                writer.write_batch(pa.record_batch([c.slice(start, ends[b] - start) for c in columns],
                                                   schema=_COUNTS_SCHEMA))
        self._spills[f].append(path)
        self._held -= counts.nbytes
        self._parts[f], self._pending[f], self._merged[f] = [], 0, 0
        del counts, columns, order
        pa.default_memory_pool().release_unused()  # hand the freed counts back to the system

    def _buckets(self, f: str) -> Iterator[pa.Table]:
        """(value, count) of the spilled values of `f`, one hash bucket at a time."""
        self._spill(f)
        return merged_buckets(self._spills[f], range(SPILL_BUCKETS))

    def spill_all(self) -> Dict[str, List[Path]]:
        """Spills every field's counts held in memory; returns each field's spill files (to be merged by
        `merged_buckets`, e.g. by the rank owning a bucket in a distributed prepare)."""
        for f in self.fields:
            self._spill(f)
        return {f: list(self._spills[f]) for f in self.fields}

    def counts(self, field: str) -> pa.Table:
        """(value, count) of every distinct value of `field` seen so far (all in memory)."""
        if self._spills[field]:
            return pa.concat_tables(self._buckets(field))
        if not self._parts[field]:
            return _COUNTS_SCHEMA.empty_table()
        self._merge(field)
        return self._parts[field][0]

    def vocab(self, field: str, min_count: int = 1, max_vocab: int = 0) -> pa.Table:
        """`build_vocab` of the counts of `field`; after a spill, built one bucket at a time (and the
        field's spill files removed: call it once per field, last)."""
        if not self._spills[field]:
            return build_vocab(self.counts(field), min_count, max_vocab)
        kept = kept_counts(self._buckets(field), min_count, max_vocab)
        for path in self._spills[field]:  # added up: the disk space goes back too
            path.unlink()
        self._spills[field] = []
        return build_vocab(kept, min_count, max_vocab)


def merged_buckets(paths: Sequence[Path], buckets: Iterable[int]) -> Iterator[pa.Table]:
    """(value, count) of the values of the hash buckets `buckets`, added up over the spill files `paths`: each
    table yielded covers whole buckets, about _GROUP_ROWS rows of counts read at most (one bucket larger than
    that alone, its files' batches added up as they come once they outgrow the sum so far, as in `update`)."""
    readers = [pa.ipc.open_file(pa.OSFile(str(p))) for p in paths]
    parts: List[pa.Table] = [_COUNTS_SCHEMA.empty_table()]
    pending = merged = 0
    for b in buckets:
        for r in readers:
            batch = r.get_batch(b)
            parts.append(pa.Table.from_batches([batch], schema=_COUNTS_SCHEMA))
            pending += batch.num_rows
            if pending > max(_MERGE_ROWS, merged):
                parts, pending = [_sum_counts(parts)], 0
                merged = parts[0].num_rows
        if merged + pending >= _GROUP_ROWS:  # one group_by per group of small buckets, not per bucket
            yield _sum_counts(parts)
            parts, pending, merged = [_COUNTS_SCHEMA.empty_table()], 0, 0
    if merged + pending:
        yield _sum_counts(parts)


def _sum_counts(parts: List[pa.Table]) -> pa.Table:
    """One (value, count) table adding up the counts of equal values."""
    return pa.concat_tables(parts).group_by("value").aggregate([("count", "sum")]).rename_columns(["value", "count"])


def kept_counts(parts: Iterable[pa.Table], min_count: int = 1, max_vocab: int = 0) -> pa.Table:
    """(value, count) of the values of disjoint count tables that can enter the vocabulary: at least
    `min_count`, and among the top `max_vocab` (the running cut holds at most twice that many)."""
    kept: List[pa.Table] = [_COUNTS_SCHEMA.empty_table()]
    for part in parts:
        kept.append(part.filter(pc.greater_equal(part.column("count"), min_count)))
        if max_vocab > 0 and sum(t.num_rows for t in kept) > 2 * max_vocab:  # only the top max_vocab can stay
            kept = [build_vocab(pa.concat_tables(kept), max_vocab=max_vocab).select(["value", "count"])]
    return pa.concat_tables(kept)


def vocab_order(counts: pa.Table) -> pa.Table:
    """(value, count) by descending count, then value (bytewise, as Arrow sorts strings). NumPy sorts by count
    and the values' first 8 bytes, several times faster than Arrow's sort by whole strings; Arrow then sorts
    by whole value only the rows tied on both (equal counts, values sharing their first 8 bytes)."""
    values = counts.column("value").combine_chunks()
    count = counts.column("count").to_numpy()
    prefix = prefix_keys(values)
    order = np.argsort(prefix)  # equal prefixes in any order: sorted by whole value below
    order = order[np.argsort(-count[order], kind="stable")]
    count, prefix = count[order], prefix[order]
    tied = np.flatnonzero((count[1:] == count[:-1]) & (prefix[1:] == prefix[:-1]))  # position i ties with i + 1
    if len(tied):
        rows = np.union1d(tied, tied + 1)  # positions in a run of ties, ascending
        run = np.cumsum(~np.isin(rows - 1, tied))  # a run starts where a row does not tie with the one before
        sub = pa.table({"run": run, "value": values.take(pa.array(order[rows]))})
        within = pc.sort_indices(sub, sort_keys=[("run", "ascending"), ("value", "ascending")]).to_numpy()
        order[rows] = order[rows][within]
    return counts.take(pa.array(order))


def build_vocab(counts: pa.Table, min_count: int = 1, max_vocab: int = 0) -> pa.Table:
    """Vocabulary table (value, id, count): kept values by descending count then value, ids from 2."""
    kept = vocab_order(counts.filter(pc.greater_equal(counts.column("count"), min_count)))
    if max_vocab > 0:
        kept = kept.slice(0, max_vocab)
    ids = pa.array(np.arange(NUM_RESERVED, NUM_RESERVED + kept.num_rows, dtype=np.int32))
    return pa.table({"value": kept.column("value").cast(pa.string()), "id": ids, "count": kept.column("count")})


def vocab_path(data_dir: Union[str, Path], field: str) -> Path:
    """Where the vocabulary of `field` lives in a processed data directory."""
    return Path(data_dir) / "vocab" / f"{field}.parquet"


def save_vocab(data_dir: Union[str, Path], field: str, vocab: pa.Table) -> None:
    """Writes a vocabulary table atomically."""
    with atomic_path(vocab_path(data_dir, field)) as tmp:
        pq.write_table(vocab.combine_chunks(), tmp)  # one chunk: the same table gives the same bytes


class Vocabulary:
    """Maps raw values of one field to ids: 0 missing, 1 out-of-vocabulary, 2.. by frequency."""

    def __init__(self, values: pa.Array) -> None:
        self.values = values.cast(pa.string())
        self._index: Optional[ValueIndex] = None  # built on the first block smaller than the vocabulary, then reused

    @classmethod
    def load(cls, data_dir: Union[str, Path], field: str) -> "Vocabulary":
        """The saved vocabulary of `field` (ids must be 2, 3, ... in file order)."""
        path = vocab_path(data_dir, field)
        try:
            table = pq.read_table(str(path), columns=["value", "id"])
        except FileNotFoundError:
            raise ValueError(f"{path}: vocabulary not found (run `sharded-mde data prepare`)") from None
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{path}: cannot read vocabulary ({e})") from None
        ids = table.column("id").to_numpy()
        if not np.array_equal(ids, np.arange(NUM_RESERVED, NUM_RESERVED + len(ids))):
            raise ValueError(f"{path}: ids are not {NUM_RESERVED}, {NUM_RESERVED + 1}, ... in order")
        return cls(table.column("value").combine_chunks())

    @property
    def num_embeddings(self) -> int:
        """Rows the embedding table needs, reserved ids included."""
        return len(self.values) + NUM_RESERVED

    def encode(self, column: Union[pa.Array, pa.ChunkedArray, Sequence]) -> np.ndarray:
        """int32 ids of raw values (None = missing -> 0, unknown -> 1)."""
        if not isinstance(column, (pa.Array, pa.ChunkedArray)):
            column = pa.array(column, pa.string())
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        column = column.cast(pa.string())
        if len(self.values) <= len(column):  # rebuilding a hash table no larger than the block is cheapest
            found = pc.fill_null(pc.index_in(column, value_set=self.values), -1).to_numpy(zero_copy_only=False)
        else:
            if self._index is None:
                self._index = ValueIndex(self.values)
            found = self._index.find(column)
        ids = np.where(found >= 0, found + NUM_RESERVED, OOV_ID).astype(np.int32)
        if column.null_count:
            ids[pc.is_null(column).to_numpy(zero_copy_only=False)] = MISSING_ID
        return ids

    def encode_bags(self, column: Union[pa.Array, pa.ChunkedArray]) -> pa.ListArray:
        """list<int32> ids of bags of raw values (a null bag is empty; a null value inside one -> 0, unknown -> 1)."""
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(self.encode(pc.list_flatten(arr))))
