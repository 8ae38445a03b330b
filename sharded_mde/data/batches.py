"""Training and evaluation batches from a prepared data directory, sharded over ranks.

Each rank loads only its contiguous share of a split into numpy arrays (cached per process) and
builds TorchRec `Batch`es with vectorised gathers: one id per row for single-valued fields, a bag
of ids (offsets + ids, possibly empty) for multi-valued ones, so the KJT carries real lengths. Every rank gets the same number of batches of
the same size, as DistributedModelParallel requires. Training batches are shuffled per
(seed, epoch, rank); evaluation batches cover every row exactly once over all ranks, padded by
repeating rows, with the count of real rows alongside.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sharded_mde.data.meta import DatasetMeta
from sharded_mde.data.readers import LABEL

PathLike = Union[str, Path]


@dataclass(frozen=True)
class _Share:
    """One rank's rows of a split: labels [n], dense [n, D], single-valued ids key-major [F1, n] and,
    per multi-valued field, its bags as (offsets [n + 1], ids)."""

    keys: Tuple[str, ...]
    labels: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray  # the single-valued keys, in `keys` order
    bags: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: Union[np.ndarray, slice]) -> Batch:
        """The rows `idx` as a Batch: per key and row its ids (one for single-valued keys, a bag,
        possibly empty, for multi-valued ones), key-major as TorchRec expects."""
        if self.bags:
            rows = np.arange(len(self))[idx]
            b = len(rows)
            single = iter(self.sparse[:, rows])
            parts = [_gather_bags(*self.bags[k], rows) if k in self.bags else (next(single), np.ones(b, np.int32))
                     for k in self.keys]
            values = np.concatenate([v for v, _ in parts]) if parts else np.zeros(0, np.int32)
            lengths = torch.from_numpy(np.concatenate([n for _, n in parts]).astype(np.int32))
        else:
            ids = self.sparse[:, idx]
            b = ids.shape[1]
            values, lengths = ids.reshape(-1), torch.ones(len(self.keys) * b, dtype=torch.int32)
        return Batch(
            dense_features=torch.from_numpy(np.ascontiguousarray(self.dense[idx])),
            sparse_features=KeyedJaggedTensor(keys=list(self.keys), values=torch.from_numpy(values.astype(np.int64)),
                                              lengths=lengths, stride=b),
            labels=torch.from_numpy(np.ascontiguousarray(self.labels[idx])),
        )


def _gather_bags(offsets: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(ids of the bags of `rows`, concatenated in row order; their lengths), without a per-row loop."""
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    ends = np.cumsum(lengths)
    return ids[np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if len(ends) else 0)], lengths


def _bags(column: Union[pa.Array, pa.ChunkedArray]) -> Tuple[np.ndarray, np.ndarray]:
    """(offsets from 0, ids) of a list<int32> column; a null bag is empty."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = arr.offsets.to_numpy().astype(np.int64)
    ids = arr.values.to_numpy()[offsets[0]:offsets[-1]].astype(np.int32)
    return offsets - offsets[0], ids


def _share_of(table: pa.Table, dense_features: Sequence[str], sparse_features: Sequence[str]) -> _Share:
    """The arrays of a processed table (label, dense floats, int32 ids or list<int32> bags)."""
    multi = [c for c in sparse_features if pa.types.is_list(table.schema.field(c).type)]
    single = [c for c in sparse_features if c not in multi]
    n = table.num_rows
    return _Share(
        keys=tuple(sparse_features),
        labels=table.column(LABEL).to_numpy().astype(np.float32),
        dense=(np.stack([table.column(c).to_numpy() for c in dense_features], axis=1).astype(np.float32)
               if dense_features else np.zeros((n, 0), np.float32)),
        sparse=(np.stack([table.column(c).to_numpy() for c in single]).astype(np.int32)
                if single else np.zeros((0, n), np.int32)),
        bags={c: _bags(table.column(c)) for c in multi},
    )


def _concat_shares(shares: List[_Share]) -> _Share:
    """Row-wise concatenation of shares of the same keys."""
    first = shares[0]
    bags = {}
    for k in first.bags:
        offsets, ids, base = [np.zeros(1, np.int64)], [], 0
        for s in shares:
            o, v = s.bags[k]
            offsets.append(o[1:] + base)
            ids.append(v)
            base += len(v)
        bags[k] = (np.concatenate(offsets), np.concatenate(ids))
    return _Share(keys=first.keys, labels=np.concatenate([s.labels for s in shares]),
                  dense=np.concatenate([s.dense for s in shares]),
                  sparse=np.concatenate([s.sparse for s in shares], axis=1), bags=bags)


def batch_from_table(table: pa.Table, dense_features: Sequence[str], sparse_features: Sequence[str]) -> Batch:
    """Every row of a processed table (a prepared part, or a slice of one) as one Batch."""
    return _share_of(table, dense_features, sparse_features).batch(slice(None))


def _train_range(total: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Equal contiguous shares (the remainder rows are left out of training)."""
    per = total // world_size
    return rank * per, (rank + 1) * per


def _eval_range(total: int, rank: int, world_size: int) -> Tuple[int, int]:
    """Contiguous shares differing by at most one row, covering every row."""
    per, extra = divmod(total, world_size)
    start = rank * per + min(rank, extra)
    return start, start + per + (rank < extra)


def _check(meta: DatasetMeta, split: str, batch_size: int, rank: int, world_size: int) -> int:
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size, got {batch_size}, {rank}, {world_size}")
    meta.split_parts(split)  # validates the split name
    return meta.rows[split]


@functools.lru_cache(maxsize=4)
def _load_share(data_dir: str, fingerprint: str, split: str, start: int, stop: int) -> _Share:
    """Rows [start, stop) of a split, reading only the parts that overlap them."""
    meta = DatasetMeta.load(data_dir)
    shares = []
    offset = 0
    for path, n in meta.split_parts(split):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            try:
                table = pq.read_table(str(path)).slice(lo - offset, hi - lo)
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: cannot read data part ({e})") from None
            shares.append(_share_of(table, meta.dense_features, meta.sparse_features))
        offset += n
    if not shares:
        single = [f for f in meta.sparse_features if f not in meta.multi_valued]
        return _Share(keys=tuple(meta.sparse_features), labels=np.zeros(0, np.float32),
                      dense=np.zeros((0, len(meta.dense_features)), np.float32),
                      sparse=np.zeros((len(single), 0), np.int32),
                      bags={f: (np.zeros(1, np.int64), np.zeros(0, np.int32)) for f in meta.multi_valued})
    return shares[0] if len(shares) == 1 else _concat_shares(shares)


def num_batches(data_dir: PathLike, split: str, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Training batches per rank per epoch (the same on every rank)."""
    meta = DatasetMeta.load(data_dir)
    per = _check(meta, split, batch_size, 0, world_size) // world_size
    return per // batch_size if drop_last else -(-per // batch_size)


def iterate_batches(data_dir: PathLike, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                    seed: int = 0, epoch: int = 0, start_batch: int = 0, drop_last: bool = True) -> Iterator[Batch]:
    """Training batches of this rank's share, shuffled per (seed, epoch, rank) when split is train."""
    meta = DatasetMeta.load(data_dir)
    total = _check(meta, split, batch_size, rank, world_size)
    start, stop = _train_range(total, rank, world_size)
    share = _load_share(str(data_dir), meta.fingerprint, split, start, stop)
    n = len(share)
    order = np.random.default_rng([seed, epoch, rank]).permutation(n) if split == "train" else np.arange(n)
    count = num_batches(data_dir, split, batch_size, world_size, drop_last)
    for b in range(start_batch, count):
        yield share.batch(order[b * batch_size:(b + 1) * batch_size])


def num_eval_batches(data_dir: PathLike, split: str, batch_size: int, world_size: int = 1, max_batches: int = 0) -> int:
    """Evaluation batches per rank (the same on every rank)."""
    meta = DatasetMeta.load(data_dir)
    total = _check(meta, split, batch_size, 0, world_size)
    count = -(-(-(-total // world_size)) // batch_size)  # ceil(ceil(total / W) / B)
    return min(count, max_batches) if max_batches > 0 else count


def iterate_eval_batches(data_dir: PathLike, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                         max_batches: int = 0) -> Iterator[Tuple[Batch, int]]:
    """(batch, n_valid): this rank's rows in order, the tail padded by repeating rows; the first
    n_valid rows of each batch are real, and over all ranks every row appears exactly once."""
    meta = DatasetMeta.load(data_dir)
    total = _check(meta, split, batch_size, rank, world_size)
    start, stop = _eval_range(total, rank, world_size)
    if stop == start and total:  # an empty share pads with the split's first row
        share = _load_share(str(data_dir), meta.fingerprint, split, 0, 1)
        size = 0
    else:
        share = _load_share(str(data_dir), meta.fingerprint, split, start, stop)
        size = len(share)
    for b in range(num_eval_batches(data_dir, split, batch_size, world_size, max_batches)):
        rows = np.arange(b * batch_size, (b + 1) * batch_size)
        n_valid = int(np.clip(size - b * batch_size, 0, batch_size))
        yield share.batch(rows % len(share)), n_valid
