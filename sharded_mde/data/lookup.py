"""Vectorised 64-bit string hashes and a value -> position index built once and reused for every block.

`pc.index_in` rebuilds its hash table from the whole value set on every call, so encoding one block
of a field with V values cost O(V). `ValueIndex` hashes the values once, keeps the hashes sorted, and
looks a block up in O(rows log V) with NumPy: hash the block, binary-search the sorted hashes, then
compare the strings of every hash match, so an unknown value whose hash equals a known one's is still
unknown. Known values that share a hash (rare at 64 bits) are resolved exactly through the few values
involved.
"""

from __future__ import annotations

from typing import Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_P = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)


def _fmix64(h: np.ndarray) -> np.ndarray:
    """Murmur3's 64-bit finaliser (in place): every input bit affects every output bit."""
    h ^= h >> np.uint64(33)
    h *= _M1
    h ^= h >> np.uint64(33)
    h *= _M2
    h ^= h >> np.uint64(33)
    return h


def _string_words(values: Union[pa.Array, pa.ChunkedArray]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(words, starts, lengths) of strings: words[i] is the 8 bytes from byte i of their data, little-endian."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not pa.types.is_string(values.type):
        values = values.cast(pa.string())
    n = len(values)
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int32, count=n + 1, offset=values.offset * 4).astype(np.int64)
    data = np.frombuffer(data_buf, dtype=np.uint8) if data_buf is not None else np.zeros(0, np.uint8)
    padded = np.zeros(len(data) + 8, dtype=np.uint8)  # every 8-byte read stays inside
    padded[:len(data)] = data
    words = np.ndarray(shape=(len(data) + 1,), dtype="<u8", buffer=padded, strides=(1,))  # 8 bytes from each byte
    return words, offsets[:-1], offsets[1:] - offsets[:-1]


def _word(words: np.ndarray, starts: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """The 8 bytes from each of `starts`, those past the string's `rest` remaining bytes zeroed."""
    word = words[starts]
    short = rest < 8
    if short.any():
        word[short] &= (np.uint64(1) << (np.maximum(rest[short], 0).astype(np.uint64) * np.uint64(8))) - np.uint64(1)
    return word


def hash_strings(values: Union[pa.Array, pa.ChunkedArray]) -> np.ndarray:
    """uint64 hash of every string (length and bytes mixed 8 bytes at a time); a null's hash is arbitrary."""
    words, starts, lengths = _string_words(values)
    with np.errstate(over="ignore"):
        h = lengths.astype(np.uint64) * _P
        rows = None  # round 0 takes every string, later rounds those longer than 8k bytes
        k = 0
        while rows is None or len(rows):  # round k mixes bytes [8k, 8k + 8) of the strings
            rest = (lengths if rows is None else lengths[rows]) - 8 * k
            word = _word(words, (starts if rows is None else starts[rows]) + 8 * k, rest)
            if rows is None:
                h = _fmix64((h ^ word) * _P)
                rows = np.flatnonzero(rest > 8)
            else:
                h[rows] = _fmix64((h[rows] ^ word) * _P)
                rows = rows[rest > 8]
            k += 1
    return h


def prefix_keys(values: Union[pa.Array, pa.ChunkedArray]) -> np.ndarray:
    """uint64 of every string's first 8 bytes, big-endian and zero-padded: ordered as the strings (bytewise,
    as Arrow sorts them), except that strings with equal keys (the same first 8 bytes) must be compared whole."""
    words, starts, lengths = _string_words(values)
    return _word(words, starts, lengths).byteswap()


class ValueIndex:
    """Position of each value in a fixed string array, built once and reused for every lookup.

    The values' hashes are kept sorted, with a directory of where each run of equal top bits starts
    (about one hash per run), so a lookup costs a few memory reads per row, whatever the size.
    Memory: 8 bytes of hash, 4 of order and at most 4 of directory per value, beside the values.
    """

    def __init__(self, values: pa.Array, hash_bits: int = 64) -> None:
        """`hash_bits` < 64 keeps only that many (top) hash bits (tests use it to force collisions)."""
        self.values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        self._mask = _ALL ^ (_ALL >> np.uint64(hash_bits)) if hash_bits < 64 else _ALL
        hashes = hash_strings(self.values) & self._mask
        index_type = np.int32 if len(hashes) < 1 << 31 else np.int64
        self._order = np.argsort(hashes).astype(index_type)  # values sharing a hash are found exactly anyway
        self._sorted = hashes[self._order]
        shared = self._sorted[1:] == self._sorted[:-1]
        self._shared = np.unique(self._sorted[1:][shared])  # hashes of two or more values: looked up exactly
        bits = min(max(int(len(hashes)).bit_length() - 1, 0), 32)
        self._shift = np.uint64(64 - bits)
        starts = np.arange(1 << bits, dtype=np.uint64) << self._shift if bits else np.zeros(1, np.uint64)
        self._dir = np.searchsorted(self._sorted, starts).astype(index_type)  # where the hashes with top bits k start

    def find(self, column: pa.Array) -> np.ndarray:
        """int64 position in `values` of each string of `column`; -1 where absent or null."""
        n = len(column)
        out = np.full(n, -1, dtype=np.int64)
        if n == 0 or len(self.values) == 0:
            return out
        h = hash_strings(column) & self._mask
        run = (h >> self._shift).astype(np.int64) if self._shift < 64 else np.zeros(n, np.int64)
        last = len(self._sorted) - 1
        slot = self._dir[run].astype(np.int64)  # the first hash of the run of h's top bits (or of a later run)
        cur = self._sorted[np.minimum(slot, last)]
        rows = np.flatnonzero((cur < h) & (slot <= last))
        while len(rows):  # step while the hashes (sorted over all runs) are smaller: rarely more than once
            slot[rows] += 1
            rows = rows[slot[rows] <= last]
            cur[rows] = self._sorted[slot[rows]]
            rows = rows[cur[rows] < h[rows]]
        hit = np.flatnonzero((cur == h) & (slot <= last))
        if len(hit):
            cand = self._order[slot[hit]]
            same = pc.equal(column.take(pa.array(hit)), self.values.take(pa.array(cand)))
            same = pc.fill_null(same, False).to_numpy(zero_copy_only=False)
            out[hit[same]] = cand[same]
        if len(self._shared):
            self._find_shared(column, h, out)
        return out

    def _find_shared(self, column: pa.Array, h: np.ndarray, out: np.ndarray) -> None:
        """Exact lookup of the rows whose hash several known values share."""
        rows = np.flatnonzero(np.isin(h, self._shared))
        if not len(rows):
            return
        known = np.flatnonzero(np.isin(self._sorted, self._shared))
        positions = self._order[known]
        found = pc.index_in(column.take(pa.array(rows)), value_set=self.values.take(pa.array(positions)))
        found = pc.fill_null(found, -1).to_numpy(zero_copy_only=False)
        out[rows[found >= 0]] = positions[found[found >= 0]]
