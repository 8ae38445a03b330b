"""`sharded-mde bench quality|lr|speed CONFIG` (one process or torchrun)."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from sharded_mde.config import RunConfig
from sharded_mde.dims.methods import SEARCH_METHODS
from sharded_mde.train.cli import add_config_args, load_args_config
from sharded_mde.train.launch import run_with_data
from sharded_mde.train.distributed import DistEnv


def _quality(args: argparse.Namespace) -> int:
    from sharded_mde.bench.quality import BENCH_DIR, check_bench_methods, copy_results, parse_budgets, run_quality

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    budgets = parse_budgets(args.budgets)
    check_bench_methods(methods)  # before the process group, the data or any training
    if args.seeds < 1 or args.jobs < 1:
        raise ValueError(f"--seeds {args.seeds} --jobs {args.jobs}: both must be at least 1")

    def body(cfg: RunConfig, env: DistEnv) -> int:
        doc = run_quality(cfg, env, methods, budgets, args.seeds, args.jobs)
        if env.is_main:
            out = Path(cfg.run_dir) / BENCH_DIR
            if args.out:
                copy_results(doc, args.out)
            print((out / "results.md").read_text(), flush=True)
            print(json.dumps({"results": str(out / "results.json"), "table": str(out / "results.md"),
                              "png": str(out / "auc_vs_bytes.png"), "copied_to": args.out}, indent=2))
        return 0

    return run_with_data(load_args_config(args), body)


def _lr(args: argparse.Namespace) -> int:
    from sharded_mde.bench.lr_sweep import SWEEP_DIR, parse_lrs, run_lr_sweep, write_sweep

    embedding_lrs, dense_lrs = parse_lrs(args.embedding_lr, "--embedding-lr"), parse_lrs(args.dense_lr, "--dense-lr")
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: must be at least 1")

    def body(cfg: RunConfig, env: DistEnv) -> int:
        doc = run_lr_sweep(cfg, env, embedding_lrs, dense_lrs, args.seeds)
        if env.is_main:
            doc["command"] = shlex.join(["sharded-mde", "bench", "lr", args.config, "--embedding-lr", args.embedding_lr,
                                         "--dense-lr", args.dense_lr, "--seeds", str(args.seeds),
                                         *(x for o in args.overrides for x in ("--set", o))])
            out = Path(args.out) if args.out else Path(cfg.run_dir) / SWEEP_DIR / "lr_sweep.md"
            write_sweep(doc, out)
            print(out.read_text(), flush=True)
            print(json.dumps({"table": str(out), "json": str(out.with_suffix(".json")), "best": doc["best"]}, indent=2))
        return 0

    return run_with_data(load_args_config(args), body)


def _speed(args: argparse.Namespace) -> int:
    from sharded_mde.bench.speed import parse_stock_dims, print_speed, run_speed

    if min(args.repeats, args.steps, args.tbe_batch) < 1:
        raise ValueError("--repeats, --steps and --tbe-batch must be at least 1")
    stock_dims = parse_stock_dims(args.stock_dims)

    def body(cfg: RunConfig, env: DistEnv) -> int:
        out = Path(args.out) if args.out else Path(cfg.run_dir) / "bench_speed.json"
        doc = run_speed(cfg, env, out, dims_path=args.dims, repeats=args.repeats, steps=args.steps,
                        full_export=args.full_export, compact_export=args.compact_export, tbe_batch=args.tbe_batch,
                        stock_dims=stock_dims)
        if env.is_main:
            print_speed(doc)
            print(json.dumps({"saved": str(out), "machine": doc["machine"]}, indent=2))
        return 0

    return run_with_data(load_args_config(args), body)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmarks: search quality over methods x budgets x seeds, the full model's learning rates, speed ratios")
    bench = p.add_subparsers(dest="bench_command", required=True)
    q = bench.add_parser("quality", help="every method at every budget on the same data, over seeds (resumable)")
    add_config_args(q)
    q.add_argument("--budgets", default="0.1,0.25,0.5", help="byte budgets, fractions of the full model, comma-separated")
    q.add_argument("--seeds", type=int, default=5,
                   help="train.seed 0..N-1 (baseline, search and retrain each); paired intervals need >= 2")
    q.add_argument("--methods", default=",".join(SEARCH_METHODS),
                   help="search methods (search.method values, and ham_front: HAM's front, one search for every "
                   "budget), comma-separated")
    q.add_argument("--jobs", type=int, default=1,
                   help="seeds trained at once in processes of their own (one process launch only; e.g. 2 on 2 cores)")
    q.add_argument("--out", help="also write the markdown table to this file, the JSON and PNG next to it (.json, .png)")
    q.set_defaults(func=_quality)
    lr = bench.add_parser("lr", help="the full model's learning rates: a grid scored on the validation split (resumable)")
    add_config_args(lr)
    lr.add_argument("--embedding-lr", default="0.01,0.05,0.2", help="train.embedding_lr values, comma-separated")
    lr.add_argument("--dense-lr", default="0.0003,0.001,0.003", help="train.dense_lr values, comma-separated")
    lr.add_argument("--seeds", type=int, default=1, help="train.seed 0..N-1 per grid point (validation AUC averaged)")
    lr.add_argument("--out", help="markdown table (JSON next to it, .json); default RUN_DIR/lr_sweep/lr_sweep.md")
    lr.set_defaults(func=_lr)
    s = bench.add_parser("speed", help="step time plain vs masked vs compact, serving full vs compact, TBE on CUDA")
    add_config_args(s)
    s.add_argument("--dims", help="dims file of the compact model (default: the uniform dims at search.budget)")
    s.add_argument("--repeats", type=int, default=5, help="timed rounds (training) / passes (serving)")
    s.add_argument("--steps", type=int, default=10, help="training batches per round")
    s.add_argument("--full-export", help="export of the full model to serve (default: one of a fresh model)")
    s.add_argument("--compact-export", help="export of the compact model to serve (default: one of a fresh model)")
    s.add_argument("--tbe-batch", type=int, default=16384, help="batch size of the FBGEMM TBE timing (CUDA only)")
    s.add_argument("--stock-dims", default="16,128",
                   help="dims at which MixedDimDLRM is timed against stock TorchRec DLRM, comma-separated ('' for none)")
    s.add_argument("--out", help="results JSON (default: RUN_DIR/bench_speed.json)")
    s.set_defaults(func=_speed)
