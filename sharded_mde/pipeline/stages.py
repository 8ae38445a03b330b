"""The stages of `sharded-mde run`, each a thin call into the library API of its pipeline stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

from sharded_mde.config import RunConfig
from sharded_mde.pipeline.ledger import StageLedger
from sharded_mde.pipeline.run import StageFn
from sharded_mde.train.distributed import DistEnv


def stage_data(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
    from sharded_mde.data import prepare

    meta = prepare(cfg.data)
    return {"data_dir": cfg.data.dir, "rows": dict(meta.rows), "fields": len(meta.sparse_features)}


def stage_baseline(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
    from sharded_mde.train.run import train_stage

    _, m = train_stage(cfg, env, "baseline")
    return {"test": m["test"], "train_seconds": m["train_seconds"], "examples_per_s": m["examples_per_s"]}


def stage_search(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
    import dataclasses
    import time

    from sharded_mde.search.run import run_search

    t0 = time.perf_counter()
    dims = run_search(cfg, env)
    out = {"dims_file": str(Path(cfg.run_dir) / cfg.search.method / "dims.json"), "method": dims.method,
           "full_bytes": dims.full_bytes, "budget_bytes": dims.budget_bytes, "kept_bytes": dims.kept_bytes,
           "search_seconds": time.perf_counter() - t0, "dims": {t.name: t.dim for t in dims.tables}}
    if "serving" in dims.extra:  # serving-byte methods (dims, precision, joint, joint_pme): the budget's arithmetic
        out["serving"] = dims.extra["serving"]
    if dims.method == "pme":  # token-wise sizes: tokens per size of every field; planted data: size vs capacity
        tokens = dims.pme.tokens
        out["token_sizes"] = {f: v["tokens_per_size"] for f, v in tokens.items()}
        caps = [v["spearman_capacity"] for v in tokens.values() if v.get("spearman_capacity") is not None]
        if caps:
            out["planted"] = {"spearman_capacity_mean": sum(caps) / len(caps)}
    elif dims.planted is not None:
        out["planted"] = dataclasses.asdict(dims.planted)
    return out


def _dims_file(ledger: StageLedger) -> str:
    return ledger.stages["search"]["outputs"]["dims_file"]


def stage_plan(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
    from sharded_mde.plan.run import plan_and_report
    from sharded_mde.dims import load_dims
    from sharded_mde.plan.tables import full_table_configs

    dims_path = _dims_file(ledger)
    out = Path(cfg.run_dir) / "plan"
    rep = plan_and_report(cfg, load_dims(dims_path, full_table_configs(cfg)), dims_path, out)
    return {"report": str(out / "report.md"), "png": str(out / "report.png"), "totals": rep["totals"],
            "plan_file": str(out / "sharding_plan.json")}


def stage_retrain(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
    from sharded_mde.search.retrain import run_retrain

    s = run_retrain(cfg, env, _dims_file(ledger), stage="retrain")
    out = {"test": s["test"], "kept_bytes": s["kept_bytes"], "init": s["init"], "train_seconds": s["train_seconds"]}
    if cfg.search.front:
        out["front"] = retrain_front(cfg, env, out)
    return out


def retrain_front(cfg: RunConfig, env: DistEnv, final: Dict[str, Any]) -> List[Dict[str, Any]]:
    """HAM's front (`search.front`): every feasible point retrained (in `retrain_front_b<budget>/`; the last point
    is the run's own dims file, retrained above as `final`), with its preview; infeasible points with the reason."""
    import json

    from sharded_mde.search.ham_front import FRONT_FILE
    from sharded_mde.search.retrain import run_retrain

    front = json.loads((Path(cfg.run_dir) / cfg.search.method / FRONT_FILE).read_text())
    points = []
    for p in front["points"]:
        if p["feasible"]:
            s = final if p["budget"] == cfg.search.budget else run_retrain(
                cfg, env, p["dims_file"], stage=f"retrain_front_b{p['budget']:g}")
            p = {**p, "test": s["test"], "train_seconds": s["train_seconds"]}
        points.append(p)
    return points


def stage_export(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
    from sharded_mde.export.stage import export_stage

    out = Path(cfg.run_dir) / "export"
    manifest = export_stage(cfg, Path(cfg.run_dir) / "retrain" / "checkpoints", out, dims_path=_dims_file(ledger),
                            overwrite=True, progress=cfg.train.progress)
    return {"export_dir": str(out), "table_bytes": manifest.table_bytes()}


def stage_serve_check(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
    from sharded_mde.export.stage import serve_check

    return serve_check(cfg, ledger.stages["export"]["outputs"]["export_dir"])


def stage_summary(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
    from sharded_mde.pipeline.summary import write_summary

    return write_summary(cfg, ledger)


# The config sections each stage reads: a change reruns that stage and every stage after it.
STAGE_INPUTS: Dict[str, Tuple[str, ...]] = {
    "data": ("data",),
    "baseline": ("data", "model", "train"),
    "search": ("data", "model", "train", "search"),
    "plan": ("plan",),
    "retrain": ("data", "model", "train", "search"),
    "export": ("export",),
    "serve_check": ("export",),
    "summary": (),
}

# (name, function, collective): collective stages run on every rank, the others on rank 0.
STAGES: List[Tuple[str, StageFn, bool]] = [
    ("data", stage_data, False),
    ("baseline", stage_baseline, True),
    ("search", stage_search, True),
    ("plan", stage_plan, False),
    ("retrain", stage_retrain, True),
    ("export", stage_export, False),
    ("serve_check", stage_serve_check, False),
    ("summary", stage_summary, False),
]
