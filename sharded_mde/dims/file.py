"""The dims file that every search writes and the planner, retrain and export read.

The dims file (JSON, `format_version` 2) says, per table, how many columns the search kept (and,
for PME, how many rows each token group of a size holds), and carries in typed fields what the
stages after the search read (`dims/records.py`). It is validated on load so that a bad file fails
with one line naming the file and the table or key. Version 1 files, which carried those records in
the free-form `extra`, still load: their `extra` keys are moved into the typed fields.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection, Dict, List, Optional, Sequence, Tuple, Union

from sharded_mde.dims.cost import (DIM_MULTIPLE, OPTIMIZER_BYTES, SERVING_DTYPES, WEIGHT_BYTES, legal_dim,
                                   legal_serving_dim, serving_dim_multiple, table_bytes)
from sharded_mde.dims.records import CandidateCheck, CapsRecord, PlantedAgreement, PmeRecord, RuleRecord, from_json
from sharded_mde.io import atomic_write_json, read_json

FORMAT_VERSION = 2  # 2: the records moved from `extra` into typed fields; 1 still loads (migrated)
READABLE_VERSIONS = (1, 2)
# the typed fields beyond the tables and the byte model (absent from the JSON when None)
RECORDS = ("supernet_checkpoints", "data_dir", "trace_file", "rule", "planted", "check", "pme", "caps")


def table_name(feature: str) -> str:
    """The project's table name for a feature: `t_<feature>`."""
    return f"t_{feature}"


def group_name(name: str, size: int) -> str:
    """Name of a PME token group of `size` columns: `<table or feature>_s<size>`."""
    return f"{name}_s{size}"


@dataclass
class TokenGroup:
    """PME: `rows` tokens of one table that all get `size` columns (a table of its own)."""

    size: int
    rows: int
    bytes: int
    dtype: str = ""  # serving dtype of this group's table (fp32 | fp16 | int8 | int4); "" = the table's


@dataclass
class TableDims:
    """One table's search result: its kept dim and columns (HAM) or token groups (PME)."""

    name: str
    features: List[str]
    num_embeddings: int
    full_dim: int
    dim: int
    kept_columns: List[int]
    bytes: int
    groups: List[TokenGroup] = field(default_factory=list)
    dtype: str = ""  # serving dtype chosen for this table (fp32 | fp16 | int8 | int4); "" = export.dtype


@dataclass
class DimsFile:
    """A whole dims file: per-table results plus the budget and byte model they were computed with.

    Args:
        method (str): the search that wrote it ("ham", "pme", "uniform", ...).
        budget_fraction (float): the budget as a fraction of `full_bytes`.
        budget_bytes (int): the budget in bytes (weights + optimizer state).
        full_bytes (int): every table at its full dim.
        kept_bytes (int): the tables at their searched dims (<= budget_bytes).
        tables (List[TableDims]): per table: dim, kept columns (HAM) or token groups (PME), bytes.
        weight_dtype (str): the byte model's weight type.
        optimizer (str): the byte model's table optimizer.
        supernet_checkpoints (Optional[str]): the checkpoints of the model the search trained or scored
            (HAM's supernet, the baseline of magnitude and saliency); retrain warm-starts from its kept columns.
        data_dir (Optional[str]): the data renumbered by the search (PME), which the compact model reads.
        trace_file (Optional[str]): the search's trace (kept bytes, lambda, AUC over steps), next to the file.
        rule (Optional[RuleRecord]): the rule's formula, when a rule and not a search made the dims.
        planted (Optional[PlantedAgreement]): the kept dims against the planted ranks of synthetic data.
        check (Optional[CandidateCheck]): HAM's candidate check and its winner.
        pme (Optional[PmeRecord]): PME's reserved-id sizes, combine mode, token statistics and selection.
        caps (Optional[CapsRecord]): the per-rank caps the dims were chosen under and the final plan's bytes per rank.
        extra (Dict[str, Any]): free-form notes of the search that no stage reads (settings, timings,
            mask values, scores).

    Example::

        dims = search.dims_file()  # or load_dims("runs/demo/ham/dims.json", tables)
        dims.table("t_C1").dim, dims.kept_bytes <= dims.budget_bytes
    """

    method: str
    budget_fraction: float
    budget_bytes: int
    full_bytes: int
    kept_bytes: int
    tables: List[TableDims]
    weight_dtype: str = "fp32"
    optimizer: str = "rowwise_adagrad"
    supernet_checkpoints: Optional[str] = None
    data_dir: Optional[str] = None
    trace_file: Optional[str] = None
    rule: Optional[RuleRecord] = None
    planted: Optional[PlantedAgreement] = None
    check: Optional[CandidateCheck] = None
    pme: Optional[PmeRecord] = None
    caps: Optional[CapsRecord] = None
    extra: Dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def table(self, name: str) -> TableDims:
        """The entry of table `name` (KeyError naming it if absent)."""
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(f"table {name!r} is not in the dims file")


def save_dims(path: Union[str, Path], dims: DimsFile) -> None:
    """Validates `dims` and writes it as JSON atomically.

    Args:
        path (Union[str, Path]): the file to write.
        dims (DimsFile): the dims file.

    Example::

        save_dims("dims.json", search.dims_file())
    """
    validate_dims(dims, str(path))
    out = asdict(dims)
    out.pop("format_version")  # a file is written in this version whatever version it was read from
    out = {"format_version": FORMAT_VERSION, **{k: v for k, v in out.items() if not (k in RECORDS and v is None)}}
    for entry in out["tables"] + [g for t in out["tables"] for g in t["groups"]]:
        if not entry["dtype"]:  # no per-table dtype chosen: the export's dtype applies (key left out)
            del entry["dtype"]
    atomic_write_json(path, out)


def load_dims(path: Union[str, Path], full_tables: Optional[Sequence[Any]] = None) -> DimsFile:
    """Reads and validates a dims file; with `full_tables` (EmbeddingBagConfigs) also checks it matches them.

    Args:
        path (Union[str, Path]): the dims file (JSON).
        full_tables (Optional[Sequence[EmbeddingBagConfig]]): the full tables it must match.

    Example::

        dims = load_dims("dims.json", tables)  # ValueError naming the file and key if it is bad
    """
    where = str(path)
    raw = read_json(path, "dims file")
    dims = _from_json(raw, where)
    if full_tables is not None:
        check_against_tables(dims, full_tables, where)
    validate_dims(dims, where)
    return dims


def _need(obj: Dict[str, Any], key: str, tp: Any, where: str) -> Any:
    if key not in obj:
        raise ValueError(f"{where}: missing key {key!r}")
    v = obj[key]
    if not isinstance(v, tp) or (isinstance(v, bool) and tp is not bool):
        raise ValueError(f"{where}: {key} has the wrong type ({type(v).__name__} {v!r})")
    return v


def _migrate_extra(extra: Dict[str, Any], where: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Version 1: (the typed fields' JSON, the rest of `extra`) from a file whose records sat in `extra`."""
    rest = dict(extra)
    moved = {k: rest.pop(k) for k in ("supernet_checkpoints", "data_dir", "trace_file") if k in rest}
    if "rule" in rest:  # a rule's dims: the formula with its alpha and scale
        moved["rule"] = {"formula": rest.pop("rule"), **{k: rest.pop(k) for k in ("alpha", "scale") if k in rest}}
    settings = rest.get("search")
    if "pme" in rest and isinstance(settings, dict) and "combine" in settings:  # PME's combine sat with the settings
        rest["pme"] = {**_need(rest, "pme", dict, f"{where}: extra"), "combine": settings["combine"]}
    for key, record in (("planted", PlantedAgreement), ("check", CandidateCheck), ("pme", PmeRecord)):
        if key in rest:  # the record's fields move; keys of older writers stay in `extra` as notes
            old = _need(rest, key, dict, f"{where}: extra")
            names = {f.name for f in dataclasses.fields(record)}
            moved[key] = {k: v for k, v in old.items() if k in names}
            rest.pop(key)
            if set(old) - names:
                rest[key] = {k: v for k, v in old.items() if k not in names}
    return moved, rest


def _from_json(raw: Any, where: str) -> DimsFile:
    """Builds a DimsFile from parsed JSON, checking keys and types (a version 1 file's `extra` is migrated)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: a dims file is a JSON object, got {type(raw).__name__}")
    version = _need(raw, "format_version", int, where)
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{where}: format_version {version} is not supported (expected one of {READABLE_VERSIONS})")
    known = {"format_version", "method", "budget_fraction", "budget_bytes", "full_bytes", "kept_bytes",
             "weight_dtype", "optimizer", "tables", "extra", *(RECORDS if version == 2 else ())}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}")
    extra = _need(raw, "extra", dict, where) if "extra" in raw else {}
    moved, extra = _migrate_extra(extra, where) if version == 1 else ({k: raw[k] for k in RECORDS if k in raw}, extra)
    hints = typing.get_type_hints(DimsFile)
    records = {k: from_json(hints[k], v, where, k) for k, v in moved.items()}
    tables = []
    for i, t in enumerate(_need(raw, "tables", list, where)):
        tw = f"{where}: tables[{i}]"
        if not isinstance(t, dict):
            raise ValueError(f"{tw}: expected an object")
        name = _need(t, "name", str, tw)
        tw = f"{where}: table {name}"
        unknown = sorted(set(t) - {"name", "features", "num_embeddings", "full_dim", "dim", "kept_columns", "bytes", "groups", "dtype"})
        if unknown:
            raise ValueError(f"{tw}: unknown key {unknown[0]!r}")
        groups = []
        for j, g in enumerate(t.get("groups", [])):
            gw = f"{tw} groups[{j}]"
            if not isinstance(g, dict) or not {"size", "rows", "bytes"} <= set(g) <= {"size", "rows", "bytes", "dtype"}:
                raise ValueError(f"{gw}: expected an object with size, rows, bytes and an optional dtype")
            groups.append(TokenGroup(_need(g, "size", int, gw), _need(g, "rows", int, gw), _need(g, "bytes", int, gw),
                                     _need(g, "dtype", str, gw) if "dtype" in g else ""))
        features = _need(t, "features", list, tw)
        kept = _need(t, "kept_columns", list, tw)
        if not all(isinstance(f, str) for f in features) or not all(isinstance(c, int) and not isinstance(c, bool) for c in kept):
            raise ValueError(f"{tw}: features must be strings and kept_columns integers")
        tables.append(TableDims(name=name, features=features, num_embeddings=_need(t, "num_embeddings", int, tw),
                                full_dim=_need(t, "full_dim", int, tw), dim=_need(t, "dim", int, tw),
                                kept_columns=kept, bytes=_need(t, "bytes", int, tw), groups=groups,
                                dtype=_need(t, "dtype", str, tw) if "dtype" in t else ""))
    return DimsFile(
        method=_need(raw, "method", str, where),
        budget_fraction=float(_need(raw, "budget_fraction", (int, float), where)),
        budget_bytes=_need(raw, "budget_bytes", int, where),
        full_bytes=_need(raw, "full_bytes", int, where),
        kept_bytes=_need(raw, "kept_bytes", int, where),
        tables=tables,
        weight_dtype=_need(raw, "weight_dtype", str, where) if "weight_dtype" in raw else "fp32",
        optimizer=_need(raw, "optimizer", str, where) if "optimizer" in raw else "rowwise_adagrad",
        extra=extra,
        **records,  # format_version: the current one, the records migrated
    )


def validate_dims(dims: DimsFile, where: str = "dims") -> None:
    """Checks legal dims, kept columns, token groups and byte totals; raises ValueError naming the table."""
    if dims.weight_dtype not in WEIGHT_BYTES or dims.optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"{where}: weight_dtype/optimizer must be in {sorted(WEIGHT_BYTES)}/{sorted(OPTIMIZER_BYTES)}, "
                         f"got {dims.weight_dtype!r}/{dims.optimizer!r}")
    if not 0 < dims.budget_fraction <= 1:
        raise ValueError(f"{where}: budget_fraction must be in (0, 1], got {dims.budget_fraction}")
    seen = set()
    full_total = kept_total = 0
    for t in dims.tables:
        tw = f"{where}: table {t.name}"
        if t.name in seen:
            raise ValueError(f"{tw}: listed twice")
        seen.add(t.name)
        if not t.features:
            raise ValueError(f"{tw}: needs at least one feature")
        if t.num_embeddings < 1 or not legal_dim(t.full_dim):
            raise ValueError(f"{tw}: num_embeddings must be >= 1 and full_dim a multiple of {DIM_MULTIPLE}, "
                             f"got {t.num_embeddings} x {t.full_dim}")
        if t.dim != 0 and not legal_dim(t.dim):
            raise ValueError(f"{tw}: dim {t.dim} is not legal for FBGEMM (a multiple of {DIM_MULTIPLE}, or 0 = dropped)")
        if t.dim > t.full_dim:
            raise ValueError(f"{tw}: dim {t.dim} exceeds full_dim {t.full_dim}")
        _check_columns(t, tw)
        _check_dtype(t.dtype, t.dim, tw)
        for g in t.groups:
            _check_dtype(g.dtype, g.size, f"{tw} group of size {g.size}")
        if t.groups:  # PME: the groups' bytes, plus any remap bytes the search counted
            expected = _check_groups(t, dims, tw)
            bad = t.bytes < expected
        else:
            expected = table_bytes(t.num_embeddings, t.dim, dims.weight_dtype, dims.optimizer).total
            bad = t.bytes != expected
        if bad:
            raise ValueError(f"{tw}: bytes {t.bytes} do not match the byte model ({expected} for "
                             f"{dims.weight_dtype} weights and {dims.optimizer} state)")
        full_total += table_bytes(t.num_embeddings, t.full_dim, dims.weight_dtype, dims.optimizer).total
        kept_total += t.bytes
    if dims.full_bytes != full_total:
        raise ValueError(f"{where}: full_bytes {dims.full_bytes} != {full_total}, the sum over tables at full_dim")
    if dims.kept_bytes != kept_total:
        raise ValueError(f"{where}: kept_bytes {dims.kept_bytes} != {kept_total}, the sum of the tables' bytes")
    _check_records(dims, seen, where)


def _check_records(dims: DimsFile, tables: Collection[str], where: str) -> None:
    """The records name tables of the file, and the check's winner is one of its candidates."""
    if dims.pme is not None:
        other = sorted(set(dims.pme.reserved_sizes) - set(tables))
        if other:
            raise ValueError(f"{where}: pme.reserved_sizes names table {other[0]}, which is not in the file")
    if dims.check is not None and dims.check.winner not in {c.name for c in dims.check.candidates}:
        raise ValueError(f"{where}: check.winner {dims.check.winner!r} is not one of check.candidates")


def _check_dtype(dtype: str, dim: int, where: str) -> None:
    """A table's or group's serving dtype: "" (the export's) or a serving dtype whose FBGEMM rows can hold `dim`."""
    if not dtype:
        return
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"{where}: dtype {dtype!r} is not one of {', '.join(SERVING_DTYPES)}")
    if dim and not legal_serving_dim(dim, dtype):
        raise ValueError(f"{where}: dim {dim} is not legal for {dtype} serving rows "
                         f"(a multiple of {serving_dim_multiple(dtype)})")


def _check_columns(t: TableDims, tw: str) -> None:
    """kept_columns: strictly increasing indices below full_dim, one per kept column ([] allowed for PME/dropped)."""
    cols = t.kept_columns
    if cols and len(cols) != t.dim:
        raise ValueError(f"{tw}: kept_columns has {len(cols)} entries but dim is {t.dim}")
    if not cols and t.dim and not t.groups:
        raise ValueError(f"{tw}: kept_columns is empty but dim is {t.dim}")
    if any(b <= a for a, b in zip(cols, cols[1:])) or (cols and (cols[0] < 0 or cols[-1] >= t.full_dim)):
        raise ValueError(f"{tw}: kept_columns must be strictly increasing indices in [0, {t.full_dim})")


def _check_groups(t: TableDims, dims: DimsFile, tw: str) -> int:
    """PME groups: distinct legal sizes (0 = pruned tokens) covering every row; returns their byte sum."""
    sizes = [g.size for g in t.groups]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"{tw}: token group sizes repeat: {sizes}")
    total = 0
    for g in t.groups:
        if (g.size != 0 and not legal_dim(g.size)) or g.size > t.full_dim or g.rows < 0:
            raise ValueError(f"{tw}: token group size {g.size} is not legal (a multiple of {DIM_MULTIPLE} up to "
                             f"full_dim {t.full_dim}, or 0) or its rows {g.rows} are negative")
        gb = table_bytes(g.rows, g.size, dims.weight_dtype, dims.optimizer).total
        if g.bytes != gb:
            raise ValueError(f"{tw}: token group of size {g.size} has bytes {g.bytes}, the byte model gives {gb}")
        total += gb
    if sum(g.rows for g in t.groups) != t.num_embeddings:
        raise ValueError(f"{tw}: token groups hold {sum(g.rows for g in t.groups)} rows, the table has {t.num_embeddings}")
    if t.dim != max(sizes):
        raise ValueError(f"{tw}: dim {t.dim} must be the largest token group size {max(sizes)}")
    return total


def check_against_tables(dims: DimsFile, full_tables: Sequence[Any], where: str = "dims") -> None:
    """Every dims entry names a full table with the same rows, dim and features, and every full table is listed."""
    full = {t.name: t for t in full_tables}
    for t in dims.tables:
        if t.name not in full:
            raise ValueError(f"{where}: table {t.name} is not a table of the model (known: {', '.join(sorted(full)[:8])}"
                             f"{', ...' if len(full) > 8 else ''})")
        f = full[t.name]
        if (t.num_embeddings, t.full_dim) != (f.num_embeddings, f.embedding_dim) or list(t.features) != list(f.feature_names):
            raise ValueError(f"{where}: table {t.name} is {t.num_embeddings} x {t.full_dim} for {t.features} in the dims "
                             f"file but {f.num_embeddings} x {f.embedding_dim} for {list(f.feature_names)} in the model")
    missing = [n for n in full if n not in {t.name for t in dims.tables}]
    if missing:
        raise ValueError(f"{where}: table {missing[0]} of the model is missing from the dims file")


def serving_dtypes(tables: Sequence[TableDims], default: str) -> Dict[str, str]:
    """The serving dtype of each table a compact model of these dims-file entries holds, by name (PME: each
    group table `<table>_s<size>`): the entry's own dtype, a group's falling back to its table's, then
    `default` (export.dtype)."""
    out: Dict[str, str] = {}
    for t in tables:
        out[t.name] = t.dtype or default
        for g in t.groups:
            out[group_name(t.name, g.size)] = g.dtype or t.dtype or default
    return out
