"""`sharded-mde bench quality`: every search method at every byte budget on the same data and splits, over seeds.

Per seed (`train.seed`), in `<run_dir>/bench_quality/seed<S>/`: the full-dimension baseline, then
for each method x budget a search (stage `<method>_b<budget>`) and the retrain of its dims file
(stage `retrain_<method>_b<budget>`). Each finished stage is recorded in that directory's
`stages.json` (the pipeline's ledger), so a rerun skips finished cells and resumes an interrupted
one from its checkpoints. The results (one record per seed x method x budget, and the baseline
per seed), a markdown table of means and standard deviations over seeds, and a PNG of test AUC
against kept bytes with the Pareto front are written to `<run_dir>/bench_quality/`.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from sharded_mde.config import RunConfig
from sharded_mde.io import atomic_write_json, atomic_write_text, read_json
from sharded_mde.pipeline.ledger import StageLedger
from sharded_mde.pipeline.run import StageFn, run_pipeline
from sharded_mde.plan.dims import InfeasibleBudget
from sharded_mde.plots import pyplot, save_png
from sharded_mde.train.distributed import DistEnv

DEFAULT_METHODS = ("ham", "uniform", "power_law", "magnitude", "saliency", "pme")
BENCH_DIR = "bench_quality"


def parse_budgets(text: str) -> List[float]:
    """`"0.1,0.25"` -> [0.1, 0.25]; every budget a fraction in (0, 1]."""
    try:
        budgets = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--budgets {text!r}: expected comma-separated fractions, e.g. 0.1,0.25,0.5") from None
    bad = [b for b in budgets if not 0 < b <= 1]
    if not budgets or bad:
        raise ValueError(f"--budgets {text!r}: every budget must be a fraction in (0, 1]")
    return budgets


def check_methods(methods: Sequence[str]) -> None:
    """Raises one error naming the first method that no search provides (before any work starts)."""
    from sharded_mde.search.cli import SEARCHES

    for m in methods:
        if m not in SEARCHES:
            raise ValueError(f"search method {m!r} is not available (known: {', '.join(SEARCHES)})")


def cell_stage(method: str, budget: float) -> str:
    """The search stage directory of one cell; its retrain stage is `retrain_` + this."""
    return f"{method}_b{budget:g}"


def seed_config(cfg: RunConfig, seed: int) -> RunConfig:
    """The run config of one seed: `train.seed` set, stages under `<run_dir>/bench_quality/seed<S>/`."""
    return dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir) / BENCH_DIR / f"seed{seed}"),
                               train=dataclasses.replace(cfg.train, seed=seed))


def _baseline(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
    from sharded_mde.plan.tables import full_table_configs
    from sharded_mde.search.budget import full_bytes
    from sharded_mde.train.run import train_stage

    _, m = train_stage(cfg, env, "baseline")
    return {"test": m["test"], "train_seconds": m["train_seconds"],
            "full_bytes": full_bytes(full_table_configs(cfg), "fp32", cfg.train.embedding_optimizer)}


def _cell_stages(method: str, budget: float) -> List[Tuple[str, StageFn, bool]]:
    """The (search, retrain) stages of one cell, for `run_pipeline`."""
    stage = cell_stage(method, budget)

    def search(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
        from sharded_mde.search.cli import run_search

        cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, method=method, budget=budget))
        try:
            dims = run_search(cfg, env, stage)
        except InfeasibleBudget as e:  # a result of the comparison (recorded, not retrained), not a failure
            return {"infeasible": str(e)}
        return {"dims_file": str(Path(cfg.run_dir) / stage / "dims.json"), "method": dims.method,
                "full_bytes": dims.full_bytes, "budget_bytes": dims.budget_bytes, "kept_bytes": dims.kept_bytes}

    def retrain(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
        from sharded_mde.search.retrain import run_retrain

        if "infeasible" in ledger.stages[stage]["outputs"]:
            return {"infeasible": ledger.stages[stage]["outputs"]["infeasible"]}
        s = run_retrain(cfg, env, ledger.stages[stage]["outputs"]["dims_file"], f"retrain_{stage}")
        return {"test": s["test"], "init": s["init"], "train_seconds": s["train_seconds"]}

    return [(stage, search, True), (f"retrain_{stage}", retrain, True)]


def run_quality(cfg: RunConfig, env: DistEnv, methods: Sequence[str], budgets: Sequence[float],
                seeds: int) -> Optional[Dict[str, Any]]:
    """Runs every missing cell on every rank; rank 0 writes and returns the results (None elsewhere)."""
    check_methods(methods)
    cells = [(s, m, b) for s in range(seeds) for m in [None, *methods] for b in ([None] if m is None else budgets)]
    stages: Dict[int, Dict[str, Any]] = {}
    for seed, method, budget in tqdm(cells, desc="bench quality", unit="cell", disable=not env.is_main):
        todo = [("baseline", _baseline, True)] if method is None else _cell_stages(method, budget)
        try:
            stages[seed] = run_pipeline(seed_config(cfg, seed), env, todo)
        except ValueError as e:  # name the cell (the finished ones stay recorded: fix and rerun)
            cell = "baseline" if method is None else f"{method} at budget {budget:g}"
            raise ValueError(f"seed {seed}, {cell}: {e}") from e
    if not env.is_main:
        return None
    doc = collect_results(stages, methods, budgets)
    out = Path(cfg.run_dir) / BENCH_DIR
    atomic_write_json(out / "results.json", doc)
    atomic_write_text(out / "results.md", results_markdown(doc))
    plot_quality(doc, out / "auc_vs_bytes.png")
    return doc


def collect_results(stages: Dict[int, Dict[str, Any]], methods: Sequence[str], budgets: Sequence[float]) -> Dict[str, Any]:
    """{"baselines": one per seed, "records": one per seed x method x budget} from the seeds' ledgers."""
    baselines, records, infeasible = [], [], {}
    for seed, done in sorted(stages.items()):
        b = done["baseline"]
        baselines.append({"seed": seed, "test_auc": b["outputs"]["test"]["auc"],
                          "test_logloss": b["outputs"]["test"]["logloss"], "bytes": b["outputs"]["full_bytes"],
                          "train_seconds": b["seconds"]})
        for method in methods:
            for budget in budgets:
                stage = cell_stage(method, budget)
                s, r = done[stage], done[f"retrain_{stage}"]
                if "infeasible" in s["outputs"]:
                    infeasible[f"{method} at {budget:g}"] = s["outputs"]["infeasible"]
                    continue
                records.append({
                    "seed": seed, "method": method, "budget": budget, "test_auc": r["outputs"]["test"]["auc"],
                    "test_logloss": r["outputs"]["test"]["logloss"], "kept_bytes": s["outputs"]["kept_bytes"],
                    "kept_fraction": s["outputs"]["kept_bytes"] / s["outputs"]["full_bytes"],
                    "budget_bytes": s["outputs"]["budget_bytes"], "search_seconds": s["seconds"],
                    "retrain_seconds": r["seconds"], "retrain_init": r["outputs"]["init"],
                    "dims_file": s["outputs"]["dims_file"], **planted_score(s["outputs"]["dims_file"])})
    return {"methods": list(methods), "budgets": list(budgets), "seeds": len(stages), "baselines": baselines,
            "records": records, "infeasible": infeasible, "summary": summarize(baselines, records)}


def planted_score(dims_file: str) -> Dict[str, Any]:
    """On planted data: the Spearman correlation of the kept dims with the planted ranks, and the
    widest field planted at rank 0 (from the dims file's `planted` record; {} where it has none)."""
    planted = read_json(dims_file, "dims file").get("extra", {}).get("planted")
    if not planted or planted.get("spearman") is None or math.isnan(planted["spearman"]):
        return {}
    return {"planted_spearman": planted["spearman"], "rank0_max_dim": max(planted["rank0_dims"].values(), default=0)}


def _mean_std(values: Sequence[float]) -> Dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(baselines: Sequence[Dict[str, Any]], records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and standard deviation over seeds per row: the full model first, then each method x budget."""
    keys = ("test_auc", "test_logloss", "bytes", "search_seconds", "retrain_seconds")
    rows = [{"method": "full", "budget": 1.0, "seeds": len(baselines),
             **{k: _mean_std([b[k] for b in baselines]) for k in ("test_auc", "test_logloss", "bytes")},
             "search_seconds": None, "retrain_seconds": _mean_std([b["train_seconds"] for b in baselines])}]
    groups: Dict[Tuple[str, float], List[Dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["budget"]), []).append({**r, "bytes": r["kept_bytes"]})
    for (method, budget), rs in groups.items():
        rows.append({"method": method, "budget": budget, "seeds": len(rs),
                     **{k: _mean_std([r[k] for r in rs]) for k in keys}})
        if all("planted_spearman" in r for r in rs):
            rows[-1]["planted_spearman"] = _mean_std([r["planted_spearman"] for r in rs])
            rows[-1]["rank0_max_dim"] = max(r["rank0_max_dim"] for r in rs)
    return rows


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the (bytes, auc) points that no other point beats (fewer or equal bytes, higher AUC)."""
    front, best = [], float("-inf")
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _pm(s: Optional[Dict[str, float]], fmt: str) -> str:
    return "-" if s is None else f"{s['mean']:{fmt}} ± {s['std']:{fmt}}"


def results_markdown(doc: Dict[str, Any]) -> str:
    """The results table: one row for the full model, then one per method x budget (mean ± std over seeds)."""
    full = doc["summary"][0]["bytes"]["mean"]
    planted = any("planted_spearman" in r for r in doc["summary"])
    head = "| method | budget | bytes | of full | test AUC | test logloss | search s | retrain s |"
    lines = [f"Test AUC and logloss over {doc['seeds']} seed(s); bytes are embedding weights + optimizer state.",
             "", head + (" Spearman dims vs planted ranks | widest rank-0 field |" if planted else ""),
             "|---" * (head.count("|") - 1 + 2 * planted) + "|"]
    for r in doc["summary"]:
        row = (f"| {r['method']} | {r['budget']:g} | {r['bytes']['mean']:,.0f} | {r['bytes']['mean'] / full:.3f} | "
               f"{_pm(r['test_auc'], '.4f')} | {_pm(r['test_logloss'], '.4f')} | "
               f"{_pm(r['search_seconds'], '.1f')} | {_pm(r['retrain_seconds'], '.1f')} |")
        if planted:
            row += f" {_pm(r.get('planted_spearman'), '.2f')} | {r.get('rank0_max_dim', '-')} |"
        lines.append(row)
    lines.append("")
    lines.append("The full model's retrain column is its (baseline) training time.")
    if planted:
        lines.append("On planted data: the Spearman correlation of each field's kept dim with its planted rank "
                     "(mean ± std over seeds), and the most columns any field planted at rank 0 kept (over seeds).")
    for cell, why in doc.get("infeasible", {}).items():
        lines.append(f"- Not feasible: {cell}: {why}.")
    return "\n".join(lines) + "\n"


def plot_quality(doc: Dict[str, Any], path: str | Path) -> None:
    """PNG: mean test AUC against mean bytes per method (std error bars), the full model, the Pareto front."""
    plt = pyplot()

    rows = doc["summary"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in ["full", *doc["methods"]]:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["bytes"]["mean"])
        ax.errorbar([r["bytes"]["mean"] / 2**20 for r in rs], [r["test_auc"]["mean"] for r in rs],
                    xerr=[r["bytes"]["std"] / 2**20 for r in rs], yerr=[r["test_auc"]["std"] for r in rs],
                    marker="*" if method == "full" else "o", ms=10 if method == "full" else 5, capsize=3,
                    label=method)
    pts = [(r["bytes"]["mean"], r["test_auc"]["mean"]) for r in rows]
    front = [pts[i] for i in pareto_front(pts)]
    ax.plot([b / 2**20 for b, _ in front], [a for _, a in front], "k--", lw=1, zorder=0)
    ax.scatter([b / 2**20 for b, _ in front], [a for _, a in front], s=140, facecolors="none", edgecolors="k",
               label="Pareto front")
    ax.set_xlabel("embedding bytes (MiB, weights + optimizer state)")
    ax.set_ylabel("test AUC")
    ax.set_title(f"test AUC vs bytes (mean ± std over {doc['seeds']} seed(s))", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_png(fig, path)


def copy_results(doc: Dict[str, Any], out_md: str | Path) -> None:
    """Writes the markdown table to `out_md`, the results JSON and the AUC-vs-bytes PNG next to it
    (same name, .json and .png)."""
    out_md = Path(out_md)
    atomic_write_text(out_md, results_markdown(doc))
    atomic_write_json(out_md.with_suffix(".json"), doc)
    plot_quality(doc, out_md.with_suffix(".png"))
