"""Declared input schemas: how a raw file's columns become the label, dense and sparse fields.

One mechanism for every input: a layout (Parquet, or delimited text with its delimiter, quoting and
either a header line or a declared column order) plus per-column roles (dense, sparse, drop), value
types (string, int, float) and separators of multi-valued columns. Criteo TSV and Avazu CSV are
presets of it; the `data.*` keys (`label`, `columns`, `header`, `delimiter`, `dense`, `sparse`,
`drop`, `types`, `multi_valued`, `undeclared`) override a preset, roles and types column by column.
A column without a role is guessed (`undeclared: guess`): for text it is sparse, for Parquet a
float column is dense, a string or integer column sparse, a list column multi-valued sparse.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import pyarrow as pa

from sharded_mde.config import COLUMN_ROLES, DataConfig

LABEL = "label"  # the canonical name of the label column, whatever the input calls it
CRITEO_DENSE = tuple(f"I{i}" for i in range(1, 14))
CRITEO_SPARSE = tuple(f"C{i}" for i in range(1, 27))
_TITLES = {"criteo_tsv": "Criteo", "avazu_csv": "Avazu", "csv": "CSV", "tsv": "TSV", "parquet": "Parquet"}


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


@dataclass(frozen=True)
class InputSchema:
    """How to read one kind of input: its layout and every column's role and type (presets or `data.*`)."""

    format: str  # criteo_tsv | avazu_csv | csv | tsv | parquet (names it in messages)
    delimiter: str = ""  # "" = Parquet; else the text's one-character delimiter
    quote: bool = True  # text: '"' quotes a value (CSV); False: quotes are data (TSV)
    header: bool = True  # text: the first line names the columns; False: `columns` gives them
    columns: Tuple[str, ...] = ()  # text without header: every column, in file order
    label: str = LABEL  # the label column's name in the input
    roles: Dict[str, str] = field(default_factory=dict)  # column -> dense | sparse | drop
    types: Dict[str, str] = field(default_factory=dict)  # column -> string | int | float (values checked)
    separators: Dict[str, str] = field(default_factory=dict)  # multi-valued text column -> separator
    undeclared: str = "guess"  # a column without a role: guess | drop | error

    @property
    def text(self) -> bool:
        """True for delimited text, False for Parquet."""
        return bool(self.delimiter)

    @property
    def title(self) -> str:
        """The format's name in messages (Criteo, Avazu, CSV, TSV, Parquet)."""
        return _TITLES[self.format]

    def with_separators(self, separators: Dict[str, str]) -> "InputSchema":
        """This schema with more multi-valued columns (their separators)."""
        return replace(self, separators={**self.separators, **separators}) if separators else self

    def header_names(self, path: Path, first_line: str) -> Tuple[str, ...]:
        """The column names of a text file: its header line, or the declared `columns`."""
        if not self.header:
            return self.columns
        dialect = dict(delimiter=self.delimiter, quoting=csv.QUOTE_MINIMAL if self.quote else csv.QUOTE_NONE)
        names = tuple(next(csv.reader([first_line.lstrip("\ufeff")], **dialect), []))  # a BOM, as pyarrow skips it
        if len(set(names)) != len(names):
            raise ValueError(f"{path} line 1: duplicate column names in the header")
        return names

    def layout(self, path: Path, names: Sequence[str], arrow: Optional[pa.Schema] = None) -> Schema:
        """The canonical fields of a file with columns `names` (Parquet: its Arrow schema), in file order."""
        if self.label not in names:
            if not self.text:
                raise ValueError(f"{path}: Parquet file has no {self.label!r} column (the label; see data.label)")
            if self.header:
                raise ValueError(f"{path} line 1: {self.title} header has no {self.label!r} column "
                                 f"(the label; see data.label), got {list(names)[:8]}")
            raise ValueError(f"{path}: data.columns has no label column {self.label!r}")
        for key, declared in (("types", self.types), ("sparse", self._named("sparse")),
                              ("dense", self._named("dense"))):
            missing = [n for n in declared if n not in names]
            if missing:
                raise ValueError(f"{path}: data.{key} names {missing[0]!r}, not a column of this file")
        if self.label in self.roles:
            raise ValueError(f"{path}: column {self.label!r} is the label; remove it from data.{self.roles[self.label]}")
        if self.label in self.types:
            raise ValueError(f"{path}: column {self.label!r} is the label (checked by data.label_map); "
                             f"remove it from data.types")
        dense, sparse, multi = [], [], []
        for name in names:
            if name == self.label:
                continue
            ftype = arrow.field(name).type if arrow is not None else None
            role, is_list = self._role(path, name, ftype)
            if role == "drop":
                continue
            if name == LABEL:
                raise ValueError(f"{path}: column {LABEL!r} is not the label (data.label is {self.label!r}); "
                                 f"list it in data.drop")
            if role == "dense":
                if is_list or self.types.get(name) == "string":
                    why = "a list column" if is_list else "declared string in data.types"
                    raise ValueError(f"{path}: column {name!r} is dense but {why}; dense values are numbers")
                dense.append(name)
            else:
                sparse.append(name)
                if is_list or name in self.separators:
                    multi.append(name)
        self._check_separators(path, arrow, sparse)
        return Schema(tuple(dense), tuple(sparse), tuple(multi))

    def _named(self, role: str) -> Tuple[str, ...]:
        return tuple(n for n, r in self.roles.items() if r == role)

    def _role(self, path: Path, name: str, ftype: Optional[pa.DataType]) -> Tuple[str, bool]:
        """(dense | sparse | drop, whether the Parquet column is a list) of one column."""
        is_list = ftype is not None and _is_list(ftype)
        value_type = ftype.value_type if is_list else ftype
        if value_type is not None and not (_is_text(value_type) or pa.types.is_integer(value_type)
                                           or pa.types.is_floating(value_type)):
            if self.roles.get(name) == "drop" or (name not in self.roles and self.undeclared == "drop"):
                return "drop", is_list
            raise ValueError(f"{path}: column {name!r} has type {ftype}, expected numbers (dense), strings or "
                             f"integers (sparse) or a list of them (multi-valued)")
        role = self.roles.get(name) or ("sparse" if name in self.separators else None)
        if role is not None:
            return role, is_list
        if self.undeclared == "error":
            raise ValueError(f"{path}: column {name!r} has no declared role (list it in data.dense, data.sparse "
                             f"or data.drop, or set data.undeclared)")
        if self.undeclared == "drop":
            return "drop", is_list
        if value_type is not None and pa.types.is_floating(value_type):
            if is_list:
                raise ValueError(f"{path}: column {name!r} is a list of floats; declare it in data.sparse "
                                 f"(multi-valued categorical) or data.drop")
            return "dense", False
        return "sparse", is_list

    def _check_separators(self, path: Path, arrow: Optional[pa.Schema], sparse: Sequence[str]) -> None:
        """Every multi-valued column is a categorical column of the file, and not a list already."""
        for name in self.separators:
            if name not in sparse:
                raise ValueError(f"{path}: data.multi_valued names {name!r}, not a categorical column of this file")
            if arrow is not None and _is_list(arrow.field(name).type):
                raise ValueError(f"{path}: column {name!r} is already a list; remove it from data.multi_valued")


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


PRESETS: Dict[str, InputSchema] = {
    "criteo_tsv": InputSchema("criteo_tsv", delimiter="\t", quote=False, header=False,
                              columns=(LABEL, *CRITEO_DENSE, *CRITEO_SPARSE),
                              roles={**dict.fromkeys(CRITEO_DENSE, "dense"), **dict.fromkeys(CRITEO_SPARSE, "sparse")}),
    "avazu_csv": InputSchema("avazu_csv", delimiter=",", label="click", roles={"id": "drop"}),
    "csv": InputSchema("csv", delimiter=","),
    "tsv": InputSchema("tsv", delimiter="\t", quote=False),
    "parquet": InputSchema("parquet"),
}


def preset(name: str) -> InputSchema:
    """The built-in schema of a format name."""
    if name not in PRESETS:
        raise ValueError(f"unknown data format {name!r} ({', '.join(PRESETS)})")
    return PRESETS[name]


def input_schema(cfg: DataConfig, fmt: str) -> InputSchema:
    """The schema `cfg` declares: the preset of format `fmt` (cfg.format; synthetic data is read as parquet)
    with the `data.*` keys laid over it."""
    base = preset(fmt)
    roles = dict(base.roles)
    for role in COLUMN_ROLES:
        roles.update(dict.fromkeys(getattr(cfg, role), role))
    return replace(base, delimiter=cfg.delimiter or base.delimiter,
                   header=base.header if cfg.header is None else cfg.header,
                   columns=tuple(cfg.columns) or base.columns, label=cfg.label or base.label, roles=roles,
                   types={**base.types, **cfg.types}, separators={**base.separators, **cfg.multi_valued},
                   undeclared=cfg.undeclared)
