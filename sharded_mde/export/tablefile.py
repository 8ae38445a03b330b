"""One exported table as an Arrow IPC file of fixed-width rows, written and read in row blocks.

fp32 / fp16 rows are `fixed_size_list<float>[dim]`; int8 / int4 rows are FBGEMM's fused row-wise
format (`dim * bits / 8` data bytes, then fp16 scale and bias) as `fixed_size_binary`, produced by
the same FBGEMM op TorchRec's `quantize_embeddings` uses, so quantising at export or at load gives
identical bytes. Files are uncompressed and memory-mappable, so a reader touches one block at a time.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Iterator, Tuple

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import numpy as np
import pyarrow as pa
import torch

from sharded_mde.dims import SERVING_DTYPES, legal_serving_dim, serving_dim_multiple, serving_row_bytes
from sharded_mde.io import atomic_path

DTYPES = SERVING_DTYPES
QUANT_BITS = {"int8": 8, "int4": 4}
_FLOAT = {"fp32": (pa.float32(), torch.float32), "fp16": (pa.float16(), torch.float16)}


def row_bytes(dim: int, dtype: str) -> int:
    """Bytes of one stored row, unpadded: 4 or 2 per element, or dim*bits/8 + 4 for the fused int formats."""
    return serving_row_bytes(dim, dtype, 1)


def check_dim(dim: int, dtype: str, table: str) -> None:
    """A dim FBGEMM's quantiser accepts (`dims.legal_serving_dim`), or 0 for a dropped table (no rows
    stored); raises ValueError naming the table."""
    if dtype not in DTYPES:
        raise ValueError(f"table {table}: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dim != 0 and not legal_serving_dim(dim, dtype):
        raise ValueError(f"table {table}: {dtype} needs a dim that is a multiple of {serving_dim_multiple(dtype)}, got {dim}")


def arrow_type(dim: int, dtype: str) -> pa.DataType:
    """The Arrow type of one row."""
    if dtype in _FLOAT:
        return pa.list_(_FLOAT[dtype][0], dim)
    return pa.binary(row_bytes(dim, dtype))


def encode(block: torch.Tensor, dtype: str) -> torch.Tensor:
    """float rows (n, dim) -> the stored bytes (n, row_bytes) as uint8."""
    if dtype in _FLOAT:
        return block.to(_FLOAT[dtype][1]).contiguous().view(torch.uint8)
    return torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(block.contiguous(), QUANT_BITS[dtype])


def to_float(rows: torch.Tensor, dim: int, dtype: str) -> torch.Tensor:
    """Stored float rows (uint8) -> float32 (n, dim); the fused int formats are not converted back."""
    if dtype not in _FLOAT:
        raise ValueError(f"{dtype} rows cannot be converted back to floats")
    return rows.view(_FLOAT[dtype][1]).view(-1, dim).float()


def _to_arrow(rows: torch.Tensor, dim: int, dtype: str) -> pa.Array:
    buf = pa.py_buffer(rows.contiguous().numpy())
    n = rows.shape[0]
    if dtype in _FLOAT:
        child = pa.Array.from_buffers(_FLOAT[dtype][0], n * dim, [None, buf])
        return pa.FixedSizeListArray.from_arrays(child, dim)
    return pa.Array.from_buffers(arrow_type(dim, dtype), n, [None, buf])


def write_table(path: Path, dim: int, dtype: str, blocks: Iterable[torch.Tensor]) -> int:
    """Encodes float row blocks (n, dim) into a table file at `path` (atomically); returns the rows written."""
    rows = 0
    schema = pa.schema([("row", arrow_type(dim, dtype))])
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for block in blocks:
            writer.write_batch(pa.record_batch([_to_arrow(encode(block, dtype), dim, dtype)], names=["row"]))
            rows += block.shape[0]
    return rows


def read_blocks(path: Path, rows: int, dim: int, dtype: str) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yields (first row, stored bytes (n, row_bytes) uint8) per block of a memory-mapped table file.

    Raises ValueError naming the file when its row type or row count disagrees with (rows, dim, dtype).
    """
    expected = arrow_type(dim, dtype)
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
    except FileNotFoundError:
        raise ValueError(f"{path}: table file missing") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable table file ({e})") from None
    found = reader.schema.field(0).type if reader.schema.names == ["row"] else None
    if found != expected:
        raise ValueError(f"{path}: rows are {found} but the manifest says {dim} columns of {dtype} ({expected})")
    total = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    if total != rows:
        raise ValueError(f"{path}: holds {total} rows but the manifest says {rows}")
    width = row_bytes(dim, dtype)
    start = 0
    for i in range(reader.num_record_batches):
        col = reader.get_batch(i).column(0)
        if col.null_count:
            raise ValueError(f"{path}: block {i} has null rows")
        data = (col.values if dtype in _FLOAT else col).buffers()[1]
        n = len(col)
        with warnings.catch_warnings():  # a read-only mapped buffer: readers only copy out of it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.frombuffer(data, dtype=np.uint8, count=n * width))
        yield start, raw.view(n, width)
        start += n
