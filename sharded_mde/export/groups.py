"""PME token groups in an export: the remap and projection files, written from a checkpoint and served back.

A token-group model's sparse arch is a `TokenGroupEBC`: group tables (exported like any other
table), a router that sends each (renumbered) vocabulary id to its group table and row, and a
combiner whose projections bring each group to the field's width before the groups are summed.
The export writes the router's id ranges as `remap.arrow`, one row per range (feature, start,
end, table, row: ids [start, end) of the feature are rows [row, row + end - start) of `table`;
ids in no range are pruned and read nothing), and the projections as `projections.arrow`. Serving rebuilds the
same `TokenGroupEBC` around the loaded float or quantised EBC, after checking that the remap file
is exactly the routing of the token groups the manifest describes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import pyarrow as pa
from torch import nn
from torchrec import EmbeddingBagConfig

from sharded_mde.export.arrowfile import read_arrow, read_weights, write_arrow, write_weights
from sharded_mde.export.manifest import MANIFEST, ExportedTokenGroups, Manifest
from sharded_mde.modules.token_groups import FieldGroups, GroupCombiner, TokenGroupEBC, merge_runs, router_bytes

REMAP_FILE = "remap.arrow"
PROJECTIONS_FILE = "projections.arrow"
COMBINER = "combiner."  # TokenGroupEBC's child that holds the group projections
_REMAP_COLUMNS = ["feature", "start", "end", "table", "row"]


def group_tables(fields: Sequence[FieldGroups], tables: Sequence[EmbeddingBagConfig]) -> Dict[str, str]:
    """Group key -> table name; every group must have a table of its rows and size, and every table a group."""
    by_key = {f: t for t in tables for f in t.feature_names}
    out: Dict[str, str] = {}
    for field in fields:
        for key, (size, rows) in zip(field.keys(), field.groups):
            t = by_key.get(key)
            if t is None:
                raise ValueError(f"token group {key}: no table of the checkpoint holds it")
            if (t.num_embeddings, t.embedding_dim) != (rows, size):
                raise ValueError(f"table {t.name}: {t.num_embeddings} x {t.embedding_dim} in the checkpoint, but token "
                                 f"group {key} of the dims file is {rows} x {size}")
            out[key] = t.name
    stray = sorted(t.name for t in tables if not set(t.feature_names) & set(out))
    if stray:
        raise ValueError(f"table {stray[0]} of the checkpoint is no token group of the dims file")
    return out


def remap_table(fields: Sequence[FieldGroups], table_of: Mapping[str, str]) -> pa.Table:
    """The remap of `fields` as an Arrow table: one row per id range (feature, start, end, table, row)."""
    cols: Dict[str, List[Any]] = {c: [] for c in _REMAP_COLUMNS}
    for f in fields:
        keys = f.keys()
        for lo, hi, g, row in f.id_ranges():
            for c, v in zip(_REMAP_COLUMNS, (f.feature, lo, hi, table_of[keys[g]], row)):
                cols[c].append(v)
    types = {"feature": pa.string(), "table": pa.string()}
    return pa.table({c: pa.array(v, type=types.get(c, pa.int64())) for c, v in cols.items()})


def write_token_groups(root: Path, fields: Sequence[FieldGroups], combine: str, sparse_state: Mapping[str, Any],
                       tables: Sequence[EmbeddingBagConfig]) -> ExportedTokenGroups:
    """Writes the remap and the projections (from the sparse arch's saved state) into `root`; their manifest entry."""
    table_of = group_tables(fields, tables)
    combiner = GroupCombiner(fields, combine)
    state = {k[len(COMBINER):]: v for k, v in sparse_state.items() if k.startswith(COMBINER)}
    try:
        combiner.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"the checkpoint's group projections do not fit the dims file's token groups (combine "
                         f"{combine!r}: {str(e).splitlines()[-1].strip()})") from None
    write_arrow(root / REMAP_FILE, remap_table(fields, table_of))
    write_weights(root / PROJECTIONS_FILE, {k: v.detach() for k, v in combiner.state_dict().items()})
    return ExportedTokenGroups(combine, [dataclasses.asdict(f) for f in fields], REMAP_FILE, PROJECTIONS_FILE)


def _fields(spec: ExportedTokenGroups, where: Path) -> List[FieldGroups]:
    out = []
    for i, d in enumerate(spec.fields):
        try:
            out.append(FieldGroups(d["feature"], d["num_embeddings"], d["out_dim"],
                                   tuple(tuple(g) for g in d["groups"]), tuple(d["reserved"]),
                                   d.get("pooling", "sum")))  # exports before pooling was recorded summed
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: token_groups.fields[{i}]: {e}") from None
    return out


def _kept_ranges(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """A format-2 remap as format 3 writes it: pruned ranges (table "") left out, runs of rows merged."""
    merged = merge_runs([(r["start"], r["end"], (r["feature"], r["table"]), r["row"]) for r in rows if r["table"]])
    return [{"feature": f, "start": lo, "end": hi, "table": t, "row": row} for lo, hi, (f, t), row in merged]


def _check_remap(path: Path, want: pa.Table, version: int) -> None:
    """Refuses a remap file that is not exactly `want`, naming the file and the first differing range.

    An export of format version 2 or older listed pruned ranges and one range per reserved id: its
    ranges are normalised first (the routing they describe is the same)."""
    found = read_arrow(path, "remap file", _REMAP_COLUMNS)
    if found.schema != want.schema:
        raise ValueError(f"{path}: remap columns are {found.schema}, expected {want.schema}")
    a, b = found.to_pylist(), want.to_pylist()
    if version < 3:
        a = _kept_ranges(a)
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            raise ValueError(f"{path}: remap range {i} is {x}, but the manifest's token groups route {y}")
    if len(a) != len(b):
        raise ValueError(f"{path}: {len(a)} remap ranges, but the manifest's token groups have {len(b)}")


def serving_token_groups(root: Path, manifest: Manifest, ebc: nn.Module) -> TokenGroupEBC:
    """The export's token-group module around `ebc` (its loaded group tables): remap, lookup, projection, sum."""
    spec = manifest.token_groups
    if spec is None:
        raise ValueError(f"{root / MANIFEST}: the export has no token groups")
    fields = _fields(spec, root / MANIFEST)
    tables = [t.config() for t in manifest.tables]
    try:
        table_of = group_tables(fields, tables)
    except ValueError as e:
        raise ValueError(f"{root / MANIFEST}: {e}") from None
    _check_remap(root / spec.remap_file, remap_table(fields, table_of), manifest.format_version)
    module = TokenGroupEBC(fields, tables, spec.combine, ebc=ebc)
    path = root / spec.projections_file
    try:
        module.combiner.load_state_dict(read_weights(path))
    except RuntimeError as e:
        raise ValueError(f"{path}: projections do not fit the manifest's token groups "
                         f"({str(e).splitlines()[-1].strip()})") from None
    return module


def token_group_bytes(manifest: Manifest) -> int:
    """Serving bytes of the token groups beyond their tables: the remap (routing ranges) and fp32 projections."""
    spec = manifest.token_groups
    if spec is None:
        return 0
    fields = _fields(spec, Path(MANIFEST))
    combiner = GroupCombiner(fields, spec.combine)
    return sum(router_bytes(f) for f in fields) + 4 * sum(p.numel() for p in combiner.parameters())
