"""Deterministic train/valid/test assignment of rows by their index in the input stream.

`hash`: a row goes to a split by a fixed hash of its index, so the assignment does not depend
on block sizes, file boundaries or the machine. `sequential`: contiguous blocks in input order
(train first, test last), for time-ordered logs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

SPLITS = ("train", "valid", "test")
SPLIT_MODES = ("hash", "sequential")
_SPLIT_KEY = np.uint64(0x5EED_5B1D_0000_0001)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (a bijective, well-mixed hash)."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def assign_splits(rows: np.ndarray, total_rows: int, fractions: Sequence[float], mode: str = "hash") -> np.ndarray:
    """Split index (0 train, 1 valid, 2 test) of each 0-based row index."""
    rows = np.asarray(rows, dtype=np.int64)
    cuts = np.cumsum(np.asarray(fractions, dtype=np.float64))[:2]
    if mode == "hash":
        u = (splitmix64(rows.astype(np.uint64) ^ _SPLIT_KEY) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    elif mode == "sequential":
        u = (rows.astype(np.float64) + 0.5) / max(total_rows, 1)
    else:
        raise ValueError(f"split mode must be one of {SPLIT_MODES}, got {mode!r}")
    return np.searchsorted(cuts, u, side="right").astype(np.int8)
