"""Compact export: from a (sharded) training checkpoint to compact table files, head weights and a manifest.

The DCP checkpoint is read in one process, one saved shard at a time. Every shard is cut to
the table's surviving columns in row blocks, multiplied by the HAM hard mask of those columns (the
mask folded into the weights) and spooled to a scratch piece; then each table is assembled from
its pieces block by block (row-wise shards are row ranges, column-wise shards column ranges) and
written in its own dtype: the dims file's choice for the table (or PME token group), else
`export.dtype`. No process ever holds a whole table. The head is rebuilt from the
checkpoint's dense weights and cut with `slice_inputs` to the same columns, so the export computes
what the hard-masked (or compact) model computed. Everything is written into a hidden temporary
directory, the manifest last, which is then renamed onto the output: an export that did not finish
never looks complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchrec import EmbeddingBagConfig
from tqdm import tqdm

from sharded_mde.config import ExportConfig, ModelConfig
from sharded_mde.data.vocab import vocab_path
from sharded_mde.io import atomic_path, fsync_dir, make_temp_dir
from sharded_mde.modules.heads import build_head, projected_fields
from sharded_mde.modules.model import feature_dims_of
from sharded_mde.modules.token_groups import combine_of, fields_from_dims
from sharded_mde.dims import DimsFile
from sharded_mde.dims.file import serving_dtypes
from sharded_mde.plan.tables import plan_tables, source_tables
from sharded_mde.train.checkpoint import CheckpointReader
from sharded_mde.train.state import GATE, SPARSE_ARCH, hard_gates, sparse_arch_prefix
from sharded_mde.export.arrowfile import write_weights
from sharded_mde.export.groups import COMBINER, write_token_groups
from sharded_mde.export.manifest import (
    ExportedFeature, ExportedTable, HeadSpec, Manifest, file_entry, manifest_vocabulary_digest, write_manifest,
    writer_versions)
from sharded_mde.export.tablefile import check_dim, write_table

HEAD_WEIGHTS = "head.arrow"


@dataclass
class _Piece:
    """Kept columns [k0, k0+m) of table rows [r0, r0+n), spooled as raw float32 rows."""

    r0: int
    n: int
    k0: int
    m: int
    path: Path


@dataclass
class _TableJob:
    """One checkpoint table: its config (checkpoint shape), the columns to keep, the folded gate, its pieces.

    `full_dim` and `source_columns` say which columns of the search's full table the export holds
    (for a retrained compact table: the dims file's kept columns, while `kept` is all of its columns).
    """

    config: EmbeddingBagConfig
    source: str
    full_dim: int
    source_columns: List[int]
    kept: torch.Tensor
    gate: Optional[torch.Tensor]
    pieces: List[_Piece] = field(default_factory=list)


# --------------------------------------------------------------------------- what to keep


def _known_configs(tables: Sequence[EmbeddingBagConfig], dims: Optional[DimsFile]) -> Dict[str, EmbeddingBagConfig]:
    """Table configs by name: the full tables, plus the compact (and PME group) tables of the dims file."""
    known = {t.name: t for t in tables}
    if dims is not None:
        known.update({t.name: t for t in plan_tables(dims, list(tables))})
    return known


def _kept_columns(name: str, rows: int, dim: int, dims: Optional[DimsFile]) -> Tuple[torch.Tensor, int, List[int]]:
    """(columns of the checkpoint table to keep, full dim, those columns in the full table).

    A supernet table keeps the dims file's kept columns; a compact table (at the kept dim) and any
    table without a dims entry keep all their columns.
    """
    if dims is None or name not in {t.name for t in dims.tables}:
        return torch.arange(dim), dim, list(range(dim))
    entry = dims.table(name)
    if rows != entry.num_embeddings:
        raise ValueError(f"table {name}: {rows} rows in the checkpoint but {entry.num_embeddings} in the dims file")
    columns = list(entry.kept_columns) if entry.dim else []
    if dim == entry.full_dim:
        return torch.tensor(columns, dtype=torch.long), dim, columns
    if dim == entry.dim:  # already compact (a retrained model)
        return torch.arange(dim), entry.full_dim, columns
    raise ValueError(f"table {name}: dim {dim} in the checkpoint is neither the dims file's full_dim "
                     f"{entry.full_dim} nor its kept dim {entry.dim}")


def _plan_jobs(
    reader: CheckpointReader,
    tables: Sequence[EmbeddingBagConfig],
    dims: Optional[DimsFile],
    gates: Optional[Mapping[str, torch.Tensor]],
) -> Dict[str, _TableJob]:
    """One job per table of the checkpoint: its shape, kept columns and folded gate."""
    known = _known_configs(tables, dims)
    sources = source_tables(list(known.values()), list(tables)) if dims is not None else {}
    jobs: Dict[str, _TableJob] = {}
    for key, name in reader.tables().items():
        if name not in known:
            raise ValueError(f"table {name} of the checkpoint is not a table of the config "
                             f"(known: {', '.join(sorted(known)[:8])}{', ...' if len(known) > 8 else ''})")
        rows, dim = reader.shape(key)
        kept, full_dim, source_columns = _kept_columns(name, rows, dim, dims)
        gate = None
        if gates is not None and name in gates:
            g = torch.as_tensor(gates[name], dtype=torch.float32)
            if g.shape != (dim,):
                raise ValueError(f"table {name}: mask has {tuple(g.shape)} entries, the table has {dim} columns")
            dropped = torch.ones(dim, dtype=torch.bool)
            dropped[kept] = False
            outside = torch.nonzero((g != 0) & dropped).flatten().tolist()
            if outside:
                warnings.warn(f"table {name}: the mask keeps columns {outside[:8]} that the dims file drops; "
                              "the export computes the supernet with those columns masked too", stacklevel=3)
            gate = g[kept]
        cfg = dataclasses.replace(known[name], num_embeddings=rows, embedding_dim=dim)
        jobs[key] = _TableJob(cfg, sources.get(name, name), full_dim, source_columns, kept, gate)
    return jobs


# --------------------------------------------------------------------------- pass 1: pieces


def _spool_shard(job: _TableJob, offsets: List[int], tensor: torch.Tensor, scratch: Path, block_rows: int) -> None:
    """Writes this shard's kept columns (gate folded) to a scratch piece, block by block."""
    r0, c0 = offsets
    n, width = tensor.shape
    inside = (job.kept >= c0) & (job.kept < c0 + width)
    if not bool(inside.any()):
        return
    positions = torch.nonzero(inside).flatten()
    k0, m = int(positions[0]), int(positions.numel())
    local = job.kept[k0:k0 + m] - c0
    gate = job.gate[k0:k0 + m] if job.gate is not None else None
    path = scratch / f"{job.config.name}.r{r0}.k{k0}.f32"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for r in range(0, n, block_rows):
            block = tensor[r:r + block_rows].index_select(1, local).float()
            if gate is not None:
                block = block * gate
            f.write(block.contiguous().numpy().tobytes())
    job.pieces.append(_Piece(r0, n, k0, m, path))


def _spool_checkpoint(reader: CheckpointReader, jobs: Dict[str, _TableJob], scratch: Path, block_rows: int,
                      progress: bool) -> None:
    """Pass 1: every saved shard of every table in turn, cut to its kept columns."""
    for key, job in tqdm(list(jobs.items()), desc="export: read shards", unit="table", disable=not progress):
        for offsets, tensor in reader.pieces(key):
            _spool_shard(job, offsets, tensor, scratch, block_rows)


# --------------------------------------------------------------------------- pass 2: assembly


def _column_ranges(job: _TableJob) -> Dict[Tuple[int, int], List[_Piece]]:
    """Pieces grouped by kept-column range; checks the ranges tile the kept columns and the rows."""
    rows, k = job.config.num_embeddings, int(job.kept.numel())
    ranges: Dict[Tuple[int, int], List[_Piece]] = {}
    for p in job.pieces:
        ranges.setdefault((p.k0, p.m), []).append(p)
    end = 0
    for (k0, m), pieces in sorted(ranges.items()):
        if k0 != end:
            raise ValueError(f"table {job.config.name}: kept columns [{end}, {k0}) are in no checkpoint shard")
        end = k0 + m
        at = 0
        for p in sorted(pieces, key=lambda p: p.r0):
            if p.r0 != at:
                raise ValueError(f"table {job.config.name}: rows [{at}, {p.r0}) of kept columns [{k0}, {end}) "
                                 "are in no checkpoint shard (or are in two)")
            at = p.r0 + p.n
        if at != rows:
            raise ValueError(f"table {job.config.name}: rows [{at}, {rows}) are in no checkpoint shard")
    if end != k:
        raise ValueError(f"table {job.config.name}: kept columns [{end}, {k}) are in no checkpoint shard")
    return ranges


def _row_blocks(job: _TableJob, block_rows: int) -> Iterator[torch.Tensor]:
    """The compact table (n, kept) in row blocks, stitched from its pieces."""
    rows, k = job.config.num_embeddings, int(job.kept.numel())
    ranges = _column_ranges(job)
    maps = {id(p): np.memmap(p.path, dtype=np.float32, mode="r", shape=(p.n, p.m))
            for pieces in ranges.values() for p in pieces if p.n}
    for r in range(0, rows, block_rows):
        stop = min(rows, r + block_rows)
        block = torch.empty(stop - r, k)
        for (k0, m), pieces in ranges.items():
            for p in pieces:
                lo, hi = max(r, p.r0), min(stop, p.r0 + p.n)
                if lo < hi:
                    block[lo - r:hi - r, k0:k0 + m] = torch.from_numpy(np.array(maps[id(p)][lo - p.r0:hi - p.r0]))
        yield block


# --------------------------------------------------------------------------- head


def _compact_head(
    model_cfg: ModelConfig,
    feature_dims: Dict[str, int],
    dense_in_features: int,
    state: Mapping[str, Any],
    prefix: str,
    kept: Mapping[str, torch.Tensor],
) -> Dict[str, torch.Tensor]:
    """The head's dense weights from the checkpoint (fields of `feature_dims` wide), inputs cut to the kept columns."""
    saved = projected_fields(k[len(prefix):] for k in state if k.startswith(prefix))
    head = build_head(model_cfg.head, nn.Module(), feature_dims, dense_in_features, list(model_cfg.dense_arch),
                      list(model_cfg.over_arch), model_cfg.dcn_layers, model_cfg.dcn_rank, model_cfg.full_width, saved)
    wanted = list(head.state_dict())
    missing = [k for k in wanted if prefix + k not in state]
    if missing:
        raise ValueError(f"head weight {prefix}{missing[0]} is not in the checkpoint (is model.head "
                         f"{model_cfg.head!r} the head it was trained with?)")
    try:
        head.load_state_dict({k: state[prefix + k] for k in wanted})
    except RuntimeError as e:
        raise ValueError(f"the checkpoint's head does not fit model config {model_cfg.head!r} "
                         f"({str(e).splitlines()[-1].strip()})") from None
    head.slice_inputs(dict(kept))
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


# --------------------------------------------------------------------------- the export


@contextlib.contextmanager
def _staging_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """A hidden directory beside `out`, renamed onto it (replacing an old export if allowed) on success."""
    if out.exists() and not overwrite:
        raise ValueError(f"{out}: already exists (remove it or pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out.parent, f".{out.name}.", ".tmp")  # the export's own mode: readable by others
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _copy_vocabulary(data_dir: Optional[Path], feature: str, root: Path) -> Optional[str]:
    """Copies the data stage's vocabulary of `feature` into the export; None when there is none."""
    src = vocab_path(data_dir, feature) if data_dir is not None else None
    if src is None or not src.is_file():
        return None
    rel = f"vocab/{feature}.parquet"
    with atomic_path(root / rel) as tmp, open(src, "rb") as fin, open(tmp, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
    return rel


def export_compact(
    checkpoint: str | Path,
    out: str | Path,
    model_cfg: ModelConfig,
    features: Sequence[str],
    dense_in_features: int,
    tables: Sequence[EmbeddingBagConfig],
    dims: Optional[DimsFile] = None,
    export_cfg: ExportConfig = ExportConfig(),
    data_dir: Optional[str | Path] = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Writes the compact export of `checkpoint` to `out` and returns its manifest.

    `tables` are the run's full tables (names, features, pooling); the checkpoint's own shapes are
    used. With `dims`, supernet tables keep the dims file's columns (dims 0: dropped). The HAM mask
    saved in the checkpoint is folded into the weights. With a PME dims file, the checkpoint is the
    token-group model: its group tables, the remap of its ids and its group projections are exported.
    The vocabularies of `data_dir` (the data stage's output, for PME the search's renumbered copy)
    are copied in, so the export serves raw values.

    Args:
        checkpoint (str | Path): a training checkpoint (directory or checkpoints root: the latest).
        out (str | Path): the export directory to write.
        model_cfg (ModelConfig): the head the checkpoint was trained with.
        features (Sequence[str]): the sparse features, in the model's order.
        dense_in_features (int): dense input width.
        tables (Sequence[EmbeddingBagConfig]): the run's full tables.
        dims (Optional[DimsFile]): the search result to compact to.
        export_cfg (ExportConfig): dtype (of tables the dims file gives none) and block size of the written tables.
        data_dir (Optional[str | Path]): where the vocabularies are.
        overwrite (bool): replace an existing export.
        progress (bool): show a progress bar.

    Example::

        manifest = export_compact("runs/demo/retrain/checkpoints", "runs/demo/export", ModelConfig(),
                                  features, dense_in_features=13, tables=tables, dims=dims)
    """
    reader = CheckpointReader(checkpoint)
    out = Path(out)
    arch = sparse_arch_prefix(reader.keys)
    state = reader.tensors([k for k in reader.keys if k not in reader.tables()])  # the dense tensors, small
    sparse_state = {k[len(arch):]: v for k, v in state.items() if k.startswith(arch)}
    fields = fields_from_dims(dims, tables) if dims is not None and any(t.groups for t in dims.tables) else None
    other = [k for k in sparse_state if not k.startswith(GATE) and not (fields is not None and k.startswith(COMBINER))]
    if other:
        raise ValueError(f"sparse arch state {arch}{other[0]} cannot be exported (only plain and HAM-masked embedding "
                         "bag collections, and token-group modules with their PME dims file, can)")
    gates = hard_gates(sparse_state, tables)
    jobs = _plan_jobs(reader, tables, dims, gates)
    dtypes = serving_dtypes(dims.tables, export_cfg.dtype) if dims is not None else {}
    dtype_of = {job.config.name: dtypes.get(job.config.name, export_cfg.dtype) for job in jobs.values()}
    for job in jobs.values():
        check_dim(int(job.kept.numel()), dtype_of[job.config.name], job.config.name)
    if fields is None:
        kept_by_feature = {f: j.kept for j in jobs.values() for f in j.config.feature_names}
        head_dims = feature_dims_of([j.config for j in jobs.values()], list(features))
    else:  # the head reads each field at its groups' common width: nothing to cut
        kept_by_feature = {}
        head_dims = {**{f: 0 for f in features}, **{g.feature: g.out_dim for g in fields}}
    inputs = {g.feature: set(g.keys()) for g in fields or []}  # the table features that feed a field
    head_weights = _compact_head(model_cfg, head_dims, dense_in_features, state, arch[: -len(SPARSE_ARCH)],
                                 kept_by_feature)

    with _staging_dir(out, overwrite) as root:
        scratch = root / ".pieces"
        scratch.mkdir()
        _spool_checkpoint(reader, jobs, scratch, export_cfg.block_rows, progress)
        del state
        exported: List[ExportedTable] = []
        for job in tqdm(list(jobs.values()), desc="export: write tables", unit="table", disable=not progress):
            k = int(job.kept.numel())
            if k == 0:
                continue  # dropped by the search: the head already reads zeros for its features
            rel = f"tables/{job.config.name}.arrow"
            write_table(root / rel, k, dtype_of[job.config.name], _row_blocks(job, export_cfg.block_rows))
            for p in job.pieces:
                p.path.unlink()
            exported.append(ExportedTable(
                name=job.config.name, features=list(job.config.feature_names), rows=job.config.num_embeddings,
                dim=k, dtype=dtype_of[job.config.name], file=rel, source_table=job.source, full_dim=job.full_dim,
                kept_columns=job.source_columns, pooling=job.config.pooling.value))
        shutil.rmtree(scratch)
        write_weights(root / HEAD_WEIGHTS, head_weights)
        groups = None
        if fields is not None:
            groups = write_token_groups(root, fields, combine_of(dims), sparse_state, [t.config() for t in exported])
        compact_dims = head_dims if fields is not None else feature_dims_of([t.config() for t in exported], list(features))
        feats = [ExportedFeature(f, compact_dims[f], [t.name for t in exported if inputs.get(f, {f}) & set(t.features)],
                                 _copy_vocabulary(Path(data_dir) if data_dir else None, f, root)) for f in features]
        listed = [t.file for t in exported] + [HEAD_WEIGHTS] + [f.vocabulary for f in feats if f.vocabulary] + \
            (groups.files() if groups else [])
        manifest = Manifest(
            tables=exported,
            features=feats,
            head=HeadSpec(model_cfg.head, dense_in_features, list(model_cfg.dense_arch), list(model_cfg.over_arch),
                          model_cfg.dcn_layers, model_cfg.dcn_rank, HEAD_WEIGHTS, model_cfg.full_width),
            files={rel: file_entry(root, rel) for rel in listed},
            source={"checkpoint": str(reader.dir.resolve()), "step": reader.info["step"],
                    "world_size": reader.info["world_size"], "dims_method": dims.method if dims else None,
                    "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
                    "masked": gates is not None,
                    "dropped_tables": [t.name for t in tables if t.name not in {e.source_table for e in exported}]},
            writer=writer_versions(),
            token_groups=groups,
        )
        manifest.source["vocab_digest"] = manifest_vocabulary_digest(manifest)  # checked by serve-check
        write_manifest(root, manifest)
    return manifest
