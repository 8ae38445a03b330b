"""The export stage from a run config: `export` a checkpoint, and `serve-check` an export on the test split.

Shared by the command line and the pipeline: these functions read the run's data description
(features, vocabularies, test split) and the config's `export` section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from sharded_mde.bench import machine_info
from sharded_mde.config import RunConfig
from sharded_mde.export.export import export_compact
from sharded_mde.export.load import dtype_label, load_export, served_dtypes, serving_bytes, serving_bytes_by_table
from sharded_mde.export.manifest import MANIFEST, Manifest, read_manifest, vocabulary_digest
from sharded_mde.export.serve import Request, score, script
from sharded_mde.io import sha256_file
from sharded_mde.dims import SERVING_DTYPES, legal_serving_dim, load_dims
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.train.metrics import classification_metrics


def export_stage(cfg: RunConfig, checkpoint: str | Path, out: str | Path, dims_path: Optional[str | Path] = None,
                 overwrite: bool = False, progress: bool = True) -> Manifest:
    """Exports `checkpoint` (a step directory, or a directory of them) of this run to `out`.

    A dims file that names its own data (PME's renumbered copy) gives the vocabularies to ship.
    """
    from sharded_mde.data import DatasetMeta

    meta = DatasetMeta.load(cfg.data.dir)
    full = full_table_configs(cfg)
    dims = load_dims(dims_path, full) if dims_path else None
    data_dir = (dims.data_dir if dims else None) or cfg.data.dir
    return export_compact(checkpoint, out, cfg.model, meta.sparse_features, len(meta.dense_features), full, dims=dims,
                          export_cfg=cfg.export, data_dir=data_dir, overwrite=overwrite, progress=progress)


def load_requests(data_dir: str | Path, split: str, batch_size: int, device: torch.device,
                  max_batches: int = 0) -> List[Request]:
    """The batches of `split` as serving requests on `device` (read before any timing starts)."""
    from sharded_mde.data import iterate_eval_batches

    out = []
    for batch, n_valid in iterate_eval_batches(data_dir, split, batch_size, 0, 1, max_batches=max_batches):
        b = batch.to(device)
        out.append((b.dense_features, b.sparse_features, b.labels, int(n_valid)))
    if not out:
        raise ValueError(f"{data_dir}: split {split!r} has no rows")
    return out


def device_name(device: torch.device) -> str:
    """The accelerator's name, or the CPU model and the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{machine_info()['cpu']} ({torch.get_num_threads()} threads)"


def export_bytes(root: str | Path, manifest: Manifest) -> Dict[str, int]:
    """Bytes on disk of an export: tables, head weights, vocabularies, manifest, and PME's remap and projections."""
    root = Path(root)
    vocab = sum(e["bytes"] for rel, e in manifest.files.items() if rel.startswith("vocab/"))
    groups = manifest.token_groups
    return {"tables": manifest.table_bytes(), "head": manifest.files[manifest.head.weights_file]["bytes"],
            "vocab": vocab, "manifest": (root / MANIFEST).stat().st_size,
            "remap": manifest.files[groups.remap_file]["bytes"] if groups else 0,
            "projections": manifest.files[groups.projections_file]["bytes"] if groups else 0}


def serving_bytes_by_dtype(manifest: Manifest, row_alignment: int) -> Dict[str, int]:
    """`serving_bytes` of an export for each one dtype all its tables can be served as (the planner report shows
    the same figures): a dtype every dim is legal for, and the dtype of every int8/int4 table (their rows are
    not converted back to floats), so a float export has every legal dtype and one with int8 and int4 none."""
    fused = {t.dtype for t in manifest.tables} - {"fp32", "fp16"}
    dtypes = [d for d in SERVING_DTYPES if fused <= {d} and all(legal_serving_dim(t.dim, d) for t in manifest.tables)]
    return {d: serving_bytes(manifest, d, row_alignment) for d in dtypes}


def data_vocabulary_digest(data_dir: Path, features: List[str]) -> str:
    """`vocabulary_digest` of the vocabulary files of `features` in a processed data directory."""
    from sharded_mde.data.vocab import vocab_path

    missing = [f for f in features if not vocab_path(data_dir, f).is_file()]
    if missing:
        raise ValueError(f"{vocab_path(data_dir, missing[0])}: vocabulary not found (is {data_dir} prepared data?)")
    return vocabulary_digest({f: sha256_file(vocab_path(data_dir, f)) for f in features})


def serving_data_dir(cfg: RunConfig, export_dir: str | Path, manifest: Manifest) -> Path:
    """The data to score an export on, checked against the vocabularies it was made with (one-line errors)."""
    copy = manifest.source.get("data_dir") if manifest.token_groups is not None else None
    data_dir = Path(copy or cfg.data.dir)
    if not data_dir.is_dir():
        hint = "rerun the search that wrote this PME copy" if copy else "set data.dir to where the prepared data is"
        raise ValueError(f"{data_dir}: data directory to score {export_dir} not found ({hint})")
    expected = manifest.source.get("vocab_digest")
    if expected:
        shipped = [f.name for f in manifest.features if f.vocabulary]
        found = data_vocabulary_digest(data_dir, shipped)
        if found != expected:
            raise ValueError(f"{data_dir}: vocabularies (digest {found}) differ from those {export_dir} was exported "
                             f"with (digest {expected}): the data was re-prepared or is other data; export again "
                             "from a model trained on this data, or point data.dir at the original")
    return data_dir


def serve_check(cfg: RunConfig, export_dir: str | Path, dtype: Optional[str] = None,
                device: torch.device = torch.device("cpu"), max_batches: int = 0, scripted: bool = True,
                verify: bool = True) -> Dict[str, Any]:
    """Scores the test split from the export alone: AUC, log loss, bytes and examples/s of the served model.

    Each table is served in the dtype the manifest records for it (`dtypes`; `dtype` "mixed" when they
    differ), or all in `dtype` / `export.serve_dtype` when set; `serving_table_bytes` (with the token
    groups' remap and projections) and `serving_bytes_by_table` are the serving byte model's figures.

    The test split is read from the config's `data.dir` (PME: the search's renumbered copy, which the
    export names), after checking that its vocabularies are the ones the export was made with.
    """
    manifest = read_manifest(Path(export_dir))
    data_dir = serving_data_dir(cfg, export_dir, manifest)
    dtype = dtype or cfg.export.serve_dtype or None
    dtypes = served_dtypes(manifest, dtype)
    model = load_export(export_dir, dtype, cfg.export.row_alignment, device, verify=verify)
    run = script(model) if scripted else model
    requests = load_requests(data_dir, "test", cfg.export.serve_batch_size, device, max_batches)
    score(run, requests[:1], device)  # warm-up
    logits, labels, seconds = score(run, requests, device)
    return {
        **classification_metrics(logits, labels),
        "dtype": dtype_label(dtypes),
        "dtypes": dtypes,
        "row_alignment": cfg.export.row_alignment,
        "serving_table_bytes": serving_bytes(manifest, dtype, cfg.export.row_alignment),
        "serving_bytes_by_table": serving_bytes_by_table(manifest, dtype, cfg.export.row_alignment),
        "serving_bytes_by_dtype": serving_bytes_by_dtype(manifest, cfg.export.row_alignment),
        "export_bytes": export_bytes(export_dir, manifest),
        "data_dir": str(data_dir),
        "examples_per_s": labels.numel() / max(seconds, 1e-9),
        "batch_size": cfg.export.serve_batch_size,
        "scripted": scripted,
        "device": device_name(device),
    }
