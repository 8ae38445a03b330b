"""`sharded-mde bench speed`: the costs and savings of the search and of the compact model, side by side in one run.

Every figure is a median over repeats and reported as a ratio to its reference, measured in the
same process on the same batches:
- training step, HAM-masked supernet (the mask step included) / plain full model: the search overhead;
- training step, compact / full model (the compact model of `--dims`, default the uniform dims at
  `search.budget`);
- serving examples/s, compact / full export at fp32 and int8 (the models just stepped, exported,
  or the exports given);
- with CUDA: FBGEMM TBE forward and forward+backward time, compact / full table set, at batch
  16384, with the device name and the bytes ratio; without CUDA that part is reported as skipped;
- training step, `MixedDimDLRM` / stock `torchrec.models.dlrm.DLRM` with every table at the same dim
  (each of `--stock-dims`), for both `model.full_width` modes: "project" (a learned Linear(D -> D)
  per field, the cost of the per-field projections) and "identity" (fields at D pass through, as in
  the reference MD-embeddings code: the head's own overhead over stock DLRM).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch

from sharded_mde.bench.common import save_results
from sharded_mde.config import RunConfig
from sharded_mde.train.distributed import DistEnv

SERVING_DTYPES = ("fp32", "int8")


def _batches(data_dir: str, cfg: RunConfig, env: DistEnv, count: int) -> List[Batch]:
    """The first `count` training batches of this rank's share, on the device (read before any timing)."""
    from sharded_mde.data import iterate_batches

    out = []
    for b in iterate_batches(data_dir, "train", cfg.train.batch_size, env.rank, env.world_size, seed=cfg.train.seed):
        out.append(b.to(env.device))
        if len(out) == count:
            break
    if not out:
        raise ValueError(f"{data_dir}: the train split has no full batch of {cfg.train.batch_size} rows per rank")
    return out


def compact_dims_file(cfg: RunConfig, out_dir: Path, env: DistEnv, dims_path: Optional[str | Path]) -> Path:
    """`dims_path`, or the uniform dims at `search.budget` written to `out_dir/uniform_dims.json`."""
    if dims_path:
        return Path(dims_path)
    from sharded_mde.dims import save_dims
    from sharded_mde.plan.tables import full_table_configs
    from sharded_mde.search.uniform import uniform_dims

    path = out_dir / "uniform_dims.json"
    if env.is_main:
        save_dims(path, uniform_dims(full_table_configs(cfg), cfg.search.budget, cfg.train.embedding_optimizer))
    if env.world_size > 1:
        dist.barrier()
    return path


def parse_stock_dims(text: str) -> List[int]:
    """`--stock-dims` ("16,128"; "" for none) as positive ints; anything else is a one-line ValueError."""
    try:
        dims = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--stock-dims {text!r}: comma-separated positive integers expected") from None
    if any(d < 1 for d in dims):
        raise ValueError(f"--stock-dims {text!r}: every dim must be at least 1")
    return dims


def stock_dlrm_steps(cfg: RunConfig, env: DistEnv, batches: List[Batch], repeats: int,
                     dims: Sequence[int]) -> Dict[str, Any]:
    """Step time of MixedDimDLRM / stock TorchRec DLRM, every table at `dim`, on the same batches, for each dim.

    Three models step in turn on the same batches: stock DLRM, MixedDimDLRM with `full_width:
    project` ("mixed": the keys `mixed_median_step_ms`, `ratio`, ... as before) and with `full_width:
    identity` (under "identity": `identity_median_step_ms`, `ratio`, ...), both ratios to the same
    stock steps. All get the config's dense and over arch with the dense arch's last layer set to
    `dim` (stock DLRM needs it equal to the tables' dim; MixedDimDLRM projects to it).
    """
    import dataclasses

    from torchrec import EmbeddingBagCollection
    from torchrec.models.dlrm import DLRM

    from sharded_mde.bench.steps import interleaved_step_times, ratio_summary, training_step
    from sharded_mde.data import DatasetMeta
    from sharded_mde.modules.model import RecTrain, build_model
    from sharded_mde.plan.tables import full_table_configs

    meta = DatasetMeta.load(cfg.data.dir)
    n_dense = len(meta.dense_features)
    out: Dict[str, Any] = {}
    for dim in dims:
        tables = [dataclasses.replace(t, embedding_dim=dim) for t in full_table_configs(cfg)]
        model_cfg = dataclasses.replace(cfg.model, head="dlrm", dense_arch=[*cfg.model.dense_arch[:-1], dim])
        models = {}
        for name, full_width in (("mixed", "project"), ("identity", "identity")):
            torch.manual_seed(cfg.train.seed)
            models[name] = build_model(dataclasses.replace(model_cfg, full_width=full_width), tables,
                                       meta.sparse_features, n_dense)
        torch.manual_seed(cfg.train.seed)
        models["stock"] = RecTrain(DLRM(EmbeddingBagCollection(tables=tables, device=torch.device("meta")), n_dense,
                                        list(model_cfg.dense_arch), list(model_cfg.over_arch)))
        step_fns = {name: training_step(cfg, env, model, tables)[1] for name, model in models.items()}
        times = interleaved_step_times(step_fns, {name: batches for name in models}, repeats, env.device)
        out[str(dim)] = {"dense_arch": list(model_cfg.dense_arch), "over_arch": list(model_cfg.over_arch),
                         **ratio_summary(times, "mixed", "stock"), "identity": ratio_summary(times, "identity", "stock")}
    return out


def run_speed(cfg: RunConfig, env: DistEnv, out: str | Path, dims_path: Optional[str | Path] = None, repeats: int = 5,
              steps: int = 10, full_export: Optional[str] = None, compact_export: Optional[str] = None,
              tbe_batch: int = 16384, stock_dims: Sequence[int] = (16, 128)) -> Dict[str, Any]:
    """Measures every ratio on every rank (serving and TBE on rank 0) and saves the results JSON at `out`."""
    import dataclasses

    from sharded_mde.bench.steps import interleaved_step_times, ratio_summary, training_step
    from sharded_mde.data import DatasetMeta
    from sharded_mde.export.stage import device_name
    from sharded_mde.modules.model import build_model
    from sharded_mde.dims import load_dims
    from sharded_mde.plan.tables import full_table_configs
    from sharded_mde.search.ham import build_supernet
    from sharded_mde.search.registry import compact_builder
    from sharded_mde.train.checkpoint import MODEL, save_checkpoint

    work = Path(cfg.run_dir) / "bench_speed"
    meta = DatasetMeta.load(cfg.data.dir)
    full = full_table_configs(cfg)
    dims_file = compact_dims_file(cfg, work, env, dims_path)
    dims = load_dims(dims_file, full)
    scratch = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, retrain_warm_start=False))
    n_dense = len(meta.dense_features)
    torch.manual_seed(cfg.train.seed)
    models = {"plain": (build_model(cfg.model, full, meta.sparse_features, n_dense), full, False),
              "masked": (build_supernet(cfg, full, meta.sparse_features, n_dense), full, True)}
    compact, compact_tables, _ = compact_builder(dims.method, dims_file)(scratch, dims, full, meta)
    models["compact"] = (compact, compact_tables, False)
    dmps, step_fns = {}, {}
    for name, (model, tables, masked) in models.items():
        dmps[name], step_fns[name] = training_step(cfg, env, model, tables, masked)
    batches = _batches(cfg.data.dir, cfg, env, steps)
    compact_batches = _batches(dims.data_dir or cfg.data.dir, cfg, env, steps)  # PME renumbers ids
    times = interleaved_step_times(step_fns, {"plain": batches, "masked": batches, "compact": compact_batches},
                                   repeats, env.device)
    load_before = os.getloadavg()
    results: Dict[str, Any] = {
        "config": {"run_dir": cfg.run_dir, "data_dir": cfg.data.dir, "batch_size_per_rank": cfg.train.batch_size,
                   "world_size": env.world_size, "sharding": cfg.train.sharding, "head": cfg.model.head,
                   "dims_file": str(dims_file), "dims_method": dims.method, "repeats": repeats, "steps": len(batches),
                   "threads": torch.get_num_threads()},
        "device": device_name(env.device),
        "bytes_ratio": dims.kept_bytes / dims.full_bytes,
        "search_overhead": ratio_summary(times, "masked", "plain"),
        "train_step": ratio_summary(times, "compact", "plain"),
        "stock_dlrm": stock_dlrm_steps(cfg, env, batches, repeats, stock_dims),
    }
    # Other work on the machine slows every variant alike (they step in turn), but a loaded machine's
    # absolute times and small ratios are noisier: the 1, 5, 15 minute load averages around the timing.
    results["load_average"] = {"before": list(load_before), "after": list(os.getloadavg())}
    exports = {"compact": compact_export, "full": full_export}
    for name, model_name in (("compact", "compact"), ("full", "plain")):
        if not exports[name]:  # export the model just stepped (sharded checkpoint, then the export stage)
            save_checkpoint(work / name / "checkpoints", 0, {MODEL: dmps[model_name].state_dict()}, {})
    if env.is_main:
        results["serving"] = _serving(cfg, work, exports, dims_file, repeats)
        results["tbe"] = _tbe(cfg, full, compact_tables, tbe_batch, repeats)
    if env.world_size > 1:
        dist.barrier()
    return save_results(out, "speed", results) if env.is_main else {"results": results}


def _serving(cfg: RunConfig, work: Path, exports: Dict[str, Optional[str]], dims_file: Path,
             repeats: int) -> Dict[str, Any]:
    """Examples/s of the compact and the full export at fp32 and int8, TorchScript, on the test split."""
    from sharded_mde.bench.serving import bench_dtype
    from sharded_mde.export.stage import device_name, export_stage, load_requests

    roots: Dict[str, Path] = {}
    for name, given in exports.items():
        if given:
            roots[name] = Path(given)
        else:
            roots[name] = work / name / "export"
            export_stage(cfg, work / name / "checkpoints", roots[name], dims_file if name == "compact" else None,
                         overwrite=True, progress=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    requests = load_requests(cfg.data.dir, "test", cfg.export.serve_batch_size, device)
    out: Dict[str, Any] = {"device": device_name(device), "batch_size": cfg.export.serve_batch_size, "scripted": True,
                           "exports": {n: str(p) for n, p in roots.items()}, "dtypes": {}}
    for dtype in SERVING_DTYPES:
        out["dtypes"][dtype] = bench_dtype(roots, dtype, requests, device, repeats, cfg.export.row_alignment, True)
    return out


def _tbe(cfg: RunConfig, full: List[Any], compact: List[Any], batch: int, repeats: int) -> Dict[str, Any]:
    """FBGEMM TBE times of the full and compact table sets on CUDA; on CPU, skipped (no figures)."""
    if not torch.cuda.is_available():
        return {"status": "skipped", "reason": "no CUDA device: the TBE timing runs on a GPU only"}
    from sharded_mde.bench.tbe import tbe_times

    device = torch.device("cuda", torch.cuda.current_device())
    out = tbe_times({"full": full, "compact": compact}, batch, device, repeats, cfg.train.embedding_optimizer,
                    cfg.train.embedding_lr)
    out.update(status="measured", device=torch.cuda.get_device_name(device),
               bytes_ratio=out["compact"]["bytes"] / out["full"]["bytes"],
               forward_ratio=out["compact"]["forward_ms"] / out["full"]["forward_ms"],
               forward_backward_ratio=out["compact"]["forward_backward_ms"] / out["full"]["forward_backward_ms"])
    return out


def print_speed(doc: Dict[str, Any]) -> None:
    """One line per comparison: the ratio of medians, the two medians, and the bytes ratio."""
    r = doc["results"]
    print(f"device: {r['device']}; compact/full embedding bytes {r['bytes_ratio']:.3f}")
    so, ts = r["search_overhead"], r["train_step"]
    print(f"search overhead: masked/plain step {so['ratio']:.3f} ({so['masked_median_step_ms']:.2f} / "
          f"{so['plain_median_step_ms']:.2f} ms, step-by-step median {so['stepwise_ratio_median']:.3f}, "
          f"mean step times {so['mean_ratio']:.3f})")
    print(f"train step: compact/full {ts['ratio']:.3f} ({ts['compact_median_step_ms']:.2f} / "
          f"{ts['plain_median_step_ms']:.2f} ms, step-by-step median {ts['stepwise_ratio_median']:.3f})")
    for dim, st in r["stock_dlrm"].items():
        ident = st["identity"]
        print(f"train step at dim {dim}: MixedDimDLRM/stock DLRM, full_width project {st['ratio']:.3f} "
              f"({st['mixed_median_step_ms']:.2f} / {st['stock_median_step_ms']:.2f} ms, step-by-step median "
              f"{st['stepwise_ratio_median']:.3f}), identity {ident['ratio']:.3f} ({ident['identity_median_step_ms']:.2f} / "
              f"{ident['stock_median_step_ms']:.2f} ms, step-by-step median {ident['stepwise_ratio_median']:.3f})")
    for dtype, s in r["serving"]["dtypes"].items():
        print(f"serving {dtype}: compact/full examples/s {s['ratio_median']:.3f} "
              f"({s['compact']['examples_per_s_median']:,.0f} / {s['full']['examples_per_s_median']:,.0f}), "
              f"table bytes {s['bytes_ratio']:.3f}")
    t = r["tbe"]
    if t["status"] == "skipped":
        print(f"tbe: skipped ({t['reason']})")
    else:
        print(f"tbe on {t['device']}, batch {t['batch']}: compact/full forward {t['forward_ratio']:.3f} "
              f"({t['compact']['forward_ms']:.3f} / {t['full']['forward_ms']:.3f} ms), forward+backward "
              f"{t['forward_backward_ratio']:.3f}, bytes {t['bytes_ratio']:.3f}")
