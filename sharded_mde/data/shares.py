"""Which rank of a distributed `prepare` reads which input: contiguous shares of files, row groups and byte ranges.

The inputs are cut into units, weighed by bytes (text) or rows (Parquet): one Parquet row group, a
piece of an uncompressed unquoted text file (about 8 per rank; a rank's pieces of a file become one
byte range cut at line starts), or a whole text file that cannot be entered in the middle (gzip, or
CSV whose quoted values may hold line breaks). Rank r takes the units whose weight midpoint falls
in the r-th of `world` equal slices, so every rank reads a contiguous run of the input in input
order and the ranks' outputs, concatenated in rank order, are the one-process output in order. A
rank's rows keep their index in the whole input (the rows before its first file, plus those of that
file before its range), which is what the hash and sequential splits assign by.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import pyarrow as pa
import pyarrow.parquet as pq


_PIECES_PER_RANK = 8  # text is cut into about this many pieces per rank, so that the ranks' bytes even out
_MIN_PIECE_BYTES = 1 << 12
_COMPRESSED = (".gz", ".bz2", ".zst", ".zstd", ".lz4", ".br")  # streams that cannot be entered in the middle


@dataclass(frozen=True)
class Share:
    """One rank's input: `files` in input order (the first is input file `first`), the row groups to read of a
    Parquet file it holds in part, and the (start, end) bytes, both at line starts, of a text file it holds in
    part (files named in neither are read whole)."""

    files: List[Path]
    first: int = 0
    row_groups: Dict[Path, List[int]] = field(default_factory=dict)
    byte_ranges: Dict[Path, Tuple[int, int]] = field(default_factory=dict)

    def starts_file(self, path: Path) -> bool:
        """Whether this share holds the file's first rows."""
        groups, span = self.row_groups.get(path), self.byte_ranges.get(path)
        return (groups is None or groups[0] == 0) and (span is None or span[0] == 0)


def splittable(path: Path, quoted: bool) -> bool:
    """Whether a text file can be read from the middle: not compressed, and no quoted value can hold a line break."""
    return not quoted and not str(path).lower().endswith(_COMPRESSED)


def line_start(path: Path, offset: int, size: int) -> int:
    """The first line start at or after byte `offset` (`size` when there is none)."""
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    with open(path, "rb") as f:
        f.seek(offset - 1)
        pos = offset - 1
        while True:
            chunk = f.read(1 << 16)
            if not chunk:
                return size
            j = chunk.find(b"\n")
            if j >= 0:
                return pos + j + 1
            pos += len(chunk)


def _units(files: Sequence[Path], text: bool, quoted: bool, world: int) -> Tuple[List[Tuple[int, int, float]], int]:
    """(file index, row group or text piece or -1 for a whole file, weight) of every unit of work in input order,
    and the bytes of a text piece."""
    try:
        sizes = [p.stat().st_size for p in files] if text else []
    except OSError as e:
        raise ValueError(f"{e.filename}: cannot read ({e.strerror})") from None
    piece = max(_MIN_PIECE_BYTES, sum(sizes) // (world * _PIECES_PER_RANK))
    units: List[Tuple[int, int, float]] = []
    for i, path in enumerate(files):
        if text:
            if splittable(path, quoted) and sizes[i] > piece:
                units.extend((i, k, float(min(piece, sizes[i] - k * piece))) for k in range(-(-sizes[i] // piece)))
            else:
                units.append((i, -1, float(max(sizes[i], 1))))
            continue
        try:
            meta = pq.read_metadata(str(path))
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{path}: cannot read ({str(e).strip().splitlines()[0] if str(e).strip() else e})") \
                from None
        units.extend((i, g, float(max(meta.row_group(g).num_rows, 1))) for g in range(meta.num_row_groups))
    return units, piece


def cut(weights: Sequence[float], world: int) -> List[int]:
    """The rank of each unit, in order: the one whose slice of the total weight holds the unit's midpoint."""
    total, done, ranks = float(sum(weights)) or 1.0, 0.0, []
    for w in weights:
        ranks.append(min(world - 1, int((done + w / 2) / total * world)))
        done += w
    return ranks


def assign_shares(files: Sequence[Path], text: bool, world: int, quoted: bool = True) -> List[Share]:
    """Every rank's share of `files` (Parquet by row group; text by byte range where `splittable`, else whole);
    a rank may get none."""
    if world == 1:
        return [Share(list(files))]
    units, piece = _units(files, text, quoted, world)
    taken: List[List[Tuple[int, int]]] = [[] for _ in range(world)]
    for (i, g, _), rank in zip(units, cut([w for _, _, w in units], world)):
        taken[rank].append((i, g))
    per_file = {i: sum(1 for j, _, _ in units if j == i) for i in range(len(files))}
    shares = []
    for mine in taken:
        paths, groups, spans = [], {}, {}
        for i in sorted({i for i, _ in mine}):
            got = [g for j, g in mine if j == i]
            path = files[i]
            if got[0] >= 0 and len(got) < per_file[i]:  # part of the file
                if not text:
                    groups[path] = got
                else:
                    size = path.stat().st_size
                    start = line_start(path, got[0] * piece, size)
                    end = line_start(path, (got[-1] + 1) * piece, size)
                    if start == end:  # a line longer than the piece: its neighbour reads it
                        continue
                    spans[path] = (start, end)
            paths.append((i, path))
        shares.append(Share([p for _, p in paths], paths[0][0] if paths else len(files), groups, spans))
    return shares
