"""`sharded-mde data synth|convert|fetch|prepare`: the data stage's commands."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Dict, Optional

from sharded_mde.config import DATA_FORMATS, DataConfig, RunConfig, from_dict, load_config, merge, parse_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds `data` with its own subcommands."""
    p = subparsers.add_parser("data", help="synthetic data, conversion to Parquet, vocabularies and splits")
    sub = p.add_subparsers(dest="data_command", required=True)

    s = sub.add_parser("synth", help="write planted synthetic data (Criteo TSV or Parquet) and its ground truth")
    s.add_argument("config", nargs="?", help="run config whose data.synth_* settings to use")
    s.add_argument("--out", help="output file (.tsv/.parquet) or directory (default: <data.dir>/raw)")
    s.add_argument("--rows", type=int, help="rows to generate (data.synth_rows)")
    s.add_argument("--seed", type=int, help="generator seed (data.synth_seed)")
    s.add_argument("--format", choices=["tsv", "parquet"],
                   help="tsv (Criteo format; default with --out) or parquet (default into <data.dir>/raw, "
                        "where `data prepare` picks it up and removes it once the splits are written)")
    s.add_argument("--tail-capacity", action="store_true", default=None,
                   help="tail tokens carry fewer informative coordinates (data.synth_tail_capacity)")
    _common(s, config=True)
    s.set_defaults(func=_synth)

    c = sub.add_parser("convert", help="raw text (Criteo, Avazu, any CSV/TSV) or Parquet of a declared schema "
                                       "-> canonical Parquet shards (no vocabulary)")
    c.add_argument("--format", choices=[f for f in DATA_FORMATS if f != "synth"],
                   help="the format's preset schema (without --config, or overriding its data.format)")
    c.add_argument("--config", help="run config whose data section declares the input schema (and data.paths)")
    c.add_argument("--out", required=True, help="output directory for part-*.parquet")
    c.add_argument("--strict", action="store_true", help="a malformed line is an error instead of skipped")
    c.add_argument("files", nargs="*", help="input files (gzip is detected; glob patterns allowed; "
                                            "default: data.paths of --config)")
    _common(c, config=True)
    c.set_defaults(func=_convert)

    f = sub.add_parser("fetch", help="download a public data set and write it as canonical Parquet")
    f.add_argument("name", choices=["movielens-100k"],
                   help="movielens-100k: GroupLens ratings from the recbole 1.2.1 wheel (research use only, "
                        "no redistribution; docs/data.md)")
    f.add_argument("--cache", default=None, help="where the wheel is kept (default ~/.cache/sharded_mde)")
    f.add_argument("--out", default=None, help="output directory (default data/raw/movielens_100k)")
    _common(f, config=False)
    f.set_defaults(func=_fetch)

    r = sub.add_parser("prepare", help="vocabularies and train/valid/test Parquet splits in data.dir "
                                       "(under torchrun: every rank shares the work, same result)")
    r.add_argument("config", help="run config (YAML)")
    _common(r, config=True)
    r.set_defaults(func=_prepare)


def _common(p: argparse.ArgumentParser, config: bool) -> None:
    if config:
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set data.min_count=5")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def _data_config(args: argparse.Namespace, data: Optional[Dict[str, Any]] = None) -> DataConfig:
    """The data section of CONFIG with the --set overrides and then `data` laid over it (without a config:
    the defaults, overridden)."""
    overrides = merge(parse_overrides(args.overrides), {"data": data or {}})
    return load_config(args.config, overrides).data if args.config else from_dict(RunConfig, overrides).data


def _synth(args: argparse.Namespace) -> int:
    from sharded_mde.data.synth import generate, synth_paths

    if args.out is None and not args.config:
        raise ValueError("give --out FILE_OR_DIR or a CONFIG (which writes to <data.dir>/raw)")
    cfg = dataclasses.replace(_data_config(args), **{k: v for k, v in {
        "synth_rows": args.rows, "synth_seed": args.seed, "synth_tail_capacity": args.tail_capacity}.items()
        if v is not None})
    out = Path(args.out) if args.out else Path(cfg.dir) / "raw"
    fmt = args.format or ("tsv" if args.out else "parquet")
    truth = generate(cfg, out, fmt)
    data_path, truth_path = synth_paths(out, fmt)
    print(json.dumps({"data": str(data_path), "ground_truth": str(truth_path), "rows": cfg.synth_rows,
                      "teacher_test_auc": round(truth["teacher"]["test_auc"], 4),
                      "ctr": round(truth["teacher"]["ctr"], 4), "ranks": truth["ranks"]}))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from sharded_mde.data.convert import convert
    from sharded_mde.data.schema import input_schema

    if not args.config and not args.format:
        raise ValueError("give --format FORMAT or --config CONFIG (whose data section declares the schema)")
    cfg = _data_config(args, {"format": args.format} if args.format else None)
    if cfg.format == "synth":
        raise ValueError(f"{args.config}: data.format is synth; convert reads files (set data.format or --format)")
    files = args.files or cfg.paths
    if not files:
        raise ValueError("no input files: give FILES or data.paths in --config")
    summary = convert(input_schema(cfg, cfg.format), files, Path(args.out), strict=args.strict or cfg.strict)
    print(json.dumps({k: summary[k] for k in ("rows", "skipped_lines")} | {"out": args.out,
                                                                            "parts": len(summary["parts"])}))
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from sharded_mde.data import movielens

    print(json.dumps(movielens.fetch(args.cache or movielens.DEFAULT_CACHE, args.out or movielens.DEFAULT_OUT)))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    """One process, or under torchrun every rank sharing the work (the same result)."""
    import os

    from sharded_mde.data.prepare import prepare

    cfg = _data_config(args)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        meta = prepare(cfg)
    else:
        from sharded_mde.data.group import TorchGroup
        from sharded_mde.train.distributed import init_distributed, shutdown_distributed

        init_distributed(prefer_cuda=False)
        finished = False
        try:
            meta = prepare(cfg, group=TorchGroup())
            finished = True
        finally:
            shutdown_distributed(wait_for_peers=finished)
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    print(json.dumps({"dir": meta.dir, "rows": meta.rows, "skipped_lines": meta.skipped_lines,
                      "num_embeddings": meta.num_embeddings}))
    return 0
