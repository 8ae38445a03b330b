"""`data convert`: raw text or Parquet of a declared schema -> canonical Parquet shards (the fast input format, no
vocabulary): `label`, dense float32, sparse strings (multi-valued: list<string>), types checked and normalised."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Union

from tqdm import tqdm

from sharded_mde.data.parts import PART_ROWS, PartWriter
from sharded_mde.data.readers import SourceReader
from sharded_mde.data.schema import InputSchema
from sharded_mde.io import atomic_write_json

SUMMARY_FILE = "convert.json"


def convert(source: Union[str, InputSchema], paths: Sequence[str], out: Path, strict: bool = False,
            part_rows: int = PART_ROWS, progress: bool = True) -> Dict[str, Any]:
    """Streams `paths` (read by `source`: a format name or a declared `InputSchema`) into
    `out/part-*.parquet`; writes convert.json last and returns it. Use the directory as `format: parquet` input."""
    reader = SourceReader(source, paths, strict=strict)
    out = Path(out)
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()
    writer = PartWriter(out, part_rows=part_rows)
    with tqdm(desc=f"convert {reader.fmt}", unit=" rows", disable=not progress) as bar:
        for table in reader:
            writer.add(table)
            bar.update(table.num_rows)
    parts = writer.close()
    summary = {"format": reader.fmt, "source": [str(p.resolve()) for p in reader.files], "rows": sum(n for _, n in parts),
               "skipped_lines": reader.skipped, "dense_features": list(reader.schema.dense),
               "sparse_features": list(reader.schema.sparse), "multi_valued": list(reader.schema.multi), "parts": parts}
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary
