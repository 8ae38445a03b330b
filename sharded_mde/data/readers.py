"""Streaming readers for click logs: Criteo TSV, Avazu CSV and canonical Parquet shards.

Every reader yields canonical blocks: a pyarrow Table with `label` (float32), the dense columns
(float32, null where empty) and the sparse columns (string, null where empty; a multi-valued
field is list<string>, an empty bag where it has no value: a Parquet list column, or a text
column split at the separator that `data.multi_valued` declares for it). Text files are
parsed block by block by pyarrow (gzip is detected), never loaded whole. A malformed line (wrong
column count, non-numeric label or dense value) is skipped, counted and warned about with its
file and line number, or raises a ValueError naming them under `strict`.
"""

from __future__ import annotations

import glob
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Generator, Iterator, List, Optional, Sequence, Tuple, Union

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
    multi: Tuple[str, ...] = ()  # the multi-valued sparse fields (list<string> columns)

    def arrow(self) -> pa.Schema:
        """The canonical Arrow schema: label, dense floats, sparse strings (lists of strings if multi-valued)."""
        return pa.schema([(LABEL, pa.float32())] + [(n, pa.float32()) for n in self.dense]
                         + [(n, pa.list_(pa.string()) if n in self.multi else pa.string()) for n in self.sparse])


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
    """Streams canonical blocks from a list of raw files of one format; counts skipped lines.

    `labels` maps raw label values to 0/1 (prepare: {0: 0, 1: 1} or `data.label_map`): any other
    label is a ValueError naming the file and line (None: labels pass unchecked, as in convert).
    `multi_valued` names text columns split into lists at a separator (Parquet lists need none).
    """

    def __init__(self, fmt: str, paths: Sequence[str], strict: bool = False,
                 block_size: int = DEFAULT_BLOCK_SIZE, labels: Optional[Dict[float, float]] = None,
                 multi_valued: Optional[Dict[str, str]] = None) -> None:
        if fmt not in (*TEXT_FORMATS, "parquet"):
            raise ValueError(f"unknown data format {fmt!r} (criteo_tsv, avazu_csv or parquet)")
        self.fmt, self.strict, self.block_size = fmt, strict, block_size
        self.labels = labels
        self.separators = dict(multi_valued or {})
        self.files = expand_paths(paths, fmt)
        self.skipped = 0
        self._lines: Dict[Path, int] = {}  # data lines per text file, once counted
        self.schema = self._common_schema()

    def _common_schema(self) -> Schema:
        """The schema of the first file; every other file must match it."""
        schemas = [(p, self._file_schema(p)) for p in self.files]
        first_path, first = schemas[0]
        for p, s in schemas[1:]:
            if s != first:
                raise ValueError(f"{p}: columns differ from {first_path} ({list(s.dense + s.sparse)}, multi-valued "
                                 f"{list(s.multi)} vs {list(first.dense + first.sparse)}, {list(first.multi)})")
        return first

    def _file_schema(self, path: Path) -> Schema:
        schema = _text_layout(self.fmt, path)[2] if self.fmt in TEXT_FORMATS else _parquet_schema(path)
        for name in self.separators:
            if name not in schema.sparse:
                raise ValueError(f"{path}: data.multi_valued names {name!r}, not a categorical column of this file")
            if name in schema.multi:
                raise ValueError(f"{path}: column {name!r} is already a list; remove it from data.multi_valued")
        multi = tuple(n for n in schema.sparse if n in schema.multi or n in self.separators)
        return Schema(schema.dense, schema.sparse, multi)

    def __iter__(self) -> Iterator[pa.Table]:
        for table, _ in self.blocks():
            yield table

    def blocks(self) -> Iterator[Tuple[pa.Table, np.ndarray]]:
        """(canonical block, 0-based physical row of each of its rows over all files): a row's
        physical index counts skipped lines too, so it does not depend on which lines were bad."""
        offset = 0
        for path in self.files:
            it = self._iter_text(path) if self.fmt in TEXT_FORMATS else self._iter_parquet(path)
            good, skipped = 0, self.skipped
            while True:
                try:
                    table, rows = next(it)
                except StopIteration as stop:
                    rows_in_file = stop.value
                    break
                good += table.num_rows
                yield table, rows + offset
            if good == 0:  # every line malformed: wrong data or format, not a file to "prepare" as 0 rows
                raise ValueError(f"{path}: no valid row ({self.skipped - skipped} malformed lines skipped; "
                                 f"is it {self.fmt} data?)")
            if path in self._lines and self._lines[path] != rows_in_file:
                raise ValueError(f"{path}: parsed {rows_in_file} lines but the file has {self._lines[path]} "
                                 f"(a quoted line break or a lone carriage return?)")
            offset += rows_in_file

    def count_rows(self) -> int:
        """Physical data rows over all files (what a sequential split divides): Parquet metadata,
        or for text one streamed scan counting line breaks (a decompression pass for gzip, no parsing)."""
        total = 0
        for path in self.files:
            if self.fmt == "parquet":
                try:
                    total += pq.read_metadata(str(path)).num_rows
                except (OSError, pa.ArrowException) as e:
                    raise _file_error(path, e) from None
            else:
                if path not in self._lines:
                    header = 0 if self.fmt == "criteo_tsv" else 1
                    self._lines[path] = max(_count_lines(path) - header, 0)
                total += self._lines[path]
        return total

    def _finish(self, path: Path, table: pa.Table, schema: Schema, phys: np.ndarray,
                where: Callable[[np.ndarray], np.ndarray], undecodable: Optional[np.ndarray] = None
                ) -> Tuple[pa.Table, np.ndarray, List[Tuple[int, str]]]:
        """Canonical good rows of a parsed block with their physical rows, and (line, reason) of bad ones;
        labels are checked and mapped, separated columns split."""
        out, bad_rows, keep = _to_canonical(table, schema, self.separators, undecodable)
        problems = [(int(where(phys[j:j + 1])[0]), reason) for j, reason in bad_rows]
        if keep is not None:
            phys = phys[keep]
        if self.labels is not None:
            out = self._map_labels(path, out, phys, where)
        return out, phys, problems

    def _map_labels(self, path: Path, table: pa.Table, phys: np.ndarray,
                    where: Callable[[np.ndarray], np.ndarray]) -> pa.Table:
        """Labels through `self.labels`; the first unmapped one is a ValueError naming its line."""
        keys = pa.array(list(self.labels), pa.float32())
        label = table.column(LABEL).combine_chunks()
        idx = pc.index_in(label, value_set=keys)
        if idx.null_count:
            j = int(np.flatnonzero(idx.is_null().to_numpy(zero_copy_only=False))[0])
            line = int(where(phys[j:j + 1])[0])
            at = f"{path} line {line}" if line > 0 else f"{path} row {-line}"
            codes = ", ".join(f"{k:g}" for k in self.labels)
            raise ValueError(f"{at}: label {label[j].as_py():g} is not one of {codes} "
                             f"(map other codes to 0/1 with data.label_map)")
        values = np.asarray(list(self.labels.values()), dtype=np.float32)
        return table.set_column(0, LABEL, pa.array(values[idx.to_numpy(zero_copy_only=False)]))

    # ------------------------------------------------------------------ text
    def _iter_text(self, path: Path) -> Generator[Tuple[pa.Table, np.ndarray], None, int]:
        """(good rows, their physical rows in this file) per block; returns the file's data lines."""
        names, header, _ = _text_layout(self.fmt, path)
        schema = self._file_schema(path)
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
        # Bytes, decoded per column below: one line that is not UTF-8 is skipped, not the whole file.
        convert = pacsv.ConvertOptions(column_types={n: pa.binary() for n in names},
                                       include_columns=[label, *schema.dense, *schema.sparse],
                                       strings_can_be_null=True, null_values=[""], quoted_strings_can_be_null=True)
        try:
            reader = pacsv.open_csv(pa.input_stream(str(path), compression="detect"), read_options=read,
                                    parse_options=parse, convert_options=convert)
        except (OSError, pa.ArrowException) as e:
            raise _file_error(path, e) from None
        header_lines = 1 if header else 0

        def line_of(phys: np.ndarray) -> np.ndarray:
            return phys + 1 + header_lines

        rows_before, warned, reported = 0, 0, 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except (OSError, pa.ArrowException) as e:
                raise _file_error(path, e) from None
            table = pa.Table.from_batches([batch]).rename_columns([LABEL, *schema.dense, *schema.sparse])
            phys = _physical_lines(np.arange(rows_before, rows_before + table.num_rows), invalid_lines,
                                   header_lines) - 1 - header_lines
            new = len(invalid_lines)
            problems = list(zip(invalid_lines[reported:new], invalid_reasons[reported:new]))
            reported = new
            table, undecodable = _decode_utf8(table)
            out, phys, bad = self._finish(path, table, schema, phys, line_of, undecodable)
            rows_before += table.num_rows
            warned = self._report(path, sorted(problems + bad), warned)
            yield out, phys
        self._report(path, list(zip(invalid_lines[reported:], invalid_reasons[reported:])), warned)
        return rows_before + len(invalid_lines)

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
    def _iter_parquet(self, path: Path) -> Generator[Tuple[pa.Table, np.ndarray], None, int]:
        """(good rows, their rows in this file) per batch; returns the file's rows."""
        schema = self._file_schema(path)
        rows_before, warned = 0, 0

        def row_of(phys: np.ndarray) -> np.ndarray:  # Parquet has no lines: 1-based rows, passed negated
            return -(phys + 1)

        try:
            batches = pq.ParquetFile(str(path)).iter_batches(batch_size=PARQUET_BATCH_ROWS,
                                                             columns=[LABEL, *schema.dense, *schema.sparse])
            for batch in batches:
                phys = np.arange(rows_before, rows_before + batch.num_rows, dtype=np.int64)
                out, phys, bad = self._finish(path, pa.Table.from_batches([batch]), schema, phys, row_of)
                warned = self._report(path, bad, warned)
                rows_before += batch.num_rows
                yield out, phys
        except (OSError, pa.ArrowException) as e:
            raise _file_error(path, e) from None
        return rows_before


def _count_lines(path: Path) -> int:
    """Lines of a (possibly gzipped) text file: line breaks, plus one for a last line without one."""
    lines, last = 0, b"\n"
    try:
        with pa.input_stream(str(path), compression="detect") as f:
            while True:
                chunk = f.read(DEFAULT_BLOCK_SIZE)
                if not chunk:
                    break
                lines += chunk.count(b"\n")
                last = chunk[-1:]
    except (OSError, pa.ArrowException) as e:
        raise _file_error(path, e) from None
    return lines + (last != b"\n")


def _parquet_schema(path: Path) -> Schema:
    """Schema of a canonical Parquet file: floating columns are dense, string/integer ones sparse."""
    try:
        arrow = pq.read_schema(str(path))
    except (OSError, pa.ArrowException) as e:
        raise _file_error(path, e) from None
    if LABEL not in arrow.names:
        raise ValueError(f"{path}: Parquet file has no {LABEL!r} column")
    dense, sparse, multi = [], [], []
    for f in arrow:
        if f.name == LABEL:
            continue
        if pa.types.is_floating(f.type):
            dense.append(f.name)
        elif _is_category(f.type):
            sparse.append(f.name)
        elif (pa.types.is_list(f.type) or pa.types.is_large_list(f.type)) and _is_category(f.type.value_type):
            sparse.append(f.name)
            multi.append(f.name)
        else:
            raise ValueError(f"{path}: column {f.name!r} has type {f.type}, expected float (dense), string/int "
                             f"or a list of strings/ints (multi-valued)")
    return Schema(tuple(dense), tuple(sparse), tuple(multi))


def _is_category(t: pa.DataType) -> bool:
    """String or integer: a type a categorical value may have."""
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)


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


def _to_canonical(table: pa.Table, schema: Schema, separators: Dict[str, str],
                  undecodable: Optional[np.ndarray] = None
                  ) -> Tuple[pa.Table, List[Tuple[int, str]], Optional[np.ndarray]]:
    """Parses label and dense columns, splits separated columns; returns the good rows, (row in block,
    reason) of bad ones and the mask of good rows (None when every row is good)."""
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
        col = table.column(n).combine_chunks()
        if n in separators:
            cols[n] = split_values(col, separators[n])
        elif n in schema.multi:
            cols[n] = clean_bags(col)
        else:
            cols[n] = col.cast(pa.string())
    out = pa.table(cols, schema=schema.arrow())
    any_bad = np.logical_or.reduce([mask for mask, _ in reasons])
    if not any_bad.any():
        return out, [], None
    empty = np.logical_and.reduce([table.column(n).is_null().to_numpy(zero_copy_only=False)
                                   for n in table.column_names])
    bad_rows = [(int(j), "empty line" if empty[j] else next(r for mask, r in reasons if mask[j]))
                for j in np.flatnonzero(any_bad)]
    return out.filter(pa.array(~any_bad)), bad_rows, ~any_bad


def split_values(column: Union[pa.Array, pa.ChunkedArray], separator: str) -> pa.ListArray:
    """Strings split at a literal separator into bags (list<string>); empty pieces are dropped, null is an empty bag."""
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return clean_bags(pc.split_pattern(column.cast(pa.string()), separator), drop_empty=True)


def clean_bags(lists: pa.Array, drop_empty: bool = False) -> pa.ListArray:
    """list<string> without nulls: a null list becomes an empty bag, null (and, if asked, empty) values are dropped."""
    lists = lists.cast(pa.list_(pa.string()))
    flat = pc.list_flatten(lists)
    keep = flat.is_valid()
    if drop_empty:
        keep = pc.and_(keep, pc.fill_null(pc.not_equal(flat, ""), False))
    keep = keep.to_numpy(zero_copy_only=False)
    if keep.all() and not lists.null_count:
        return lists
    parents = pc.list_parent_indices(lists).to_numpy()
    lengths = np.bincount(parents[keep], minlength=len(lists))
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, flat.filter(pa.array(keep)))


def _physical_lines(rows: np.ndarray, invalid_lines: List[int], header_lines: int) -> np.ndarray:
    """1-based line numbers of parsed rows (0-based, in order), given the sorted lines pyarrow skipped."""
    invalid = np.asarray(invalid_lines, dtype=np.int64)
    before = invalid - 1 - header_lines - np.arange(len(invalid))  # parsed rows before each skipped line
    return rows + 1 + header_lines + np.searchsorted(before, rows, side="right")
