"""Small Arrow IPC files of an export (dense weights, the PME remap): written atomically, read with errors naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping

import pyarrow as pa
import torch

from sharded_mde.io import atomic_path


def write_arrow(path: Path, table: pa.Table) -> None:
    """Writes `table` as one Arrow IPC file at `path` (atomically)."""
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)


def read_arrow(path: Path, what: str, columns: List[str]) -> pa.Table:
    """The Arrow IPC file at `path`, which must have exactly `columns`; ValueError naming the file otherwise."""
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable {what} ({e})") from None
    if table.column_names != columns:
        raise ValueError(f"{path}: columns are {table.column_names}, expected {', '.join(columns)}")
    return table


def write_weights(path: Path, weights: Mapping[str, torch.Tensor]) -> None:
    """Dense weights as an Arrow file: one row per tensor (name, shape, float32 values)."""
    for name, t in weights.items():
        if not t.is_floating_point():
            raise ValueError(f"{path}: weight {name}: dtype {t.dtype} is not a float")
    write_arrow(path, pa.table({
        "name": pa.array(list(weights), type=pa.string()),
        "shape": pa.array([list(t.shape) for t in weights.values()], type=pa.list_(pa.int64())),
        "values": pa.array([t.float().flatten().numpy() for t in weights.values()], type=pa.large_list(pa.float32())),
    }))


def read_weights(path: Path) -> Dict[str, torch.Tensor]:
    """The dense weights Arrow file written by `write_weights` (name, shape, values per row)."""
    table = read_arrow(path, "weights file", ["name", "shape", "values"])
    out = {}
    for name, shape, values in zip(*(table.column(c).to_pylist() for c in ("name", "shape", "values"))):
        t = torch.tensor(values, dtype=torch.float32)
        if t.numel() != torch.Size(shape).numel():
            raise ValueError(f"{path}: weight {name} has {t.numel()} values for shape {shape}")
        out[name] = t.view(shape)
    return out
