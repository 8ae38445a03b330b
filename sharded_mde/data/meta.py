"""`meta.json` of a processed data directory: fields, table sizes, split rows and part files.

It is written last by `prepare`, so its presence (with a matching fingerprint) marks a complete
directory; every consumer (batches, models, serving) reads the data set's shape from it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Tuple, Union

from sharded_mde.io import atomic_write_json, read_json

FORMAT_VERSION = 2  # 2: vocabularies from the train split only, labels validated, multi-valued fields
READABLE_VERSIONS = (1, 2)  # older directories still load (their consumers keep working); prepare rebuilds them
META_FILE = "meta.json"


@dataclass
class DatasetMeta:
    """What a processed data directory holds; `num_embeddings` counts the reserved ids 0 and 1."""

    dense_features: List[str]
    sparse_features: List[str]
    num_embeddings: Dict[str, int]
    rows: Dict[str, int]
    skipped_lines: int = 0
    source: List[str] = field(default_factory=list)
    fingerprint: str = ""
    parts: Dict[str, List[Tuple[str, int]]] = field(default_factory=dict)  # split -> [(relative path, rows)]
    config: Dict[str, Any] = field(default_factory=dict)
    multi_valued: List[str] = field(default_factory=list)  # sparse fields whose rows hold bags of ids
    mean_bag_length: Dict[str, float] = field(default_factory=dict)  # per sparse field, train split (1.0: single-valued)
    format_version: int = FORMAT_VERSION
    dir: str = ""  # where it was loaded from (not saved)

    @classmethod
    def load(cls, data_dir: Union[str, Path]) -> "DatasetMeta":
        """Reads `<data_dir>/meta.json`; a missing or foreign file is a one-line ValueError."""
        path = Path(data_dir) / META_FILE
        if not path.exists():
            raise ValueError(f"{path}: not found; {data_dir} is not a prepared data directory "
                             f"(run `sharded-mde data prepare CONFIG`)")
        raw = read_json(path, "data set metadata")
        if not isinstance(raw, dict) or raw.get("format_version") not in READABLE_VERSIONS:
            raise ValueError(f"{path}: format_version {raw.get('format_version') if isinstance(raw, dict) else None}"
                             f" is not one of {READABLE_VERSIONS}; prepare the data again")
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__ and k != "dir"}
        try:
            meta = cls(**known)
        except TypeError as e:
            raise ValueError(f"{path}: incomplete data set metadata ({e})") from None
        meta.parts = {s: [(str(p), int(n)) for p, n in v] for s, v in meta.parts.items()}
        meta.mean_bag_length = {f: float(meta.mean_bag_length.get(f, 1.0)) for f in meta.sparse_features}
        meta.dir = str(data_dir)
        return meta

    def save(self, data_dir: Union[str, Path]) -> None:
        """Writes meta.json atomically (the last write of `prepare`)."""
        out = asdict(self)
        out.pop("dir")
        atomic_write_json(Path(data_dir) / META_FILE, out)

    def split_parts(self, split: str) -> List[Tuple[Path, int]]:
        """(absolute path, rows) of each Parquet part of `split`, in order."""
        if split not in self.rows:
            raise ValueError(f"{self.dir}: unknown split {split!r} (have {sorted(self.rows)})")
        return [(Path(self.dir) / p, n) for p, n in self.parts.get(split, [])]
