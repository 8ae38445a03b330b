"""Batches of a prepared split as TorchRec `Batch`es (dense features, KeyedJaggedTensor, labels).

Each rank loads only its contiguous share of the split into memory (numpy), so memory per
process is rows / world_size. Training batches are shuffled per (seed, epoch) and every rank gets
the same number of equal-size batches, as DistributedModelParallel requires. Evaluation batches
cover every row exactly once over all ranks; the last ones are padded by repeating rows and come
with the count of real rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

SPLITS = ("train", "valid", "test")


@dataclass
class DatasetMeta:
    """What `prepare` recorded about a processed data directory (`meta.json`)."""

    dense_features: List[str]
    sparse_features: List[str]
    num_embeddings: Dict[str, int]
    rows: Dict[str, int]
    extra: Dict[str, object] = field(default_factory=dict)

    @classmethod
    def load(cls, data_dir: str | Path) -> "DatasetMeta":
        """Reads `<data_dir>/meta.json`; a missing or damaged file is one error naming it."""
        path = Path(data_dir) / "meta.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"{path}: no prepared data here (run `sharded-mde data prepare CONFIG`)") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable data meta ({e})") from None
        try:
            known = {k: raw.pop(k) for k in ("dense_features", "sparse_features", "num_embeddings", "rows")}
        except KeyError as e:
            raise ValueError(f"{path}: missing key {e.args[0]}") from None
        return cls(**known, extra=raw)


def split_files(data_dir: str | Path, split: str) -> List[Path]:
    """The Parquet parts of `split`, in order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (train, valid or test)")
    files = sorted((Path(data_dir) / split).glob("part-*.parquet"))
    if not files:
        raise ValueError(f"{Path(data_dir) / split}: no Parquet parts (is the data prepared?)")
    return files


@lru_cache(maxsize=8)
def _load_rows(data_dir: str, split: str, start: int, stop: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dense float32 [n, D], sparse int64 [F, n], labels float32 [n]) for global rows [start, stop)."""
    meta = DatasetMeta.load(data_dir)
    dense, sparse, labels = [], [], []
    offset = 0
    for path in split_files(data_dir, split):
        pf = pq.ParquetFile(path)
        n = pf.metadata.num_rows
        lo, hi = max(start, offset), min(stop, offset + n)
        if lo < hi:
            table = pf.read().slice(lo - offset, hi - lo)
            dense.append(np.stack([table.column(c).to_numpy().astype(np.float32) for c in meta.dense_features], axis=1)
                         if meta.dense_features else np.zeros((hi - lo, 0), np.float32))
            sparse.append(np.stack([table.column(c).to_numpy().astype(np.int64) for c in meta.sparse_features], axis=0))
            labels.append(table.column("label").to_numpy().astype(np.float32))
        offset += n
        if offset >= stop:
            break
    return np.concatenate(dense), np.concatenate(sparse, axis=1), np.concatenate(labels)


def _rank_range(total: int, rank: int, world_size: int) -> Tuple[int, int]:
    per = total // world_size
    return rank * per, (rank + 1) * per


def num_batches(data_dir: str | Path, split: str, batch_size: int, world_size: int = 1) -> int:
    """Training batches per epoch on each rank (equal on every rank; the remainder is dropped)."""
    rows = DatasetMeta.load(data_dir).rows[split]
    return (rows // world_size) // batch_size


def make_batch(dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray, keys: List[str]) -> Batch:
    """A Batch with one id per row and feature (sparse is [F, B], feature-major like a KJT)."""
    b = labels.shape[0]
    kjt = KeyedJaggedTensor(
        keys=keys,
        values=torch.from_numpy(np.ascontiguousarray(sparse).reshape(-1)),
        lengths=torch.ones(len(keys) * b, dtype=torch.int32),
        stride=b,
    )
    return Batch(dense_features=torch.from_numpy(dense), sparse_features=kjt, labels=torch.from_numpy(labels))


def iterate_batches(
    data_dir: str | Path,
    split: str,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    drop_last: bool = True,
) -> Iterator[Batch]:
    """Shuffled training batches of this rank's share of `split`, from batch `start_batch` on."""
    meta = DatasetMeta.load(data_dir)
    lo, hi = _rank_range(meta.rows[split], rank, world_size)
    dense, sparse, labels = _load_rows(str(data_dir), split, lo, hi)
    order = np.random.default_rng([seed, epoch, rank]).permutation(hi - lo)
    n = num_batches(data_dir, split, batch_size, world_size) if drop_last else -(-(hi - lo) // batch_size)
    for i in range(start_batch, n):
        idx = np.sort(order[i * batch_size:(i + 1) * batch_size])
        yield make_batch(dense[idx], sparse[:, idx], labels[idx], meta.sparse_features)


def iterate_eval_batches(
    data_dir: str | Path,
    split: str,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int = 0,
) -> Iterator[Tuple[Batch, int]]:
    """(batch, n_valid): every row once over all ranks, the same number of equal-size batches per rank."""
    meta = DatasetMeta.load(data_dir)
    total = meta.rows[split]
    per_rank = -(-total // world_size)
    lo, hi = rank * per_rank, min(total, (rank + 1) * per_rank)
    n = max(1, -(-per_rank // batch_size))
    if max_batches:
        n = min(n, max_batches)
    dense, sparse, labels = _load_rows(str(data_dir), split, lo, hi) if hi > lo else _load_rows(str(data_dir), split, 0, 1)
    have = max(hi - lo, 0)
    for i in range(n):
        a, b = i * batch_size, min((i + 1) * batch_size, have)
        n_valid = max(b - a, 0)
        idx = np.arange(a, a + batch_size)
        idx = np.minimum(idx, max(have - 1, 0)) if have else np.zeros(batch_size, dtype=np.int64)
        yield make_batch(dense[idx], sparse[:, idx], labels[idx], meta.sparse_features), n_valid
