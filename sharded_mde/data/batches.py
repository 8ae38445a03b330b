"""Training and evaluation batches from a prepared data directory, sharded over ranks.

Each rank loads only its contiguous share of a split into numpy arrays (cached per process) and
builds TorchRec `Batch`es with vectorised gathers. Every rank gets the same number of batches of
the same size, as DistributedModelParallel requires. Training batches are shuffled per
(seed, epoch, rank); evaluation batches cover every row exactly once over all ranks, padded by
repeating rows, with the count of real rows alongside.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Tuple, Union

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sharded_mde.data.meta import DatasetMeta
from sharded_mde.data.readers import LABEL

PathLike = Union[str, Path]


@dataclass(frozen=True)
class _Share:
    """One rank's rows of a split: labels [n], dense [n, D] and sparse ids key-major [F, n]."""

    keys: Tuple[str, ...]
    labels: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: Union[np.ndarray, slice]) -> Batch:
        """The rows `idx` as a Batch: one id per row per key, lengths all 1."""
        ids = self.sparse[:, idx]
        b = ids.shape[1]
        return Batch(
            dense_features=torch.from_numpy(np.ascontiguousarray(self.dense[idx])),
            sparse_features=KeyedJaggedTensor(
                keys=list(self.keys),
                values=torch.from_numpy(ids.astype(np.int64).reshape(-1)),
                lengths=torch.ones(len(self.keys) * b, dtype=torch.int32),
                stride=b,
            ),
            labels=torch.from_numpy(np.ascontiguousarray(self.labels[idx])),
        )


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
    labels, dense, sparse = [], [], []
    offset = 0
    for path, n in meta.split_parts(split):
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            try:
                table = pq.read_table(str(path)).slice(lo - offset, hi - lo)
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: cannot read data part ({e})") from None
            labels.append(table.column(LABEL).to_numpy())
            dense.append(np.stack([table.column(c).to_numpy() for c in meta.dense_features], axis=1)
                         if meta.dense_features else np.zeros((hi - lo, 0), np.float32))
            sparse.append(np.stack([table.column(c).to_numpy() for c in meta.sparse_features]))
        offset += n
    n_f = len(meta.sparse_features)
    return _Share(
        keys=tuple(meta.sparse_features),
        labels=np.concatenate(labels).astype(np.float32) if labels else np.zeros(0, np.float32),
        dense=np.concatenate(dense).astype(np.float32) if dense else np.zeros((0, len(meta.dense_features)), np.float32),
        sparse=np.concatenate(sparse, axis=1).astype(np.int32) if sparse else np.zeros((n_f, 0), np.int32),
    )


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
