"""Streaming readers for click logs: delimited text (CSV/TSV, Criteo, Avazu) and Parquet, by declared schema.

What the columns are (label, dense, sparse, multi-valued, types) comes from an `InputSchema`
(`schema.py`: a format's preset with the `data.*` declarations laid over it). Every reader yields
canonical blocks: a pyarrow Table with `label` (float32), the dense columns (float32, null where
empty) and the sparse columns (string, null where empty; a multi-valued field is list<string>, an
empty bag where it has no value: a Parquet list column, or a text column split at its separator).
Text files are parsed block by block by pyarrow (gzip is detected), never loaded whole. A
malformed line (wrong column count, non-numeric label or dense value) is skipped, counted and
warned about with its file and line number, or raises a ValueError naming them under `strict`. A
value that does not match its declared type (`data.types`) is always a ValueError naming file,
line (Parquet: row) and column.
"""

from __future__ import annotations

import glob
import warnings
from pathlib import Path
from typing import Callable, Dict, Generator, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from sharded_mde.data.schema import LABEL, InputSchema, Schema, preset

DEFAULT_BLOCK_SIZE = 16 << 20  # bytes of text parsed per block
PARQUET_BATCH_ROWS = 1 << 18
MAX_WARNINGS_PER_FILE = 10
_NUMBER = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
_INTEGER = r"^[+-]?[0-9]+$"
# (row in block, column, offending value, declared type) of the first value that breaks `data.types`
Mismatch = Tuple[int, str, object, str]
# (start, end, first): the lines of a text file in bytes [start, end), both at line starts; `first` = the data
# lines of the file before `start`
ByteRange = Tuple[int, int, int]


class DataWarning(UserWarning):
    """A malformed input line was skipped."""


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


def _parse_numbers(col: pa.Array, dtype: pa.DataType = pa.float32()) -> Tuple[pa.Array, np.ndarray]:
    """Numbers (or number strings) as `dtype`, null kept; also a mask of non-numeric or non-finite values."""
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
    values = pc.cast(values, dtype, safe=False)
    bad |= pc.fill_null(pc.invert(pc.is_finite(values)), False).to_numpy(zero_copy_only=False)
    return values, bad


def _parse_ints(col: pa.Array) -> Tuple[pa.Array, np.ndarray]:
    """Integer values as canonical decimal strings (no '+', no leading zeros: "007" and 7 agree), null kept;
    also a mask of values that are not integers."""
    if pa.types.is_integer(col.type):
        return col.cast(pa.string()), np.zeros(len(col), dtype=bool)
    if pa.types.is_floating(col.type):
        x = col.cast(pa.float64())
        ok = pc.and_(pc.is_finite(x), pc.and_(pc.equal(x, pc.floor(x)), pc.less(pc.abs(x), 2.0 ** 63)))
        ok = pc.fill_null(ok, True)
        ints = pc.cast(pc.if_else(ok, x, pa.scalar(None, pa.float64())), pa.int64())
        return ints.cast(pa.string()), pc.invert(ok).to_numpy(zero_copy_only=False)
    col = col.cast(pa.string())
    ok = pc.fill_null(pc.match_substring_regex(col, _INTEGER), True)
    text = pc.replace_substring_regex(pc.if_else(ok, col, pa.scalar(None, pa.string())), r"^\+", "")
    text = pc.replace_substring_regex(text, r"^(-?)0+([0-9])", r"\1\2")
    return pc.replace_substring_regex(text, r"^-0$", "0"), pc.invert(ok).to_numpy(zero_copy_only=False)


def _categories(col: pa.Array, kind: Optional[str]) -> Tuple[pa.Array, np.ndarray]:
    """Categorical values as strings, normalised by their declared type (int: decimal digits; float: the
    shortest decimal form, "3.0" and 3 agree); also a mask of values that break the type."""
    if kind == "int":
        return _parse_ints(col)
    if kind == "float":  # a float column keeps its own precision (float32 0.1 reads "0.1", as text does)
        values, bad = _parse_numbers(col, col.type if pa.types.is_floating(col.type) else pa.float64())
        return values.cast(pa.string()), bad
    return col.cast(pa.string()), np.zeros(len(col), dtype=bool)


class SourceReader:
    """Streams canonical blocks from a list of raw files of one schema; counts skipped lines.

    `source` is a format name (its preset schema: criteo_tsv, avazu_csv, csv, tsv, parquet) or a
    declared `InputSchema` (`schema.input_schema(cfg)`). `labels` maps raw label values to 0/1
    (prepare: {0: 0, 1: 1} or `data.label_map`): any other label is a ValueError naming the file
    and line (None: labels pass unchecked, as in convert). `multi_valued` adds text columns split
    into lists at a separator (Parquet lists need none).
    """

    def __init__(self, source: Union[str, InputSchema], paths: Sequence[str], strict: bool = False,
                 block_size: int = DEFAULT_BLOCK_SIZE, labels: Optional[Dict[float, float]] = None,
                 multi_valued: Optional[Dict[str, str]] = None) -> None:
        self.input = (preset(source) if isinstance(source, str) else source).with_separators(multi_valued or {})
        self.fmt, self.strict, self.block_size = self.input.format, strict, block_size
        self.labels = labels
        self.files = expand_paths(paths, self.fmt)
        self.skipped = 0
        self._lines: Dict[Path, int] = {}  # data lines per text file, once counted
        self._layouts: Dict[Path, Tuple[Tuple[str, ...], Schema]] = {}  # (columns, canonical fields) per file
        self.schema = self._common_schema()

    def _common_schema(self) -> Schema:
        """The schema of the first file; every other file must match it."""
        schemas = [(p, self._layout(p)[1]) for p in self.files]
        first_path, first = schemas[0]
        for p, s in schemas[1:]:
            if s != first:
                raise ValueError(f"{p}: columns differ from {first_path} ({list(s.dense + s.sparse)}, multi-valued "
                                 f"{list(s.multi)} vs {list(first.dense + first.sparse)}, {list(first.multi)})")
        return first

    def _layout(self, path: Path) -> Tuple[Tuple[str, ...], Schema]:
        """(the file's columns, its canonical fields) by the declared schema."""
        if path not in self._layouts:
            if self.input.text:
                names = self.input.header_names(path, _peek_first_line(path))
                self._layouts[path] = names, self.input.layout(path, names)
            else:
                try:
                    arrow = pq.read_schema(str(path))
                except (OSError, pa.ArrowException) as e:
                    raise _file_error(path, e) from None
                self._layouts[path] = tuple(arrow.names), self.input.layout(path, arrow.names, arrow)
        return self._layouts[path]

    def __iter__(self) -> Iterator[pa.Table]:
        for table, _ in self.blocks():
            yield table

    def blocks(self, row_groups: Optional[Dict[Path, Sequence[int]]] = None,
               byte_ranges: Optional[Dict[Path, ByteRange]] = None) -> Iterator[Tuple[pa.Table, np.ndarray]]:
        """(canonical block, 0-based physical row of each of its rows over all files): a row's
        physical index counts skipped lines too, so it does not depend on which lines were bad.
        A distributed prepare's share of a file: `row_groups` reads only those (consecutive) row
        groups of the Parquet files it names, `byte_ranges` only the lines in (start, end) bytes of
        uncompressed text files; their rows keep their index in the whole file."""
        offset = 0
        byte_ranges = byte_ranges or {}
        for path in self.files:
            if self.input.text:
                it = self._iter_text(path, byte_ranges.get(path))
            else:
                it = self._iter_parquet(path, (row_groups or {}).get(path))
            good, skipped = 0, self.skipped
            while True:
                try:
                    table, rows = next(it)
                except StopIteration as stop:
                    rows_in_file = stop.value
                    break
                good += table.num_rows
                yield table, rows + offset
            whole = path not in byte_ranges and path not in (row_groups or {})
            if good == 0 and whole:  # every line malformed: wrong data or format, not a file to "prepare" as 0 rows
                raise ValueError(f"{path}: no valid row ({self.skipped - skipped} malformed lines skipped; "
                                 f"is it {self.fmt} data?)")
            if path in self._lines and whole and self._lines[path] != rows_in_file:
                raise ValueError(f"{path}: parsed {rows_in_file} lines but the file has {self._lines[path]} "
                                 f"(a quoted line break or a lone carriage return?)")
            offset += rows_in_file

    def count_rows(self) -> int:
        """Physical data rows over all files (what a sequential split divides): Parquet metadata,
        or for text one streamed scan counting line breaks (a decompression pass for gzip, no parsing)."""
        total = 0
        for path in self.files:
            if not self.input.text:
                try:
                    total += pq.read_metadata(str(path)).num_rows
                except (OSError, pa.ArrowException) as e:
                    raise _file_error(path, e) from None
            else:
                if path not in self._lines:
                    self._lines[path] = max(_count_lines(path) - int(self.input.header), 0)
                total += self._lines[path]
        return total

    def count_range(self, path: Path, start: int, end: int) -> int:
        """Data lines of an uncompressed text file in bytes [start, end), both at line starts (a header not counted)."""
        return max(_count_lines(path, (start, end)) - int(self.input.header and start == 0), 0)

    def _finish(self, path: Path, table: pa.Table, schema: Schema, phys: np.ndarray,
                where: Callable[[np.ndarray], np.ndarray], undecodable: Optional[np.ndarray] = None
                ) -> Tuple[pa.Table, np.ndarray, List[Tuple[int, str]]]:
        """Canonical good rows of a parsed block with their physical rows, and (line, reason) of bad ones;
        labels are checked and mapped, separated columns split, declared types checked."""
        out, bad_rows, keep, mismatch = _to_canonical(table, schema, self.input, undecodable)
        if mismatch is not None:
            j, column, value, kind = mismatch
            raise ValueError(f"{_at(path, int(where(phys[j:j + 1])[0]))}, column {column!r}: value {value!r} "
                             f"does not match its declared type {kind} (data.types)")
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
            at = _at(path, int(where(phys[j:j + 1])[0]))
            codes = ", ".join(f"{k:g}" for k in self.labels)
            raise ValueError(f"{at}: label {label[j].as_py():g} is not one of {codes} "
                             f"(map other codes to 0/1 with data.label_map)")
        values = np.asarray(list(self.labels.values()), dtype=np.float32)
        return table.set_column(0, LABEL, pa.array(values[idx.to_numpy(zero_copy_only=False)]))

    # ------------------------------------------------------------------ text
    def _iter_text(self, path: Path, byte_range: Optional[ByteRange] = None
                   ) -> Generator[Tuple[pa.Table, np.ndarray], None, int]:
        """(good rows, their physical rows in this file) per block, of the file or of the lines in its
        `byte_range`; returns the data lines of the file up to the end of what was read."""
        names, schema = self._layout(path)
        start, end, first = byte_range if byte_range is not None else (0, -1, 0)
        # pyarrow calls back for lines with a wrong column count, in line order (serial parsing).
        invalid_lines: List[int] = []
        invalid_reasons: List[str] = []

        def on_invalid(row) -> str:
            invalid_lines.append(row.number)
            invalid_reasons.append(f"expected {row.expected_columns} columns, got {row.actual_columns}")
            return "skip"

        header = self.input.header
        in_stream = 1 if header and start == 0 else 0  # header lines in what is parsed
        read = pacsv.ReadOptions(block_size=self.block_size, use_threads=False,  # serial: line numbers known
                                 column_names=None if in_stream else list(names))
        parse = pacsv.ParseOptions(delimiter=self.input.delimiter, quote_char='"' if self.input.quote else False,
                                   invalid_row_handler=on_invalid, ignore_empty_lines=False)
        # Bytes, decoded per column below: one line that is not UTF-8 is skipped, not the whole file.
        convert = pacsv.ConvertOptions(column_types={n: pa.binary() for n in names},
                                       include_columns=[self.input.label, *schema.dense, *schema.sparse],
                                       strings_can_be_null=True, null_values=[""], quoted_strings_can_be_null=True)
        try:
            stream = pa.input_stream(str(path), compression="detect") if byte_range is None else \
                pa.OSFile(str(path)).get_stream(start, end - start)
            reader = pacsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert)
        except (OSError, pa.ArrowException) as e:
            raise _file_error(path, e) from None
        header_lines = 1 if header else 0
        shift = first + header_lines - in_stream  # a parsed line's number -> its line in the file

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
                                   in_stream) - 1 - in_stream + first
            new = len(invalid_lines)
            problems = [(line + shift, why)
                        for line, why in zip(invalid_lines[reported:new], invalid_reasons[reported:new])]
            reported = new
            table, undecodable = _decode_utf8(table)
            out, phys, bad = self._finish(path, table, schema, phys, line_of, undecodable)
            rows_before += table.num_rows
            warned = self._report(path, sorted(problems + bad), warned)
            yield out, phys
        self._report(path, [(line + shift, why) for line, why in zip(invalid_lines[reported:],
                                                                     invalid_reasons[reported:])], warned)
        return first + rows_before + len(invalid_lines)

    def _report(self, path: Path, problems: List[Tuple[int, str]], warned: int) -> int:
        """Counts skipped lines; raises under strict, else warns for the first few per file."""
        for line, reason in problems:
            where = _at(path, line)
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
    def _iter_parquet(self, path: Path, row_groups: Optional[Sequence[int]] = None
                      ) -> Generator[Tuple[pa.Table, np.ndarray], None, int]:
        """(good rows, their rows in this file) per batch of the file (or of its consecutive `row_groups`);
        returns the row after the last one read."""
        schema = self._layout(path)[1]
        columns = [self.input.label, *schema.dense, *schema.sparse]
        rows_before, warned = 0, 0

        def row_of(phys: np.ndarray) -> np.ndarray:  # Parquet has no lines: 1-based rows, passed negated
            return -(phys + 1)

        try:
            pf = pq.ParquetFile(str(path))
            if row_groups is not None:
                rows_before = sum(pf.metadata.row_group(g).num_rows for g in range(row_groups[0])) if row_groups else 0
            batches = pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns, row_groups=row_groups)
            for batch in batches:
                phys = np.arange(rows_before, rows_before + batch.num_rows, dtype=np.int64)
                table = pa.Table.from_batches([batch]).select(columns).rename_columns([LABEL, *columns[1:]])
                out, phys, bad = self._finish(path, table, schema, phys, row_of)
                warned = self._report(path, bad, warned)
                rows_before += batch.num_rows
                yield out, phys
        except (OSError, pa.ArrowException) as e:
            raise _file_error(path, e) from None
        return rows_before


def _count_lines(path: Path, byte_range: Optional[Tuple[int, int]] = None) -> int:
    """Lines of a (possibly gzipped) text file, or of its (start, end) bytes: line breaks, plus one for
    a last line without one."""
    lines, last = 0, b"\n"
    try:
        with (pa.input_stream(str(path), compression="detect") if byte_range is None else
              pa.OSFile(str(path)).get_stream(byte_range[0], byte_range[1] - byte_range[0])) as f:
            while True:
                chunk = f.read(DEFAULT_BLOCK_SIZE)
                if not chunk:
                    break
                lines += chunk.count(b"\n")
                last = chunk[-1:]
    except (OSError, pa.ArrowException) as e:
        raise _file_error(path, e) from None
    return lines + (last != b"\n")


def _at(path: Path, line: int) -> str:
    """Where a row is, for messages: a text line (positive) or a Parquet row (passed negated)."""
    return f"{path} line {line}" if line > 0 else f"{path} row {-line}"


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


def _to_canonical(table: pa.Table, schema: Schema, source: InputSchema, undecodable: Optional[np.ndarray] = None
                  ) -> Tuple[pa.Table, List[Tuple[int, str]], Optional[np.ndarray], Optional[Mismatch]]:
    """Parses label and dense columns, splits separated columns, checks declared types; returns the good rows,
    (row in block, reason) of bad ones, the mask of good rows (None when every row is good) and the first value
    that breaks its declared type (None when none does)."""
    cols = {}
    label_in = table.column(LABEL).combine_chunks()
    cols[LABEL], bad_label = _parse_numbers(label_in)
    reasons = [(label_in.is_null().to_numpy(zero_copy_only=False), "missing label"),
               (bad_label, "non-numeric label")]
    if undecodable is not None:
        reasons.insert(0, (undecodable, "bytes that are not UTF-8"))
    mismatches: List[Mismatch] = []

    def declared(name: str, raw: pa.Array, bad: np.ndarray) -> bool:
        """Records the first value of a typed column that breaks its type; True if the column is typed."""
        kind = source.types.get(name)
        if kind is not None and bad.any():
            j = int(np.flatnonzero(bad)[0])
            mismatches.append((j, name, raw[j].as_py(), kind))
        return kind is not None

    for n in schema.dense:
        raw = table.column(n).combine_chunks()
        cols[n], bad = _parse_numbers(raw)
        if source.types.get(n) == "int":
            bad = bad | _parse_ints(raw)[1]
        if not declared(n, raw, bad):
            reasons.append((bad, f"non-numeric value in {n}"))
    for n in schema.sparse:
        raw = table.column(n).combine_chunks()
        if n not in schema.multi:
            cols[n], bad = _categories(raw, source.types.get(n))
            declared(n, raw, bad)
            continue
        bags = split_values(raw, source.separators[n]) if n in source.separators else raw
        if n in source.types:  # the type applies to every value of a bag
            flat = pc.list_flatten(bags)
            values, bad = _categories(flat, source.types[n])
            if bad.any():  # the bag's row; the offending value
                j = int(np.flatnonzero(bad)[0])
                mismatches.append((int(pc.list_parent_indices(bags)[j].as_py()), n, flat[j].as_py(), source.types[n]))
            lengths = pc.fill_null(pc.list_value_length(bags), 0).to_numpy(zero_copy_only=False)
            bags = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
                                            values)
        cols[n] = clean_bags(bags)
    out = pa.table(cols, schema=schema.arrow())
    mismatch = min(mismatches, key=lambda m: m[0]) if mismatches else None
    any_bad = np.logical_or.reduce([mask for mask, _ in reasons])
    if not any_bad.any():
        return out, [], None, mismatch
    empty = np.logical_and.reduce([table.column(n).is_null().to_numpy(zero_copy_only=False)
                                   for n in table.column_names])
    bad_rows = [(int(j), "empty line" if empty[j] else next(r for mask, r in reasons if mask[j]))
                for j in np.flatnonzero(any_bad)]
    return out.filter(pa.array(~any_bad)), bad_rows, ~any_bad, mismatch


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
