"""Streaming readers for click logs: Criteo TSV, Avazu CSV and canonical Parquet shards.

Every reader yields canonical blocks: a pyarrow Table with `label` (float32), the dense columns
(float32, null where empty) and the sparse columns (string, null where empty). Text files are
parsed block by block by pyarrow (gzip is detected), never loaded whole. A malformed line (wrong
column count, non-numeric label or dense value) is skipped, counted and warned about with its
file and line number, or raises a ValueError naming them under `strict`.
"""

from __future__ import annotations

import bisect
import glob
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

LABEL = "label"
DEFAULT_BLOCK_SIZE = 16 << 20  # bytes of text parsed per block
PARQUET_BATCH_ROWS = 1 << 18
MAX_WARNINGS_PER_FILE = 10
CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE = tuple(f"C{i}" for i in range(1, 27))
AVAZU_LABEL, AVAZU_DROP = "click", ("id",)
TEXT_FORMATS = ("criteo_tsv", "avazu_csv")
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"


class DataWarning(UserWarning):
    """A malformed input line was skipped."""


@dataclass(frozen=True)
class Schema:
    """Names of the dense and sparse (categorical) fields of a data set, in column order."""

    dense: Tuple[str, ...]
    sparse: Tuple[str, ...]

    def arrow(self) -> pa.Schema:
        """The canonical Arrow schema: label, dense floats, sparse strings."""
        return pa.schema([(LABEL, pa.float32())] + [(n, pa.float32()) for n in self.dense]
                         + [(n, pa.string()) for n in self.sparse])


CRITEO_SCHEMA = Schema(CRITEO_DENSE, CRITEO_SPARSE)


def expand_paths(paths: Sequence[str], fmt: str) -> List[Path]:
    """Input files: glob patterns expanded (sorted); for Parquet a directory stands for its *.parquet files."""
    out: List[Path] = []
    for p in paths:
        if any(ch in p for ch in "*?["):
            hits = sorted(glob.glob(p))
            if not hits:
                raise ValueError(f"{p}: no file matches this pattern")
            out.extend(Path(h) for h in hits)
        elif fmt == "parquet" and Path(p).is_dir():
            hits = sorted(Path(p).glob("*.parquet"))
            if not hits:
                raise ValueError(f"{p}: directory holds no *.parquet file")
            out.extend(hits)
        else:
            out.append(Path(p))
    if not out:
        raise ValueError("no input files given (data.paths is empty)")
    return out


def _file_error(path: Path, e: BaseException) -> ValueError:
    """One-line error for a file that cannot be opened or parsed."""
    if isinstance(e, FileNotFoundError):
        return ValueError(f"{path}: file not found")
    if isinstance(e, IsADirectoryError) or path.is_dir():
        return ValueError(f"{path}: is a directory, expected a file")
    if isinstance(e, PermissionError):
        return ValueError(f"{path}: permission denied")
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ValueError(f"{path}: cannot read ({msg})")


def _peek_first_line(path: Path) -> str:
    """The first line of a (possibly gzipped) text file; an empty file is a ValueError."""
    try:
        with pa.input_stream(str(path), compression="detect") as f:
            head = f.read(1 << 16)
    except (OSError, pa.ArrowException) as e:
        raise _file_error(path, e) from None
    if not head.strip():
        raise ValueError(f"{path}: empty file")
    return head.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", errors="replace")


def _text_layout(fmt: str, path: Path) -> Tuple[List[str], Optional[List[str]], Schema]:
    """(column names, header names or None, schema) of a Criteo or Avazu text file."""
    first = _peek_first_line(path)
    if fmt == "criteo_tsv":
        return [LABEL, *CRITEO_DENSE, *CRITEO_SPARSE], None, CRITEO_SCHEMA
    header = first.split(",")
    if AVAZU_LABEL not in header:
        raise ValueError(f"{path} line 1: Avazu header has no {AVAZU_LABEL!r} column (got {first[:80]!r})")
    if len(set(header)) != len(header):
        raise ValueError(f"{path} line 1: duplicate column names in the header")
    sparse = tuple(h for h in header if h != AVAZU_LABEL and h not in AVAZU_DROP)
    return header, header, Schema((), sparse)


def _parse_numbers(col: pa.Array) -> Tuple[pa.Array, np.ndarray]:
    """Numbers (or number strings) to float32, null kept; also a mask of non-numeric or non-finite values."""
    bad = np.zeros(len(col), dtype=bool)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        values = col
    else:
        try:
            values = pc.cast(col, pa.float64())
        except pa.ArrowInvalid:  # rare: find the offending rows with a vectorised pattern match
            ok = pc.match_substring_regex(col, _NUMBER)
            values = pc.cast(pc.if_else(ok, col, pa.scalar(None, col.type)), pa.float64())
            bad = pc.fill_null(pc.invert(ok), False).to_numpy(zero_copy_only=False)
    values = pc.cast(values, pa.float32(), safe=False)
    bad |= pc.fill_null(pc.invert(pc.is_finite(values)), False).to_numpy(zero_copy_only=False)
    return values, bad


class SourceReader:
    """Streams canonical blocks from a list of raw files of one format; counts skipped lines."""

    def __init__(self, fmt: str, paths: Sequence[str], strict: bool = False,
                 block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if fmt not in (*TEXT_FORMATS, "parquet"):
            raise ValueError(f"unknown data format {fmt!r} (criteo_tsv, avazu_csv or parquet)")
        self.fmt, self.strict, self.block_size = fmt, strict, block_size
        self.files = expand_paths(paths, fmt)
        self.skipped = 0
        self.schema = self._common_schema()

    def _common_schema(self) -> Schema:
        """The schema of the first file; every other file must match it."""
        schemas = [(p, self._file_schema(p)) for p in self.files]
        first_path, first = schemas[0]
        for p, s in schemas[1:]:
            if s != first:
                raise ValueError(f"{p}: columns differ from {first_path} ({list(s.dense + s.sparse)} vs "
                                 f"{list(first.dense + first.sparse)})")
        return first

    def _file_schema(self, path: Path) -> Schema:
        if self.fmt in TEXT_FORMATS:
            return _text_layout(self.fmt, path)[2]
        return _parquet_schema(path)

    def __iter__(self) -> Iterator[pa.Table]:
        for path in self.files:
            rows, skipped = 0, self.skipped
            for table in self._iter_text(path) if self.fmt in TEXT_FORMATS else self._iter_parquet(path):
                rows += table.num_rows
                yield table
            if rows == 0:  # every line malformed: wrong data or format, not a file to "prepare" as 0 rows
                raise ValueError(f"{path}: no valid row ({self.skipped - skipped} malformed lines skipped; "
                                 f"is it {self.fmt} data?)")

    # ------------------------------------------------------------------ text
    def _iter_text(self, path: Path) -> Iterator[pa.Table]:
        names, header, schema = _text_layout(self.fmt, path)
        # pyarrow calls back for lines with a wrong column count, in line order (serial parsing).
        invalid_lines: List[int] = []
        invalid_reasons: List[str] = []

        def on_invalid(row) -> str:
            invalid_lines.append(row.number)
            invalid_reasons.append(f"expected {row.expected_columns} columns, got {row.actual_columns}")
            return "skip"

        label = AVAZU_LABEL if header else LABEL
        tsv = self.fmt == "criteo_tsv"
        read = pacsv.ReadOptions(block_size=self.block_size, use_threads=False,  # serial: line numbers known
                                 column_names=None if header else names)
        parse = pacsv.ParseOptions(delimiter="\t" if tsv else ",", quote_char=False if tsv else '"',
                                   invalid_row_handler=on_invalid, ignore_empty_lines=False)
        # Bytes, decoded below row by row: one line that is not UTF-8 is skipped, not the whole file.
        convert = pacsv.ConvertOptions(column_types={n: pa.binary() for n in names},
                                       include_columns=[label, *schema.dense, *schema.sparse],
                                       strings_can_be_null=True, null_values=[""], quoted_strings_can_be_null=True)
        try:
            reader = pacsv.open_csv(pa.input_stream(str(path), compression="detect"), read_options=read,
                                    parse_options=parse, convert_options=convert)
        except (OSError, pa.ArrowException) as e:
            raise _file_error(path, e) from None
        header_lines = 1 if header else 0
        rows_before, warned, reported = 0, 0, 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except (OSError, pa.ArrowException) as e:
                raise _file_error(path, e) from None
            table = pa.Table.from_batches([batch]).rename_columns([LABEL, *schema.dense, *schema.sparse])
            table, undecodable = _decode_utf8(table)
            out, bad_rows = _to_canonical(table, schema, undecodable)
            new = len(invalid_lines)
            problems = list(zip(invalid_lines[reported:new], invalid_reasons[reported:new]))
            reported = new
            problems += [(_physical_line(rows_before + j, invalid_lines, header_lines), reason)
                         for j, reason in bad_rows]
            rows_before += table.num_rows
            warned = self._report(path, sorted(problems), warned)
            yield out
        self._report(path, list(zip(invalid_lines[reported:], invalid_reasons[reported:])), warned)

    def _report(self, path: Path, problems: List[Tuple[int, str]], warned: int) -> int:
        """Counts skipped lines; raises under strict, else warns for the first few per file."""
        for line, reason in problems:
            where = f"{path} line {line}" if line > 0 else f"{path} row {-line}"
            if self.strict:
                raise ValueError(f"{where}: malformed ({reason})")
            self.skipped += 1
            if warned < MAX_WARNINGS_PER_FILE:
                tail = "; further malformed lines in this file are skipped silently" \
                    if warned == MAX_WARNINGS_PER_FILE - 1 else ""
                warnings.warn(f"{where}: skipped malformed line ({reason}){tail}", DataWarning, stacklevel=3)
            warned += 1
        return warned

    # ------------------------------------------------------------------ parquet
    def _iter_parquet(self, path: Path) -> Iterator[pa.Table]:
        schema = _parquet_schema(path)
        rows_before, warned = 0, 0
        try:
            batches = pq.ParquetFile(str(path)).iter_batches(batch_size=PARQUET_BATCH_ROWS,
                                                             columns=[LABEL, *schema.dense, *schema.sparse])
            for batch in batches:
                out, bad_rows = _to_canonical(pa.Table.from_batches([batch]), schema)
                # Parquet has no lines: rows are named by their 1-based index, passed negated.
                warned = self._report(path, [(-(rows_before + j + 1), r) for j, r in bad_rows], warned)
                rows_before += batch.num_rows
                yield out
        except (OSError, pa.ArrowException) as e:
            raise _file_error(path, e) from None


def _parquet_schema(path: Path) -> Schema:
    """Schema of a canonical Parquet file: floating columns are dense, string/integer ones sparse."""
    try:
        arrow = pq.read_schema(str(path))
    except (OSError, pa.ArrowException) as e:
        raise _file_error(path, e) from None
    if LABEL not in arrow.names:
        raise ValueError(f"{path}: Parquet file has no {LABEL!r} column")
    dense, sparse = [], []
    for f in arrow:
        if f.name == LABEL:
            continue
        if pa.types.is_floating(f.type):
            dense.append(f.name)
        elif pa.types.is_string(f.type) or pa.types.is_large_string(f.type) or pa.types.is_integer(f.type):
            sparse.append(f.name)
        else:
            raise ValueError(f"{path}: column {f.name!r} has type {f.type}, expected float (dense) or string/int")
    return Schema(tuple(dense), tuple(sparse))


def _decode_utf8(table: pa.Table) -> Tuple[pa.Table, Optional[np.ndarray]]:
    """Binary text columns as UTF-8 strings; values that are not UTF-8 become null, their rows flagged."""
    cols, bad = [], None
    for col in table.columns:
        col = col.combine_chunks()
        try:
            cols.append(pc.cast(col, pa.string()))
        except pa.ArrowInvalid:  # rare: find the offending values one by one
            ok = np.array([v is None or _is_utf8(v) for v in col.to_pylist()], dtype=bool)
            bad = ~ok if bad is None else bad | ~ok
            cols.append(pc.cast(pc.if_else(pa.array(ok), col, pa.scalar(None, col.type)), pa.string()))
    return pa.table(cols, names=table.column_names), bad


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _to_canonical(table: pa.Table, schema: Schema,
                  undecodable: Optional[np.ndarray] = None) -> Tuple[pa.Table, List[Tuple[int, str]]]:
    """Parses label and dense columns; returns the good rows and (row in block, reason) of bad ones."""
    cols = {}
    label_in = table.column(LABEL).combine_chunks()
    cols[LABEL], bad_label = _parse_numbers(label_in)
    reasons = [(label_in.is_null().to_numpy(zero_copy_only=False), "missing label"),
               (bad_label, "non-numeric label")]
    if undecodable is not None:
        reasons.insert(0, (undecodable, "bytes that are not UTF-8"))
    for n in schema.dense:
        cols[n], bad = _parse_numbers(table.column(n).combine_chunks())
        reasons.append((bad, f"non-numeric value in {n}"))
    for n in schema.sparse:
        cols[n] = table.column(n).combine_chunks().cast(pa.string())
    out = pa.table(cols, schema=schema.arrow())
    any_bad = np.logical_or.reduce([mask for mask, _ in reasons])
    if not any_bad.any():
        return out, []
    empty = np.logical_and.reduce([table.column(n).is_null().to_numpy(zero_copy_only=False)
                                   for n in table.column_names])
    bad_rows = [(int(j), "empty line" if empty[j] else next(r for mask, r in reasons if mask[j]))
                for j in np.flatnonzero(any_bad)]
    return out.filter(pa.array(~any_bad)), bad_rows


def _physical_line(row: int, invalid_lines: List[int], header_lines: int) -> int:
    """1-based line number of the `row`-th parsed row, given the sorted lines pyarrow skipped."""
    line = row + 1 + header_lines
    while True:
        nxt = row + 1 + header_lines + bisect.bisect_right(invalid_lines, line)
        if nxt == line:
            return line
        line = nxt
