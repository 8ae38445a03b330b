"""Writes a stream of tables as numbered Parquet parts of a fixed row count, each atomically.

Parts are written in row groups of ROW_GROUP_ROWS rows: a row group is what a training rank reads
at a time (data/batches.py), so it bounds the memory of streamed training input.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

import pyarrow as pa
import pyarrow.parquet as pq

from sharded_mde.io import atomic_path

PART_ROWS = 1 << 20
ROW_GROUP_ROWS = 1 << 16


class PartWriter:
    """Buffers rows and writes `<prefix>part-00000.parquet`, ... of `part_rows` rows under `out`."""

    def __init__(self, out: Path, prefix: str = "", part_rows: int = PART_ROWS) -> None:
        self.out, self.prefix, self.part_rows = Path(out), prefix, part_rows
        self.buffer: List[pa.Table] = []
        self.buffered = 0
        self.parts: List[Tuple[str, int]] = []  # (path relative to out, rows)

    def add(self, table: pa.Table) -> None:
        """Queues rows; full parts are written at once."""
        if table.num_rows == 0:
            return
        self.buffer.append(table)
        self.buffered += table.num_rows
        while self.buffered >= self.part_rows:
            self._flush(self.part_rows)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self.buffer)
        part, rest = table.slice(0, rows), table.slice(rows)
        rel = f"{self.prefix}part-{len(self.parts):05d}.parquet"
        with atomic_path(self.out / rel) as tmp:
            pq.write_table(part, tmp, row_group_size=ROW_GROUP_ROWS)
        self.parts.append((rel, part.num_rows))
        self.buffer = [rest] if rest.num_rows else []
        self.buffered = rest.num_rows

    def close(self) -> List[Tuple[str, int]]:
        """Writes the remaining rows; returns [(relative path, rows)] of every part."""
        if self.buffered:
            self._flush(self.buffered)
        return self.parts
