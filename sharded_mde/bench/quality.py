"""`sharded-mde bench quality`: every search method at every byte budget on the same data and splits, over seeds.

Per seed (`train.seed`), in `<run_dir>/bench_quality/seed<S>/`: the full-dimension baseline, then
for each method x budget a search (stage `<method>_b<budget>`) and the retrain of its dims file
(stage `retrain_<method>_b<budget>`). Each finished stage is recorded in that directory's
`stages.json` (the pipeline's ledger), so a rerun skips finished cells and resumes an interrupted
one from its checkpoints. The results (one record per seed x method x budget, feasible or not, and
the baseline per seed), the paired differences of test AUC against uniform, power_law and the full
model on the same seeds with 95% t intervals (`sharded_mde.bench.paired`), a markdown table (method rows x
budget columns) and a PNG of test AUC against kept bytes with the Pareto front are written to
`<run_dir>/bench_quality/` (docs/bench.md).
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from tqdm import tqdm

from sharded_mde.bench.paired import mean_std, paired_difference
from sharded_mde.config import RunConfig
from sharded_mde.io import atomic_write_json, atomic_write_text
from sharded_mde.pipeline.ledger import StageLedger
from sharded_mde.pipeline.run import StageFn, run_pipeline
from sharded_mde.dims import InfeasibleBudget, load_dims
from sharded_mde.dims.methods import METHODS
from sharded_mde.plots import pyplot, save_png
from sharded_mde.search.registry import check_search_methods
from sharded_mde.train.distributed import DistEnv

BENCH_DIR = "bench_quality"
# the methods every other method is compared with, seed by seed, where run: the simple rules, and for the
# serving-byte methods dims alone and precision alone (docs/quality_precision.md)
REFERENCES = ("uniform", "power_law", "dims", "precision")
FRONT = "ham_front"  # HAM's front from one run (docs/ham.md): one search per seed gives every budget; vs `ham`


def check_bench_methods(methods: Sequence[str]) -> None:
    """One ValueError naming the first method that is neither a `search.method` nor `ham_front`."""
    check_search_methods([m for m in methods if m != FRONT])


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


def cell_stage(method: str, budget: float) -> str:
    """The search stage directory of one cell; its retrain stage is `retrain_` + this."""
    return f"{method}_b{budget:g}"


def seed_config(cfg: RunConfig, seed: int) -> RunConfig:
    """The run config of one seed: `train.seed` set, stages under `<run_dir>/bench_quality/seed<S>/`."""
    return dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir) / BENCH_DIR / f"seed{seed}"),
                               train=dataclasses.replace(cfg.train, seed=seed))


def _baseline(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
    from sharded_mde.dims import serving_bytes_of
    from sharded_mde.plan.tables import full_table_configs
    from sharded_mde.search.budget import full_bytes
    from sharded_mde.train.run import train_stage

    _, m = train_stage(cfg, env, "baseline")
    tables = full_table_configs(cfg)
    return {"test": m["test"], "train_seconds": m["train_seconds"],
            "full_bytes": full_bytes(tables, "fp32", cfg.train.embedding_optimizer),
            "full_serving_bytes": serving_bytes_of(tables, "fp32", cfg.export.row_alignment)}


def _cell_stages(method: str, budget: float) -> List[Tuple[str, StageFn, bool]]:
    """The (search, retrain) stages of one cell, for `run_pipeline`."""
    stage = cell_stage(method, budget)

    def search(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
        from sharded_mde.search.run import run_search

        cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, method=method, budget=budget))
        try:
            dims = run_search(cfg, env, stage)
        except InfeasibleBudget as e:  # a result of the comparison (recorded, not retrained), not a failure
            return {"infeasible": str(e)}
        out = {"dims_file": str(Path(cfg.run_dir) / stage / "dims.json"), "method": dims.method,
               "full_bytes": dims.full_bytes, "budget_bytes": dims.budget_bytes, "kept_bytes": dims.kept_bytes}
        if METHODS[method].budget == "serving":  # budget and bytes in serving bytes (fp32 full tables = 100%)
            serving = dims.extra["serving"]
            out.update({k: serving[k] for k in ("full_bytes", "budget_bytes", "kept_bytes")}, bytes_unit="serving",
                       dtypes=serving["dtypes"])
        return out

    def retrain(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
        from sharded_mde.search.retrain import run_retrain

        if "infeasible" in ledger.stages[stage]["outputs"]:
            return {"infeasible": ledger.stages[stage]["outputs"]["infeasible"]}
        s = run_retrain(cfg, env, ledger.stages[stage]["outputs"]["dims_file"], f"retrain_{stage}")
        return {"test": s["test"], "init": s["init"], "train_seconds": s["train_seconds"]}

    return [(stage, search, True), (f"retrain_{stage}", retrain, True)]


def _front_stages(budgets: Sequence[float]) -> List[Tuple[str, StageFn, bool]]:
    """HAM's front at every budget (one search, stage `ham_front`), then one retrain per feasible point."""
    walk = sorted(budgets, reverse=True)

    def search(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
        import json

        from sharded_mde.search.ham_front import FRONT_FILE
        from sharded_mde.search.run import run_search

        cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, method="ham", budget=walk[-1], front=walk))
        try:
            run_search(cfg, env, FRONT)
        except InfeasibleBudget:  # the smallest budget: recorded in front.json like the others
            pass
        return json.loads((Path(cfg.run_dir) / FRONT / FRONT_FILE).read_text())

    def retrain(budget: float) -> StageFn:
        def fn(cfg: RunConfig, env: DistEnv, ledger: StageLedger) -> Dict[str, Any]:
            from sharded_mde.search.retrain import run_retrain

            point = next(p for p in ledger.stages[FRONT]["outputs"]["points"] if p["budget"] == budget)
            if not point["feasible"]:
                return {"infeasible": point["reason"]}
            s = run_retrain(cfg, env, point["dims_file"], f"retrain_{cell_stage(FRONT, budget)}")
            return {"test": s["test"], "init": s["init"], "train_seconds": s["train_seconds"]}

        return fn

    return [(FRONT, search, True)] + [(f"retrain_{cell_stage(FRONT, b)}", retrain(b), True) for b in walk]


def run_seed(cfg: RunConfig, env: DistEnv, seed: int, methods: Sequence[str], budgets: Sequence[float],
             progress: bool = True) -> Dict[str, Any]:
    """Runs every missing cell of one seed (baseline first); returns that seed's ledger stages."""
    cells = [(None, None)] + [(m, b) for m in methods if m != FRONT for b in budgets] + [(m, None) for m in methods
                                                                                       if m == FRONT]
    stages: Dict[str, Any] = {}
    for method, budget in tqdm(cells, desc=f"bench quality seed {seed}", unit="cell", disable=not progress):
        todo = ([("baseline", _baseline, True)] if method is None else _front_stages(budgets) if method == FRONT
                else _cell_stages(method, budget))
        try:
            stages = run_pipeline(seed_config(cfg, seed), env, todo)
        except ValueError as e:  # name the cell (the finished ones stay recorded: fix and rerun)
            cell = "baseline" if method is None else method if budget is None else f"{method} at budget {budget:g}"
            raise ValueError(f"seed {seed}, {cell}: {e}") from e
    return stages


def _seed_worker(cfg: RunConfig, seed: int, methods: Sequence[str], budgets: Sequence[float], jobs: int) -> Dict[str, Any]:
    """One seed in a process of its own (`--jobs`): its own one-rank process group, CPU settings as the
    CLI's, and (unless OMP_NUM_THREADS says otherwise) a 1/jobs share of the cores, not all of them."""
    import torch

    from sharded_mde.train.distributed import init_distributed, shutdown_distributed, tune_cpu_process

    tune_cpu_process()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    env = init_distributed()
    try:
        return run_seed(cfg, env, seed, methods, budgets, progress=False)
    finally:
        shutdown_distributed()


def run_quality(cfg: RunConfig, env: DistEnv, methods: Sequence[str], budgets: Sequence[float],
                seeds: int, jobs: int = 1) -> Optional[Dict[str, Any]]:
    """Runs every missing cell on every rank (with `jobs` > 1 on one rank: seeds in that many processes at
    once, each seed's cells in order); rank 0 writes and returns the results (None elsewhere)."""
    check_bench_methods(methods)
    if jobs > 1:
        if env.world_size > 1:
            raise ValueError(f"--jobs {jobs}: runs seeds in parallel processes of one rank each; "
                             f"not under torchrun ({env.world_size} ranks)")
        with multiprocessing.get_context("spawn").Pool(min(jobs, seeds), maxtasksperchild=1) as pool:
            done = pool.starmap(_seed_worker, [(cfg, s, methods, budgets, jobs) for s in range(seeds)])
        stages = dict(enumerate(done))
    else:
        stages = {s: run_seed(cfg, env, s, methods, budgets, progress=env.is_main) for s in range(seeds)}
    if not env.is_main:
        return None
    doc = collect_results(stages, methods, budgets)
    out = Path(cfg.run_dir) / BENCH_DIR
    atomic_write_json(out / "results.json", doc)
    atomic_write_text(out / "results.md", results_markdown(doc))
    plot_quality(doc, out / "auc_vs_bytes.png")
    return doc


def _record(seed: int, method: str, budget: float, s: Dict[str, Any], r: Dict[str, Any]) -> Dict[str, Any]:
    """One seed x method x budget: the retrained model's test metrics and bytes, or why the budget is not feasible."""
    out = s["outputs"]
    if "infeasible" in out:
        return {"seed": seed, "method": method, "budget": budget, "feasible": False, "reason": out["infeasible"],
                "test_auc": None, "kept_fraction": None}
    return {
        "seed": seed, "method": method, "budget": budget, "feasible": True, "test_auc": r["outputs"]["test"]["auc"],
        "test_logloss": r["outputs"]["test"]["logloss"], "kept_bytes": out["kept_bytes"],
        "kept_fraction": out["kept_bytes"] / out["full_bytes"], "budget_bytes": out["budget_bytes"],
        "within_budget": out["kept_bytes"] <= out["budget_bytes"], "search_seconds": s["seconds"],
        "retrain_seconds": r["seconds"], "retrain_init": r["outputs"]["init"], "dims_file": out["dims_file"],
        **{k: out[k] for k in ("bytes_unit", "dtypes") if k in out}, **planted_score(out["dims_file"])}


def collect_results(stages: Dict[int, Dict[str, Any]], methods: Sequence[str], budgets: Sequence[float]) -> Dict[str, Any]:
    """{"baselines": one per seed, "records": one per seed x method x budget (feasible or not), "paired": the
    paired differences vs each reference method, "summary": mean ± std per row} from the seeds' ledgers."""
    baselines, records, infeasible = [], [], {}
    unit = bytes_unit(methods)
    for seed, done in sorted(stages.items()):
        b = done["baseline"]
        baselines.append({"seed": seed, "test_auc": b["outputs"]["test"]["auc"],
                          "test_logloss": b["outputs"]["test"]["logloss"],
                          "bytes": b["outputs"]["full_serving_bytes" if unit == "serving" else "full_bytes"],
                          "train_seconds": b["seconds"]})
        for method in methods:
            for budget in budgets:
                stage = cell_stage(method, budget)
                retrained = done.get(f"retrain_{stage}", {})
                records.append(_front_record(seed, budget, done[FRONT], retrained) if method == FRONT else
                               _record(seed, method, budget, done[stage], retrained))
                if not records[-1]["feasible"]:
                    infeasible[f"{method} at {budget:g}"] = records[-1]["reason"]
    doc = {"methods": list(methods), "budgets": list(budgets), "seeds": len(stages), "bytes_unit": unit,
           "baselines": baselines,
           "records": records, "infeasible": infeasible, "paired": paired_table(records, methods, budgets, baselines),
           "summary": summarize(baselines, [r for r in records if r["feasible"]])}
    if FRONT in methods and "ham" in methods:
        doc["front_time"] = front_time(records)
    return doc


def _front_record(seed: int, budget: float, front: Dict[str, Any], r: Dict[str, Any]) -> Dict[str, Any]:
    """One seed x budget of the front: as `_record`, its search seconds the whole front's (one search for every
    budget), plus the masked supernet's validation AUC at that point (the preview)."""
    p = next(p for p in front["outputs"]["points"] if p["budget"] == budget)
    rec = _record(seed, FRONT, budget, {"outputs": p if p["feasible"] else {"infeasible": p["reason"]},
                                        "seconds": front["seconds"]}, r)
    if p["feasible"]:
        rec["preview_valid_auc"] = p["preview_valid"]["auc"]
    return rec


def front_time(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per seed: the front's search seconds against the mean seconds of one `ham` search over the budgets
    (measured side by side in the same bench), and the same with every retrain of the budgets added."""
    rows = []
    for seed in sorted({r["seed"] for r in records}):
        ham = [r for r in records if r["seed"] == seed and r["method"] == "ham" and r["feasible"]]
        front = [r for r in records if r["seed"] == seed and r["method"] == FRONT and r["feasible"]]
        if not ham or not front:
            continue
        single = statistics.fmean(r["search_seconds"] for r in ham)
        whole = front[0]["search_seconds"] + sum(r["retrain_seconds"] for r in front)
        rows.append({"seed": seed, "front_search_seconds": front[0]["search_seconds"], "ham_search_seconds": single,
                     "ratio": front[0]["search_seconds"] / single, "points": len(front),
                     "front_with_retrains_seconds": whole,
                     "ham_with_retrain_seconds": statistics.fmean(r["search_seconds"] + r["retrain_seconds"] for r in ham),
                     "ham_all_budgets_with_retrains_seconds": sum(r["search_seconds"] + r["retrain_seconds"] for r in ham)})
    return rows


def bytes_unit(methods: Sequence[str]) -> str:
    """"serving" when every method's budget is in serving bytes (the fp32 serving tables = 100%), else "train"
    (weights + optimizer state; a mix keeps each method's own unit in its kept fraction)."""
    return "serving" if methods and all(METHODS[m].budget == "serving" for m in methods) else "train"


UNIT_WORDS = {"train": "embedding weights + optimizer state", "serving": "serving bytes of the exported tables, "
              "each at its dtype; 100% = every table fp32 at full dim"}


def paired_table(records: Sequence[Dict[str, Any]], methods: Sequence[str], budgets: Sequence[float],
                 baselines: Sequence[Dict[str, Any]] = ()) -> List[Dict[str, Any]]:
    """Per method x budget x reference (uniform and power_law where run, and the full model of `baselines`):
    test AUC minus the reference's on the same seed, mean and 95% t interval over the seeds where both
    have a model. A cell where the method or the reference is not feasible has no difference (verdict
    "n/a", `note` says which)."""
    auc: Dict[Tuple[str, float], Dict[int, float]] = {}
    for r in records:
        if r["feasible"]:
            auc.setdefault((r["method"], r["budget"]), {})[r["seed"]] = r["test_auc"]
    for budget in budgets if baselines else ():
        auc["full", budget] = {b["seed"]: b["test_auc"] for b in baselines}
    infeasible = {(r["method"], r["budget"]) for r in records if not r["feasible"]}
    rows = []
    front_vs_ham = ["ham"] if FRONT in methods and "ham" in methods else []
    for ref in [x for x in REFERENCES if x in methods] + front_vs_ham + (["full"] if baselines else []):
        for method in (m for m in methods if m != ref and (ref != "ham" or m == FRONT)):
            for budget in budgets:
                row = {"method": method, "budget": budget, "reference": ref,
                       **paired_difference(auc.get((method, budget), {}), auc.get((ref, budget), {}))}
                for who in (method, ref):
                    if (who, budget) in infeasible and (who, budget) not in auc:
                        row["note"] = f"{who} infeasible"
                        break
                rows.append(row)
    return rows


def planted_score(dims_file: str) -> Dict[str, Any]:
    """On planted data: the Spearman correlation of the kept dims with the planted ranks, and the
    widest field planted at rank 0 (from the dims file's `planted` record; {} where it has none)."""
    planted = load_dims(dims_file).planted
    if planted is None or math.isnan(planted.spearman):
        return {}
    return {"planted_spearman": planted.spearman, "rank0_max_dim": max(planted.rank0_dims.values(), default=0)}


def summarize(baselines: Sequence[Dict[str, Any]], records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Mean and standard deviation over seeds per row: the full model first, then each method x budget."""
    keys = ("test_auc", "test_logloss", "bytes", "search_seconds", "retrain_seconds")
    rows = [{"method": "full", "budget": 1.0, "seeds": len(baselines),
             **{k: mean_std([b[k] for b in baselines]) for k in ("test_auc", "test_logloss", "bytes")},
             "search_seconds": None, "retrain_seconds": mean_std([b["train_seconds"] for b in baselines])}]
    groups: Dict[Tuple[str, float], List[Dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["budget"]), []).append({**r, "bytes": r["kept_bytes"]})
    for (method, budget), rs in groups.items():
        rows.append({"method": method, "budget": budget, "seeds": len(rs),
                     **{k: mean_std([r[k] for r in rs]) for k in keys}})
        if all("planted_spearman" in r for r in rs):
            rows[-1]["planted_spearman"] = mean_std([r["planted_spearman"] for r in rs])
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


def _signed(x: float) -> str:
    return f"{x:+.4f}"


def _grid_cell(doc: Dict[str, Any], method: str, budget: float) -> str:
    """Test AUC mean ± std (kept fraction) of one method x budget, or why it is not feasible."""
    rs = [r for r in doc["records"] if r["method"] == method and r["budget"] == budget]
    ok = [r for r in rs if r["feasible"]]
    if not ok:
        return "infeasible" if rs else "-"
    auc = mean_std([r["test_auc"] for r in ok])
    frac = statistics.fmean(r["kept_fraction"] for r in ok)
    over = "†" if any(not r["within_budget"] for r in ok) else ""
    part = "" if len(ok) == len(rs) else f", {len(ok)}/{len(rs)} seeds"
    return f"{auc['mean']:.4f} ± {auc['std']:.4f} ({frac:.3f}{over}{part})"


def _paired_cell(p: Dict[str, Any]) -> str:
    """`+0.0012 [-0.0008, +0.0031] tied`, or n/a and why."""
    if p["lo"] is None:
        why = p.get("note") or (f"{p['n']} paired seed" if p["n"] == 1 else "no paired seeds")
        return f"n/a ({why})"
    mark = {"better": "**better**", "worse": "**worse**"}.get(p["verdict"], p["verdict"])
    return f"{_signed(p['mean'])} [{_signed(p['lo'])}, {_signed(p['hi'])}] {mark}"


def results_markdown(doc: Dict[str, Any]) -> str:
    """The README table (method rows x budget columns: test AUC, then the paired differences vs each
    reference with their 95% intervals and verdicts), then the per-row details and the infeasible cells."""
    budgets, full = doc["budgets"], doc["summary"][0]
    bhead = "| method | " + " | ".join(f"{b:g}" for b in budgets) + " |\n|---" + "|---" * len(budgets) + "|"
    unit = UNIT_WORDS[doc.get("bytes_unit", "train")]
    lines = [f"Test AUC over {doc['seeds']} seed(s) (mean ± std; in parentheses the kept bytes as a fraction of the "
             f"full model's, {unit}; † = above the budget). Columns: byte budgets.",
             "", bhead,
             f"| full | {_pm(full['test_auc'], '.4f')} (1.000) |" + " |" * (len(budgets) - 1)]
    lines += [f"| {m} | " + " | ".join(_grid_cell(doc, m, b) for b in budgets) + " |" for m in doc["methods"]]
    for ref in (*REFERENCES, "ham", "full"):
        rows = [p for p in doc["paired"] if p["reference"] == ref]
        if not rows:
            continue
        lines += ["", f"Paired difference of test AUC vs {'the full model' if ref == 'full' else ref} (same seed: same "
                  "data order and initialisation), mean [95% t interval over seeds]; better / worse when the interval "
                  "excludes 0, else tied.", "", bhead]
        for m in dict.fromkeys(p["method"] for p in rows):
            cells = {p["budget"]: _paired_cell(p) for p in rows if p["method"] == m}
            lines.append(f"| {m} | " + " | ".join(cells[b] for b in budgets) + " |")
    lines += _front_lines(doc)
    lines += ["", "Details (mean ± std over the seeds that met the budget):", ""]
    lines += _details(doc) + _dtype_mix(doc)
    for cell, why in doc.get("infeasible", {}).items():
        lines.append(f"- Not feasible: {cell}: {why}.")
    return "\n".join(lines) + "\n"


def _front_lines(doc: Dict[str, Any]) -> List[str]:
    """The front's preview (masked supernet, validation) beside its retrained test AUC per budget, and its time."""
    if FRONT not in doc["methods"]:
        return []
    lines = ["", f"{FRONT}: one HAM search per seed walks every budget; per budget the masked supernet's validation "
             "AUC at the point (the preview, no training) and the retrained model's test AUC (mean ± std).", "",
             "| budget | preview valid AUC | retrained test AUC |", "|---|---|---|"]
    for b in doc["budgets"]:
        ok = [r for r in doc["records"] if r["method"] == FRONT and r["budget"] == b and r["feasible"]]
        if ok:
            lines.append(f"| {b:g} | {_pm(mean_std([r['preview_valid_auc'] for r in ok]), '.4f')} | "
                         f"{_pm(mean_std([r['test_auc'] for r in ok]), '.4f')} |")
        else:
            lines.append(f"| {b:g} | infeasible | infeasible |")
    rows = doc.get("front_time") or []
    if rows:
        lines += ["", "Search time, side by side in this bench: the whole front (one search) against one `ham` "
                  "search (mean over the budgets), per seed; then each with its retrains (the front: every point's; "
                  "`ham`: one budget's, which reuses its check's training).", "",
                  "| seed | front search s | ham search s | ratio | front + retrains s | ham + retrain s | "
                  "ham, every budget + retrains s |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['seed']} | {r['front_search_seconds']:.1f} | {r['ham_search_seconds']:.1f} | {r['ratio']:.2f} | "
                  f"{r['front_with_retrains_seconds']:.1f} | {r['ham_with_retrain_seconds']:.1f} | "
                  f"{r['ham_all_budgets_with_retrains_seconds']:.1f} |" for r in rows]
    return lines


def _dtype_mix(doc: Dict[str, Any]) -> List[str]:
    """For the serving-byte methods: how many kept tables each serving dtype got, summed over the seeds."""
    mix: Dict[Tuple[str, float], Dict[str, int]] = {}
    for r in doc["records"]:
        if r["feasible"] and "dtypes" in r:
            cell = mix.setdefault((r["method"], r["budget"]), {})
            for q in r["dtypes"].values():
                cell[q] = cell.get(q, 0) + 1
    if not mix:
        return []
    lines = ["", "Serving dtypes of the kept tables (tables per dtype, summed over the seeds that met the budget):", "",
             "| method | budget | fp32 | fp16 | int8 | int4 |", "|---|---|---|---|---|---|"]
    for (method, budget), cell in mix.items():
        lines.append(f"| {method} | {budget:g} | " + " | ".join(str(cell.get(q, 0)) for q in ("fp32", "fp16", "int8", "int4"))
                     + " |")
    return lines + [""]


def _details(doc: Dict[str, Any]) -> List[str]:
    """One row for the full model and one per feasible method x budget: bytes, AUC, logloss, seconds."""
    full = doc["summary"][0]["bytes"]["mean"]
    planted = any("planted_spearman" in r for r in doc["summary"])
    head = "| method | budget | bytes | of full | test AUC | test logloss | search s | retrain s |"
    lines = [head + (" Spearman dims vs planted ranks | widest rank-0 field |" if planted else ""),
             "|---" * (head.count("|") - 1 + 2 * planted) + "|"]
    for r in doc["summary"]:
        row = (f"| {r['method']} | {r['budget']:g} | {r['bytes']['mean']:,.0f} | {r['bytes']['mean'] / full:.3f} | "
               f"{_pm(r['test_auc'], '.4f')} | {_pm(r['test_logloss'], '.4f')} | "
               f"{_pm(r['search_seconds'], '.1f')} | {_pm(r['retrain_seconds'], '.1f')} |")
        if planted:
            row += f" {_pm(r.get('planted_spearman'), '.2f')} | {r.get('rank0_max_dim', '-')} |"
        lines.append(row)
    lines += ["", "The full model's retrain column is its (baseline) training time."]
    if planted:
        lines.append("On planted data: the Spearman correlation of each field's kept dim with its planted rank "
                     "(mean ± std over seeds), and the most columns any field planted at rank 0 kept (over seeds).")
    return lines


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
    ax.set_xlabel(f"embedding bytes (MiB, {UNIT_WORDS[doc.get('bytes_unit', 'train')].split(';')[0]})")
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
