"""Which rank of a distributed `prepare` reads which input: contiguous shares of files and Parquet row groups.

The inputs are cut into units, a whole text file (a gzip stream cannot be entered in the middle) or
one Parquet row group, weighed by bytes (text) or rows (Parquet). Rank r takes the units whose
weight midpoint falls in the r-th of `world` equal slices, so every rank reads a contiguous run of
the input in input order and the ranks' outputs, concatenated in rank order, are the one-process
output in order. A rank's rows keep their index in the whole input (`base`: the rows of every file
before its first one), which is what the hash and sequential splits assign by.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class Share:
    """One rank's input: `files` in input order (the first is input file `first`), and the row groups to read
    of a Parquet file it holds in part (files not named there are read whole)."""

    files: List[Path]
    first: int = 0
    row_groups: Dict[Path, List[int]] = field(default_factory=dict)

    def starts_file(self, path: Path) -> bool:
        """Whether this share holds the file's first rows (so it is the rank that counts the file's rows)."""
        groups = self.row_groups.get(path)
        return groups is None or groups[0] == 0


def _units(files: Sequence[Path], text: bool) -> List[Tuple[int, int, float]]:
    """(file index, row group or -1 for a whole file, weight) of every unit of work, in input order."""
    units: List[Tuple[int, int, float]] = []
    for i, path in enumerate(files):
        try:
            if text:
                units.append((i, -1, float(max(path.stat().st_size, 1))))
                continue
            meta = pq.read_metadata(str(path))
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{path}: cannot read ({str(e).strip().splitlines()[0] if str(e).strip() else e})") \
                from None
        units.extend((i, g, float(max(meta.row_group(g).num_rows, 1))) for g in range(meta.num_row_groups))
    return units


def cut(weights: Sequence[float], world: int) -> List[int]:
    """The rank of each unit, in order: the one whose slice of the total weight holds the unit's midpoint."""
    total, done, ranks = float(sum(weights)) or 1.0, 0.0, []
    for w in weights:
        ranks.append(min(world - 1, int((done + w / 2) / total * world)))
        done += w
    return ranks


def assign_shares(files: Sequence[Path], text: bool, world: int) -> List[Share]:
    """Every rank's share of `files` (text files whole, Parquet files by row group); a rank may get none."""
    if world == 1:
        return [Share(list(files))]
    units = _units(files, text)
    taken: List[List[Tuple[int, int]]] = [[] for _ in range(world)]
    for (i, g, _), rank in zip(units, cut([w for _, _, w in units], world)):
        taken[rank].append((i, g))
    groups_per_file = {i: sum(1 for j, _, _ in units if j == i) for i in range(len(files))}
    shares = []
    for mine in taken:
        indices = sorted({i for i, _ in mine})
        partial = {files[i]: [g for j, g in mine if j == i] for i in indices
                   if min(g for j, g in mine if j == i) >= 0 and
                   sum(1 for j, _ in mine if j == i) < groups_per_file[i]}
        shares.append(Share([files[i] for i in indices], indices[0] if indices else len(files), partial))
    return shares
