"""Training and evaluation batches from a prepared data directory, sharded over ranks, streamed.

Each rank reads only its contiguous share of a split, a Parquet row group at a time (a "block": a
row group cut to the share), and builds TorchRec `Batch`es with vectorised gathers: one id per row
for single-valued fields, a bag of ids (offsets + ids, possibly empty) for multi-valued ones, so the
KJT carries real lengths. Every rank gets the same number of batches of the same size, as
DistributedModelParallel requires. Resident memory does not grow with the split: training holds one
shuffle window (at most `window_rows` rows, or one block where a block is larger) and one batch;
evaluation holds one block and one batch.

Training order, per (seed, epoch, rank): a share of at most `window_rows` rows is one window, its
rows in stored order permuted by rng(seed, epoch, rank), the order before streaming. A larger
share is block-shuffled: its blocks in an order drawn from rng(seed, epoch, rank), grouped in turn
into windows of at most `window_rows` rows (a larger block is a window of its own), the rows of
window w permuted by rng(seed, epoch, rank, w + 1). Batches are consecutive `batch_size` rows of
that order (a batch may span two windows), so batch b depends only on (seed, epoch, rank) and a
resume at batch b skips the windows before it unread. Evaluation batches cover every row exactly
once over all ranks, in stored order, padded by repeating rows, with the count of real rows alongside.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from sharded_mde.data.meta import DatasetMeta
from sharded_mde.data.readers import LABEL

PathLike = Union[str, Path]
SHUFFLE_WINDOW_ROWS = 1 << 18  # rows a training rank shuffles together (and holds) at once


@dataclass(frozen=True)
class _Share:
    """Rows of a split: labels [n], dense [n, D], single-valued ids key-major [F1, n] and, per
    multi-valued field, its bags as (offsets [n + 1] from 0, ids)."""

    keys: Tuple[str, ...]
    labels: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray  # the single-valued keys, in `keys` order
    bags: Dict[str, Tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: np.ndarray) -> "_Share":
        """The rows `rows` (any order, repeats allowed) as a new share."""
        bags = {}
        for k, (offsets, ids) in self.bags.items():
            values, lengths = _gather_bags(offsets, ids, rows)
            bags[k] = (np.concatenate([np.zeros(1, np.int64), np.cumsum(lengths, dtype=np.int64)]), values)
        return _Share(keys=self.keys, labels=self.labels[rows], dense=self.dense[rows], sparse=self.sparse[:, rows],
                      bags=bags)

    def to_batch(self) -> Batch:
        """Every row as a Batch: per key and row its ids (one for single-valued keys, a bag, possibly
        empty, for multi-valued ones), key-major as TorchRec expects."""
        b = len(self)
        if self.bags:
            single = iter(self.sparse)
            parts = [(self.bags[k][1], np.diff(self.bags[k][0])) if k in self.bags
                     else (next(single), np.ones(b, np.int64)) for k in self.keys]
            values = np.concatenate([v for v, _ in parts]) if parts else np.zeros(0, np.int32)
            lengths = torch.from_numpy(np.concatenate([n for _, n in parts]).astype(np.int32))
        else:
            values, lengths = self.sparse.reshape(-1), torch.ones(len(self.keys) * b, dtype=torch.int32)
        return Batch(
            dense_features=torch.from_numpy(np.ascontiguousarray(self.dense)),
            sparse_features=KeyedJaggedTensor(keys=list(self.keys), values=torch.from_numpy(values.astype(np.int64)),
                                              lengths=lengths, stride=b),
            labels=torch.from_numpy(np.ascontiguousarray(self.labels)),
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
    if len(shares) == 1:
        return shares[0]
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
    return _share_of(table, dense_features, sparse_features).to_batch()


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


@dataclass(frozen=True)
class _Block:
    """Rows [lo, hi) of row group `group` of a Parquet part: the unit read from disk."""

    path: str
    group: int
    lo: int
    hi: int

    def __len__(self) -> int:
        return self.hi - self.lo


def _blocks(meta: DatasetMeta, split: str, start: int, stop: int) -> List[_Block]:
    """The row groups holding rows [start, stop) of a split, cut to them, in stored order; only the
    footers of the parts overlapping the range are read."""
    blocks: List[_Block] = []
    offset = 0
    for path, n in meta.split_parts(split):
        if offset < stop and start < offset + n:
            try:
                footer = pq.read_metadata(str(path))
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: cannot read data part ({e})") from None
            if footer.num_rows != n:
                raise ValueError(f"{path}: holds {footer.num_rows} rows, meta.json says {n}; prepare the data again")
            at = offset
            for g in range(footer.num_row_groups):
                size = footer.row_group(g).num_rows
                lo, hi = max(start - at, 0), min(stop - at, size)
                if lo < hi:
                    blocks.append(_Block(str(path), g, lo, hi))
                at += size
        offset += n
    return blocks


def _read(meta: DatasetMeta, blocks: Sequence[_Block]) -> _Share:
    """The rows of `blocks`, in order, one row group in memory at a time."""
    columns = [LABEL] + list(meta.dense_features) + list(meta.sparse_features)
    shares = []
    for b in blocks:
        try:
            with pq.ParquetFile(b.path) as part:
                table = part.read_row_group(b.group, columns=columns)
        except (OSError, ValueError) as e:
            raise ValueError(f"{b.path}: cannot read data part ({e})") from None
        shares.append(_share_of(table.slice(b.lo, len(b)), meta.dense_features, meta.sparse_features))
        del table
    return _concat_shares(shares)


Pieces = Iterator[Tuple[_Share, np.ndarray]]


def _rebatch(pieces: Pieces, batch_size: int, on_hold: Callable[[int], None]) -> Iterator[_Share]:
    """Consecutive `batch_size`-row shares (the last may be shorter) of the rows `order` of each
    (share, order) piece in turn; `on_hold` hears the rows held whenever a piece arrives."""
    held: List[_Share] = []
    have = 0
    for share, order in pieces:
        on_hold(len(share) + have)
        i = 0
        while i < len(order):
            k = min(batch_size - have, len(order) - i)
            held.append(share.take(order[i:i + k]))
            have, i = have + k, i + k
            if have == batch_size:
                yield _concat_shares(held)
                held, have = [], 0
        del share, order  # the next piece is read only after this one is let go
    if held:
        yield _concat_shares(held)


class TrainStream:
    """One rank's rows of a split for one epoch, in the module's documented order, read a window at a time."""

    def __init__(self, data_dir: PathLike, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, window_rows: int = SHUFFLE_WINDOW_ROWS) -> None:
        if window_rows < 1:
            raise ValueError(f"need window_rows >= 1, got {window_rows}")
        self.meta = DatasetMeta.load(data_dir)
        start, stop = _train_range(_check(self.meta, split, batch_size, rank, world_size), rank, world_size)
        self.rows, self.batch_size = stop - start, batch_size
        self.key = [seed, epoch, rank]
        self.shuffle = split == "train"
        blocks = _blocks(self.meta, split, start, stop)
        if not self.shuffle:  # in stored order, a block at a time
            self.windows = [[b] for b in blocks]
        elif self.rows <= window_rows:
            self.windows = [blocks] if blocks else []
        else:
            self.windows = []
            for i in np.random.default_rng(self.key).permutation(len(blocks)):
                if not self.windows or sum(map(len, self.windows[-1])) + len(blocks[i]) > window_rows:
                    self.windows.append([])
                self.windows[-1].append(blocks[i])
        self.starts = np.cumsum([0] + [sum(map(len, w)) for w in self.windows]).tolist()
        self.peak_rows = 0  # the most rows held at once so far (a window and a batch's worth)

    def _order(self, w: int) -> np.ndarray:
        """The order of window w's rows."""
        n = self.starts[w + 1] - self.starts[w]
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng(self.key if len(self.windows) == 1 else self.key + [w + 1]).permutation(n)

    def _pieces(self, first: int, last: int) -> Pieces:
        """(window rows, order) covering positions [first, last) of the epoch's order; earlier windows are not read."""
        if first >= last:
            return
        for w in range(max(bisect.bisect_right(self.starts, first) - 1, 0), len(self.windows)):
            if self.starts[w] >= last:
                return
            lo, hi = first - self.starts[w], last - self.starts[w]
            yield _read(self.meta, self.windows[w]), self._order(w)[max(lo, 0):hi]

    def _hold(self, rows: int) -> None:
        self.peak_rows = max(self.peak_rows, rows)

    def batches(self, start_batch: int = 0, count: Optional[int] = None) -> Iterator[Batch]:
        """Batches start_batch .. count - 1 of the epoch (default count: every row, the last batch shorter)."""
        b = self.batch_size
        last = self.rows if count is None else min(count * b, self.rows)
        for share in _rebatch(self._pieces(start_batch * b, last), b, self._hold):
            yield share.to_batch()


def num_batches(data_dir: PathLike, split: str, batch_size: int, world_size: int = 1, drop_last: bool = True) -> int:
    """Training batches per rank per epoch (the same on every rank)."""
    meta = DatasetMeta.load(data_dir)
    per = _check(meta, split, batch_size, 0, world_size) // world_size
    return per // batch_size if drop_last else -(-per // batch_size)


def iterate_batches(data_dir: PathLike, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                    seed: int = 0, epoch: int = 0, start_batch: int = 0, drop_last: bool = True,
                    window_rows: int = SHUFFLE_WINDOW_ROWS) -> Iterator[Batch]:
    """Training batches of this rank's share, streamed, shuffled per (seed, epoch, rank) when split is train."""
    stream = TrainStream(data_dir, split, batch_size, rank, world_size, seed, epoch, window_rows)
    yield from stream.batches(start_batch, num_batches(data_dir, split, batch_size, world_size, drop_last))


def num_eval_batches(data_dir: PathLike, split: str, batch_size: int, world_size: int = 1, max_batches: int = 0) -> int:
    """Evaluation batches per rank (the same on every rank)."""
    meta = DatasetMeta.load(data_dir)
    total = _check(meta, split, batch_size, 0, world_size)
    count = -(-(-(-total // world_size)) // batch_size)  # ceil(ceil(total / W) / B)
    return min(count, max_batches) if max_batches > 0 else count


def _eval_pieces(meta: DatasetMeta, split: str, start: int, size: int, served: int, batch_size: int) -> Pieces:
    """This rank's rows [start, start + size) in order, block by block, then padding up to `served`
    positions: position i repeats row i mod size (the first split row where the share is empty)."""
    real = min(size, served)
    for block in _blocks(meta, split, start, start + real):
        yield _read(meta, [block]), np.arange(len(block))
    if served > real:  # i - size < batch_size for every padded position: the first batch's rows suffice
        lo, n = (start, min(size, batch_size)) if size else (0, 1)
        yield _read(meta, _blocks(meta, split, lo, lo + n)), np.arange(real, served) % max(size, 1)


def iterate_eval_batches(data_dir: PathLike, split: str, batch_size: int, rank: int = 0, world_size: int = 1,
                         max_batches: int = 0) -> Iterator[Tuple[Batch, int]]:
    """(batch, n_valid): this rank's rows in order, the tail padded by repeating rows; the first
    n_valid rows of each batch are real, and over all ranks every row appears exactly once."""
    meta = DatasetMeta.load(data_dir)
    start, stop = _eval_range(_check(meta, split, batch_size, rank, world_size), rank, world_size)
    count = num_eval_batches(data_dir, split, batch_size, world_size, max_batches)
    pieces = _eval_pieces(meta, split, start, stop - start, count * batch_size, batch_size)
    for b, share in enumerate(_rebatch(pieces, batch_size, lambda rows: None)):
        yield share.to_batch(), int(np.clip(stop - start - b * batch_size, 0, batch_size))
