"""The export manifest: what a compact export holds, checked before anything is loaded from it.

`manifest.json` is written last into the export directory; it lists the tables (rows, dim, the
dtype each is stored and served in, kept columns, the full table they came from), the features and
which tables feed each (the group layout), for PME the token groups (remap and projection files),
the head that consumes them, every other file with its size and sha256, and the versions that
wrote it. A reader refuses a newer `format_version`, a table dtype that is not a serving dtype or
cannot hold its dim, a missing or changed file, and (when a table is read) a table whose shape
disagrees, each with an error that names the file (and the table).

Format versions: 3 lists in a token-group remap only the id ranges that have rows, runs of rows
merged (`FieldGroups.id_ranges`); 2 lets the tables of one export differ in dtype (the dims file's
per-table choice, each table served in its own); in 1 every table had the export's one dtype. The
fields are the same, so older manifests read as they are (a version-2 remap is normalised before it
is checked, `export/groups.py`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import DataType, PoolingType

from sharded_mde.export.tablefile import check_dim
from sharded_mde.io import atomic_write_json, read_json, sha256_file

FORMAT_VERSION = 3  # 3: remaps list kept ranges only; 2: tables may differ in dtype; 1 and 2 read unchanged
MANIFEST = "manifest.json"


@dataclass
class ExportedTable:
    """One compact table: its file, shape and dtype, and the columns of the full table it keeps."""

    name: str
    features: List[str]
    rows: int
    dim: int
    dtype: str
    file: str
    source_table: str
    full_dim: int
    kept_columns: List[int]
    pooling: str = "SUM"

    def config(self, data_type: DataType = DataType.FP32) -> EmbeddingBagConfig:
        """The TorchRec table config of this table, with weights of `data_type`."""
        return EmbeddingBagConfig(name=self.name, num_embeddings=self.rows, embedding_dim=self.dim,
                                  feature_names=list(self.features), pooling=PoolingType[self.pooling],
                                  data_type=data_type)


@dataclass
class ExportedFeature:
    """One sparse feature: its pooled width, the tables (token groups) that feed it, its vocabulary file."""

    name: str
    dim: int
    tables: List[str]
    vocabulary: Optional[str] = None


@dataclass
class ExportedTokenGroups:
    """PME token groups: each field's groups (`FieldGroups` as a mapping), the remap and projection files, the combine mode.

    The remap file holds, per field, the id ranges that route a (renumbered) vocabulary id to its
    group table and row; the projections file the weights of the group projections.
    """

    combine: str
    fields: List[Dict[str, Any]]
    remap_file: str
    projections_file: str

    def files(self) -> List[str]:
        """The files this section names."""
        return [self.remap_file, self.projections_file]


@dataclass
class HeadSpec:
    """The dense model around the tables: `modules.heads.build_head` arguments plus its weights file."""

    kind: str
    dense_in_features: int
    dense_arch: List[int]
    over_arch: List[int]
    dcn_layers: int
    dcn_rank: int
    weights_file: str
    full_width: str = "project"  # model.full_width; left out of the JSON when "project" (exports before it)


@dataclass
class Manifest:
    """Everything a reader needs to rebuild the serving model from the export directory alone."""

    tables: List[ExportedTable]
    features: List[ExportedFeature]
    head: HeadSpec
    files: Dict[str, Dict[str, Any]]  # relative path -> {"bytes", "sha256"}
    source: Dict[str, Any]
    writer: Dict[str, str]
    format_version: int = FORMAT_VERSION
    extra: Dict[str, Any] = field(default_factory=dict)
    token_groups: Optional[ExportedTokenGroups] = None  # PME exports only

    def table_bytes(self) -> int:
        """Bytes of the table files on disk."""
        return sum(self.files[t.file]["bytes"] for t in self.tables)


def writer_versions() -> Dict[str, str]:
    """Versions of the packages that shape the export (sharded_mde, torch, torchrec, fbgemm_gpu, pyarrow)."""
    import fbgemm_gpu
    import pyarrow
    import torch
    import torchrec

    import sharded_mde

    out = {"sharded_mde": sharded_mde.__version__, "torch": torch.__version__, "pyarrow": pyarrow.__version__}
    for name, module in (("torchrec", torchrec), ("fbgemm_gpu", fbgemm_gpu)):
        version = getattr(module, "__version__", None)
        if version is None:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                version = "unknown"
        out[name] = str(version)
    return out


def file_entry(root: Path, rel: str) -> Dict[str, Any]:
    """Size and sha256 of `root/rel`, as recorded in the manifest."""
    p = root / rel
    return {"bytes": p.stat().st_size, "sha256": sha256_file(p)}


def vocabulary_digest(sha256_by_feature: Dict[str, str]) -> str:
    """One digest of a data set's vocabularies, from each feature's vocabulary file sha256.

    Stored as `source.vocab_digest`; serve-check recomputes it from the data it scores, so an export
    is never scored on data whose ids mean other tokens (re-prepared or other data).
    """
    text = "\n".join(f"{f}:{sha256_by_feature[f]}" for f in sorted(sha256_by_feature))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def manifest_vocabulary_digest(manifest: Manifest) -> Optional[str]:
    """The digest of the vocabularies shipped in an export (None when it ships none)."""
    shipped = {f.name: manifest.files[f.vocabulary]["sha256"] for f in manifest.features if f.vocabulary}
    return vocabulary_digest(shipped) if shipped else None


def write_manifest(root: Path, manifest: Manifest) -> None:
    """Writes `root/manifest.json` atomically (the last file of an export); `token_groups` only when present."""
    data = asdict(manifest)
    if data["token_groups"] is None:
        del data["token_groups"]
    if data["head"]["full_width"] == "project":
        del data["head"]["full_width"]
    atomic_write_json(root / MANIFEST, {"format_version": data.pop("format_version"), **data})


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _build(cls: Any, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object")
    try:
        return cls(**raw)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def read_manifest(root: Path) -> Manifest:
    """Parses `root/manifest.json`; a missing manifest, a newer format or a malformed entry is a ValueError."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: export manifest not found (not an export, or an export that did not finish)")
    raw = read_json(path, "export manifest")
    if not isinstance(raw, dict) or not isinstance(raw.get("format_version"), int):
        raise ValueError(f"{path}: missing integer format_version")
    version = raw["format_version"]
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: written with export format_version {version}, newer than this reader's "
                         f"{FORMAT_VERSION} (by sharded_mde {raw.get('writer', {}).get('sharded_mde', '?')}); "
                         "upgrade sharded_mde to read it")
    try:
        tables = [_build(ExportedTable, t, f"{path}: tables[{i}]") for i, t in enumerate(raw["tables"])]
        features = [_build(ExportedFeature, f, f"{path}: features[{i}]") for i, f in enumerate(raw["features"])]
        head = _build(HeadSpec, raw["head"], f"{path}: head")
        groups = _build(ExportedTokenGroups, raw["token_groups"], f"{path}: token_groups") if "token_groups" in raw else None
        rest = {k: raw[k] for k in ("files", "source", "writer")}
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e.args[0]!r}") from None
    unknown = sorted(set(raw) - {"format_version", "tables", "features", "head", "files", "source", "writer", "extra",
                                 "token_groups"})
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}")
    if not isinstance(rest["files"], dict):
        raise ValueError(f"{path}: files: expected an object of path -> {{bytes, sha256}}")
    for rel, entry in rest["files"].items():
        if not (isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and entry["bytes"] >= 0
                and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            raise ValueError(f"{path}: files[{rel!r}]: needs a byte count and a 64-digit hex sha256")
    for t in tables:
        try:
            check_dim(t.dim, t.dtype, t.name)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if t.file not in rest["files"]:
            raise ValueError(f"{path}: table {t.name}: file {t.file} has no checksum entry")
    if head.weights_file not in rest["files"]:
        raise ValueError(f"{path}: head weights file {head.weights_file} has no checksum entry")
    for rel in groups.files() if groups else []:
        if rel not in rest["files"]:
            raise ValueError(f"{path}: token groups file {rel} has no checksum entry")
    return Manifest(tables=tables, features=features, head=head, format_version=version,
                    extra=raw.get("extra", {}), token_groups=groups, **rest)


def verify_files(root: Path, manifest: Manifest) -> None:
    """Checks every listed file exists with its recorded size and sha256; raises ValueError naming the file."""
    manifest_path = Path(root) / MANIFEST
    for rel, entry in manifest.files.items():
        p = Path(root) / rel
        if not p.is_file():
            raise ValueError(f"{p}: listed in {manifest_path} but missing")
        if p.stat().st_size != entry["bytes"] or sha256_file(p) != entry["sha256"]:
            # Either file may have changed: the message names both.
            raise ValueError(f"{p}: checksum mismatch with its entry in {manifest_path} (changed since export: "
                             f"expected {entry['bytes']} bytes, sha256 {entry['sha256'][:12]}...)")
