"""Per-field vocabularies: raw value -> embedding row id, built by streaming counts.

Id 0 is the missing (empty) value, id 1 is out-of-vocabulary (rarer than `min_count`, beyond
`max_vocab`, or unseen at serving), then 2.. by descending frequency, ties broken by value so the
order is deterministic. Saved as `vocab/<field>.parquet` (value, id, count) beside the data and
reused unchanged at serving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sharded_mde.io import atomic_path

MISSING_ID = 0
OOV_ID = 1
NUM_RESERVED = 2
_MERGE_ROWS = 4_000_000  # merge partial counts once the unmerged ones hold this many (value, count) rows


class ValueCounter:
    """Streaming per-field value counts (the vocabulary's first pass)."""

    def __init__(self, fields: Sequence[str]) -> None:
        self.fields = list(fields)
        self._parts: Dict[str, List[pa.Table]] = {f: [] for f in self.fields}
        self._pending: Dict[str, int] = {f: 0 for f in self.fields}  # rows not yet merged
        self._merged: Dict[str, int] = {f: 0 for f in self.fields}  # rows of the merged table

    def update(self, table: pa.Table) -> None:
        """Adds the non-null values of every field of `table`."""
        for f in self.fields:
            col = table.column(f)
            if pa.types.is_list(col.type):  # a multi-valued field: every value of every bag counts
                col = pc.list_flatten(col)
            vc = pc.value_counts(pc.drop_null(col))
            part = pa.table({"value": vc.field("values"), "count": vc.field("counts").cast(pa.int64())})
            self._parts[f].append(part)
            self._pending[f] += part.num_rows
            # Merge only when the new parts outgrow the merged table as well: a field with many
            # distinct values would otherwise re-merge all of its counts on every block (quadratic).
            if self._pending[f] > max(_MERGE_ROWS, self._merged[f]):
                self._merge(f)

    def _merge(self, f: str) -> None:
        merged = pa.concat_tables(self._parts[f]).group_by("value").aggregate([("count", "sum")])
        self._parts[f] = [merged.rename_columns(["value", "count"])]
        self._pending[f], self._merged[f] = 0, self._parts[f][0].num_rows

    def counts(self, field: str) -> pa.Table:
        """(value, count) of every distinct value of `field` seen so far."""
        if not self._parts[field]:
            return pa.table({"value": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        self._merge(field)
        return self._parts[field][0]


def build_vocab(counts: pa.Table, min_count: int = 1, max_vocab: int = 0) -> pa.Table:
    """Vocabulary table (value, id, count): kept values by descending count then value, ids from 2."""
    kept = counts.filter(pc.greater_equal(counts.column("count"), min_count))
    kept = kept.sort_by([("count", "descending"), ("value", "ascending")])
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
        pq.write_table(vocab, tmp)


class Vocabulary:
    """Maps raw values of one field to ids: 0 missing, 1 out-of-vocabulary, 2.. by frequency."""

    def __init__(self, values: pa.Array) -> None:
        self.values = values.cast(pa.string())

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
        column = column.cast(pa.string())
        found = pc.index_in(column, value_set=self.values)
        ids = pc.fill_null(pc.add(found.cast(pa.int32()), NUM_RESERVED), OOV_ID)
        ids = pc.if_else(pc.is_null(column), MISSING_ID, ids)
        out = ids.to_numpy() if isinstance(ids, pa.Array) else ids.combine_chunks().to_numpy()
        return out.astype(np.int32, copy=False)

    def encode_bags(self, column: Union[pa.Array, pa.ChunkedArray]) -> pa.ListArray:
        """list<int32> ids of bags of raw values (a null bag is empty; a null value inside one -> 0, unknown -> 1)."""
        arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(self.encode(pc.list_flatten(arr))))
