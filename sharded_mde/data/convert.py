"""`data convert`: raw Criteo/Avazu text -> canonical Parquet shards (the fast input format, no vocabulary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence

from tqdm import tqdm

from sharded_mde.data.parts import PART_ROWS, PartWriter
from sharded_mde.data.readers import SourceReader
from sharded_mde.io import atomic_write_json

SUMMARY_FILE = "convert.json"


def convert(fmt: str, paths: Sequence[str], out: Path, strict: bool = False, part_rows: int = PART_ROWS,
            progress: bool = True) -> Dict[str, Any]:
    """Streams `paths` into `out/part-*.parquet` (label, raw dense floats, raw sparse strings);
    writes convert.json last and returns it. Use the directory as `format: parquet` input."""
    reader = SourceReader(fmt, paths, strict=strict)
    out = Path(out)
    (out / SUMMARY_FILE).unlink(missing_ok=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()
    writer = PartWriter(out, part_rows=part_rows)
    with tqdm(desc=f"convert {fmt}", unit=" rows", disable=not progress) as bar:
        for table in reader:
            writer.add(table)
            bar.update(table.num_rows)
    parts = writer.close()
    summary = {"format": fmt, "source": [str(p.resolve()) for p in reader.files], "rows": sum(n for _, n in parts),
               "skipped_lines": reader.skipped, "dense_features": list(reader.schema.dense),
               "sparse_features": list(reader.schema.sparse), "parts": parts}
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary
