"""`sharded-mde export` (checkpoint -> compact export) and `sharded-mde serve-check` (score an export)."""

from __future__ import annotations

import argparse
import json

from sharded_mde.train.cli import add_config_args, load_args_config


def _export(args: argparse.Namespace) -> int:
    from sharded_mde.export.load import dtype_label, served_dtypes, serving_bytes
    from sharded_mde.export.stage import export_bytes, export_stage, serving_bytes_by_dtype

    cfg = load_args_config(args)
    manifest = export_stage(cfg, args.checkpoint, args.out, args.dims, overwrite=args.force)
    raw = sum(t.rows * t.dim for t in manifest.tables)
    stored = served_dtypes(manifest)
    print(json.dumps({
        "out": args.out,
        "checkpoint": manifest.source["checkpoint"],
        "tables": {t.name: [t.rows, t.dim] for t in manifest.tables},
        "dropped_tables": manifest.source["dropped_tables"],
        "dtype": dtype_label(stored),
        "dtypes": stored,
        "elements": raw,
        "bytes": export_bytes(args.out, manifest),
        "serving_bytes": serving_bytes_by_dtype(manifest, cfg.export.row_alignment),
        "serving_bytes_as_stored": serving_bytes(manifest, None, cfg.export.row_alignment),
    }, indent=2))
    return 0


def _serve_check(args: argparse.Namespace) -> int:
    import torch

    from sharded_mde.export.stage import serve_check

    cfg = load_args_config(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = serve_check(cfg, args.export, args.dtype, device, max_batches=args.max_batches,
                         scripted=not args.eager, verify=not args.no_verify)
    print(json.dumps(result, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="compact tables + manifest from a (sharded) checkpoint, for serving")
    add_config_args(p)
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint step directory, or a directory holding step_* (the newest finished one is used)")
    p.add_argument("--out", required=True, help="export directory to create")
    p.add_argument("--dims", help="dims file of the search, when the checkpoint is the (masked) supernet")
    p.add_argument("--force", action="store_true", help="replace an existing export at --out")
    p.set_defaults(func=_export)

    p = sub.add_parser("serve-check", help="score the test split from an export alone: AUC, logloss, bytes, examples/s")
    add_config_args(p)
    p.add_argument("--export", required=True, help="export directory")
    p.add_argument("--dtype", choices=["fp32", "fp16", "int8", "int4"],
                   help="one serving dtype for every table (default: export.serve_dtype, else each table as stored)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-batches", type=int, default=0, help="score only this many batches (0 = all)")
    p.add_argument("--eager", action="store_true", help="run the eager module instead of the TorchScript one")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the export's files")
    p.set_defaults(func=_serve_check)
