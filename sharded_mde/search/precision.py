"""Dims and serving precision under one serving-byte budget: the `dims`, `precision` and `joint` searches.

The budget of all three is `search.budget` x the full tables' fp32 SERVING bytes (`dims.cost.serving_*`
at `export.row_alignment`: what the exported tables hold, no optimizer state), docs/precision.md.

- `joint`: per table one (dim, dtype) among the legal dims 4..its row cap (0 where `search.allow_drop`
  shows the field harmless, as for HAM) and the dtypes of `search.precision.dtypes`, chosen by the exact
  multiple-choice knapsack (`search/knapsack.py`) on the shared signal below.
- `dims`: the same on the same signal with fp32 only (HAM's column signal, dims alone).
- `precision`: one uniform dim and one dtype for every table: per dtype the largest uniform legal dim
  whose serving bytes fit, each trained from scratch in fp32 as retrain trains it and scored on the
  validation split with every table fake-quantised to that dtype; the best validation AUC wins.

The signal, computed once per run directory and shared by every budget (`<run_dir>/precision_signal/`):
a HAM supernet (the `ham` search's supernet, its byte target `search.precision.signal_budget` of the
training bytes, default 1: only the loss prunes, so that wide widths stay measurable) and, on the validation split, per table t, width d (HAM's measured widths: the
doubling grid up to its kept count) and dtype q the log loss with t at its top d columns (mask order)
fake-quantised to q over those d columns (`search/fake_quant.py`, FBGEMM's own quantiser and
dequantiser), every other table at the supernet's own mask in fp32. Worth of (t, d, q) = minus that
loss, linear between measured widths and flat past the widest (HAM's `interpolate`): the loss effects
of columns and precision of different tables are taken as additive.

The candidate check (`check_allocations`, as HAM's): `joint`'s knapsack allocation, dims alone's and
precision alone's at the same budget are each trained as retrain trains them and scored on the
validation split as served; the best leaves the search, and retrain reuses its training. Trainings
are shared by dims (`training_key`: a from-scratch fp32 training does not depend on the dtypes) across
methods and budgets of a run directory, so in a benchmark the check costs joint one training per cell
beyond what dims and precision trained already.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig

from sharded_mde.config import RunConfig
from sharded_mde.dims import (CandidateCheck, CandidateScore, DimsFile, InfeasibleBudget, budget_bytes, dim_cap,
                              serving_bytes_of, serving_table_bytes)
from sharded_mde.dims.cost import DIM_MULTIPLE, fraction_holding
from sharded_mde.io import atomic_write_json, read_json
from sharded_mde.search.fake_quant import QuantAwareTables, fake_quantized
from sharded_mde.modules.masked_ebc import find_gate
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.budget import BudgetController, make_dims_file
from sharded_mde.search.ham import WEIGHT_DTYPE, build_supernet, controller_settings
from sharded_mde.search.ham_check import gate_scorer, harmless_drops, interpolate, measured_widths, top_columns
from sharded_mde.search.knapsack import Option, choose
from sharded_mde.search.report import save_search_result
from sharded_mde.train.distributed import DistEnv

SIGNAL_STAGE = "precision_signal"
TRAININGS_STAGE = "precision_trainings"  # the candidates' compact trainings, one per dims, shared by every method and budget


# --------------------------------------------------------------------------- serving bytes


def serving_budget(tables: Sequence[EmbeddingBagConfig], fraction: float, row_alignment: int) -> Tuple[int, int]:
    """(full fp32 serving bytes, the budget: `fraction` of them rounded down)."""
    full = serving_bytes_of(tables, "fp32", row_alignment)
    return full, int(math.floor(fraction * full))


def allocation_bytes(tables: Sequence[EmbeddingBagConfig], alloc: Mapping[str, Tuple[int, str]], row_alignment: int) -> int:
    """Serving bytes of (dim, dtype) per table (dim 0: dropped, no bytes)."""
    return sum(serving_table_bytes(t.num_embeddings, alloc[t.name][0], alloc[t.name][1], row_alignment) for t in tables)


# --------------------------------------------------------------------------- the shared signal


def signal_fingerprint(cfg: RunConfig) -> Dict[str, Any]:
    """What the signal depends on: data, model, train and the search settings other than method, budget, PME's
    and the precision keys the signal does not read (only `signal_budget` and `dtypes` shape it)."""
    search = {k: v for k, v in dataclasses.asdict(cfg.search).items() if k not in ("method", "budget", "pme")}
    search["precision"] = {k: search["precision"][k] for k in ("signal_budget", "dtypes")}
    return json.loads(json.dumps({"data": dataclasses.asdict(cfg.data), "model": dataclasses.asdict(cfg.model),
                                  "train": dataclasses.asdict(cfg.train), "search": search}))


def cached_signal(path: Path, fp: Mapping[str, Any], what: str) -> Optional[Dict[str, Any]]:
    """The signal saved at `path` when it was made with the config `fp` (None if none is saved); a signal of
    another config is an error, so a changed run never reuses a stale one."""
    if not path.is_file():
        return None
    sig = read_json(path, what)
    if sig.get("config") != fp:
        raise ValueError(f"{path}: made with another data/model/train/search config; remove {path.parent} to "
                         "recompute it")
    return sig


def precision_signal(cfg: RunConfig, env: DistEnv) -> Dict[str, Any]:
    """The shared signal (trains the supernet and measures it the first time; later reads `signal.json`).

    Returns {"tables": {name: {"order", "cap", "loss": {dtype: {width: logloss}}, "auc": ...}},
    "drops", "droppable", "supernet_checkpoints", "seconds"}.
    """
    import time

    from sharded_mde.data import DatasetMeta
    from sharded_mde.train.run import train_stage

    out = Path(cfg.run_dir) / SIGNAL_STAGE
    path = out / "signal.json"
    fp = signal_fingerprint(cfg)
    sig = cached_signal(path, fp, "precision signal")
    if sig is not None:
        return sig
    t0 = time.perf_counter()
    s, p = cfg.search, cfg.search.precision
    meta = DatasetMeta.load(cfg.data.dir)
    tables = full_table_configs(cfg)
    optimizer = cfg.train.embedding_optimizer
    scfg = dataclasses.replace(cfg, search=dataclasses.replace(s, method="joint", budget=p.signal_budget),
                               train=dataclasses.replace(cfg.train, epochs=s.epochs))
    torch.manual_seed(cfg.train.seed)
    model = build_supernet(scfg, tables, meta.sparse_features, len(meta.dense_features))
    gate = find_gate(model)
    controller = BudgetController(gate, tables, budget_bytes(tables, p.signal_budget, WEIGHT_DTYPE, optimizer),
                                  **controller_settings(cfg, env))
    trainer, metrics = train_stage(scfg, env, SIGNAL_STAGE, model=model, tables=tables, callbacks=[controller])
    values = gate.table_values()
    order = {n: torch.argsort(v.double(), descending=True, stable=True) for n, v in values.items()}
    base = {n: int((v > 0).sum()) for n, v in values.items()}
    measured = list(dict.fromkeys(["fp32", *p.dtypes]))  # fp32 always: the `dims` method and the drop test read it
    entries: Dict[str, Any] = {}
    for t in tables:
        cap = dim_cap(t.num_embeddings, t.embedding_dim)
        loss: Dict[str, Dict[str, float]] = {q: {} for q in measured}
        auc: Dict[str, Dict[str, float]] = {q: {} for q in measured}
        for d in measured_widths(base[t.name], cap):
            kept = top_columns(order, {**base, t.name: d})
            fp32 = _score(trainer, gate, kept, {}, s.check_batches)
            for q in measured:  # at width 0 the table serves nothing: every dtype scores as fp32
                m = fp32 if q == "fp32" or d == 0 else _score(trainer, gate, kept, {t.name: q}, s.check_batches)
                loss[q][str(d)], auc[q][str(d)] = m["logloss"], m["auc"]
        entries[t.name] = {"order": order[t.name].tolist(), "cap": cap, "base": base[t.name], "loss": loss, "auc": auc}
    curves = {n: {int(d): {"auc": e["auc"]["fp32"][d], "logloss": e["loss"]["fp32"][d]} for d in e["loss"]["fp32"]}
              for n, e in entries.items()}
    drops = harmless_drops(curves, s.drop_tolerance) if s.allow_drop else {}
    sig = {"config": fp, "tables": entries, "drops": drops, "droppable": [n for n, d in drops.items() if d["harmless"]],
           "supernet_checkpoints": str(out / "checkpoints"), "supernet_test": metrics["test"],
           "seconds": time.perf_counter() - t0}
    if env.is_main:
        atomic_write_json(path, sig)
    if dist.is_initialized():
        dist.barrier()  # no rank looks for the file of a later cell before rank 0 has written it
    return sig


def _score(trainer: Any, gate: Any, kept: Mapping[str, Sequence[int]], dtypes: Mapping[str, str],
           batches: int) -> Dict[str, float]:
    """Validation metrics of the supernet with exactly `kept` columns and the tables of `dtypes` fake-quantised
    over their kept columns."""

    def evaluate() -> Dict[str, float]:
        with fake_quantized(trainer.dmp, dtypes, {n: kept[n] for n in dtypes}):
            return trainer.evaluate("valid", max_batches=batches)

    return gate_scorer(gate, evaluate)(kept)


def worth_table(entry: Mapping[str, Any], dtype: str) -> List[float]:
    """Worth (minus validation log loss) of a table at dims 0, 4, ..., its cap served as `dtype`."""
    return interpolate({int(d): -v for d, v in entry["loss"][dtype].items()}, entry["cap"])


def dim_options(rows: int, entry: Mapping[str, Any], dims: Sequence[int], dtypes: Sequence[str],
                row_alignment: int) -> List[Option]:
    """Every (d, q) of d in `dims` and q in `dtypes` for a table of `rows` rows: its serving bytes and worth."""
    opts: List[Option] = []
    for q in dtypes:
        w = worth_table(entry, q)
        opts.extend(((d, q), serving_table_bytes(rows, d, q, row_alignment), w[d // DIM_MULTIPLE]) for d in dims)
    return opts


def table_options(t: EmbeddingBagConfig, entry: Mapping[str, Any], dtypes: Sequence[str], droppable: bool,
                  row_alignment: int) -> List[Option]:
    """Every (dim, dtype) a table may take, with its serving bytes and worth (dim 0 only where droppable)."""
    opts: List[Option] = [((0, "fp32"), 0, worth_table(entry, "fp32")[0])] if droppable else []
    return opts + dim_options(t.num_embeddings, entry, range(DIM_MULTIPLE, entry["cap"] + 1, DIM_MULTIPLE), dtypes,
                              row_alignment)


def choose_serving(options: Mapping[str, Sequence[Option]], budget: int, full: int, fraction: float, method: str,
                   floor: str) -> Dict[str, Tuple[int, str]]:
    """The knapsack's choice per table within `budget` serving bytes; InfeasibleBudget naming the smallest
    feasible fraction when even every table's cheapest option (`floor` says which) does not fit."""
    need = sum(min(o[1] for o in opts) for opts in options.values())
    if need > budget:
        raise InfeasibleBudget(
            f"search.budget {fraction:g} ({budget:,} B of {full:,} B fp32 serving bytes) is not feasible for {method}: "
            f"{floor} needs {need:,} B; the smallest feasible budget is {fraction_holding(need, full):.4f}")
    alloc, _, _ = choose(options, budget)
    return alloc


def select(tables: Sequence[EmbeddingBagConfig], sig: Mapping[str, Any], dtypes: Sequence[str], budget: int,
           row_alignment: int, method: str, fraction: float, full: int) -> Dict[str, Tuple[int, str]]:
    """The most worthy (dim, dtype) per table within `budget` serving bytes (exact knapsack); InfeasibleBudget
    naming the smallest feasible fraction when even every table's cheapest option does not fit."""
    droppable = set(sig["droppable"])
    options = {t.name: table_options(t, sig["tables"][t.name], dtypes, t.name in droppable, row_alignment)
               for t in tables}
    kept = "every field" if not droppable else f"every field but {', '.join(sorted(droppable))}"
    return choose_serving(options, budget, full, fraction, method, f"{kept} at dim {DIM_MULTIPLE} in {'/'.join(dtypes)}")


def serving_dims_file(method: str, tables: Sequence[EmbeddingBagConfig], order: Mapping[str, Sequence[int]],
                      alloc: Mapping[str, Tuple[int, str]], cfg: RunConfig, full: int, budget: int,
                      extra: Dict[str, Any], **records: Any) -> DimsFile:
    """A dims file of (dim, dtype) per table, each table's top `order` columns; the serving bytes in `extra["serving"]`."""
    kept = {n: sorted(list(order[n])[:d]) for n, (d, _) in alloc.items()}
    dims = make_dims_file(method, tables, kept, cfg.search.budget, WEIGHT_DTYPE, cfg.train.embedding_optimizer,
                          extra, **records)
    for t in dims.tables:
        t.dtype = alloc[t.name][1] if t.dim else ""
    dims.extra["serving"] = {"row_alignment": cfg.export.row_alignment, "full_bytes": full, "budget_bytes": budget,
                             "kept_bytes": allocation_bytes(tables, alloc, cfg.export.row_alignment),
                             "dtypes": {n: a[1] for n, a in alloc.items() if a[0]}}
    return dims


Candidate = Tuple[Mapping[str, Tuple[int, str]], Mapping[str, Sequence[int]], Optional[str]]  # alloc, order, supernet


def training_key(cfg: RunConfig, tables: Sequence[EmbeddingBagConfig], alloc: Mapping[str, Tuple[int, str]],
                 order: Mapping[str, Sequence[int]]) -> str:
    """The directory of an allocation's compact training under `<run_dir>/precision_trainings/`: one per
    set of dims (a from-scratch fp32 training does not depend on the dtypes, which only the scoring
    applies, nor on which columns), `u<d>` for a uniform dim; the int dtypes join the key when the
    training is quantisation-aware, the kept columns when it warm-starts from the supernet."""
    dims = [alloc[t.name][0] for t in tables]
    qat = sorted((n, q) for n, (d, q) in alloc.items() if d and q in QAT_DTYPES) if cfg.search.precision.qat_fraction else []
    warm = cfg.search.retrain_warm_start
    if len(set(dims)) == 1 and not qat and not warm:
        return f"u{dims[0]}"
    cols = [sorted(list(order[t.name])[:alloc[t.name][0]]) for t in tables] if warm else None
    return "a" + hashlib.sha1(json.dumps([dims, qat, cols]).encode()).hexdigest()[:12]


def check_allocations(cfg: RunConfig, env: DistEnv, tables: Sequence[EmbeddingBagConfig], full: int, budget: int,
                      method: str, candidates: Mapping[str, Candidate], rule: str) -> CandidateCheck:
    """Trains each candidate allocation as retrain would (in fp32; one training per `training_key`, shared by
    every method and budget of the run directory, a finished one resumed), scores it on the validation
    split with its tables fake-quantised to their dtypes, and returns the check: the best validation AUC
    (then lower log loss, then fewer bytes) wins; `margin_vs_ham` is against the first candidate."""
    from sharded_mde.search.retrain import train_compact, train_record

    rows: List[CandidateScore] = []
    seen: Dict[str, str] = {}
    ckpts: Dict[str, str] = {}
    for name, (alloc, order, supernet) in candidates.items():
        key = json.dumps(sorted((n, list(a)) for n, a in alloc.items()))
        same = seen.get(key)
        cand = serving_dims_file(method, tables, order, alloc, cfg, full, budget, {}, supernet_checkpoints=supernet)
        stage = f"{TRAININGS_STAGE}/{training_key(cfg, tables, alloc, order)}"
        if same is None:
            m = train_compact(cfg, env, cand, stage)[0]["valid"]  # scored as served
            seen[key] = name
        else:
            prev = next(r for r in rows if r.name == same)
            m = {"auc": prev.valid_auc, "logloss": prev.valid_logloss}
        ckpts[name] = str(Path(cfg.run_dir) / stage / "checkpoints")
        rows.append(CandidateScore(name=name, dims={t.name: alloc[t.name][0] for t in tables},
                                   kept_bytes=allocation_bytes(tables, alloc, cfg.export.row_alignment),
                                   valid_auc=round(float(m["auc"]), 6), valid_logloss=round(float(m["logloss"]), 6),
                                   same_as=same))
    ranked = sorted(rows, key=lambda r: (-r.valid_auc, r.valid_logloss, r.kept_bytes))
    win = ranked[0]
    others = [r for r in ranked if candidates[r.name][0] != candidates[win.name][0]]
    return CandidateCheck(candidates=rows, winner=win.name, margin_vs_ham=round(win.valid_auc - rows[0].valid_auc, 6),
                          runner_up=others[0].name if others else None,
                          margin_vs_runner_up=round(win.valid_auc - others[0].valid_auc, 6) if others else None,
                          rule=rule + " (kept_bytes: serving bytes; margin_vs_ham: against the first candidate)",
                          winner_checkpoints=ckpts[win.name], winner_trained_as=train_record(cfg))


def uniform_candidates(tables: Sequence[EmbeddingBagConfig], budget: int, dtypes: Sequence[str], row_alignment: int,
                       prefix: str = "") -> Dict[str, Candidate]:
    """Per dtype, every table at the largest uniform dim whose serving bytes as that dtype fit (dtypes where
    even dim 4 does not fit are left out), its first columns."""
    order = {t.name: list(range(t.embedding_dim)) for t in tables}
    out: Dict[str, Candidate] = {}
    for q in dtypes:
        d = uniform_serving_fit(tables, budget, q, row_alignment)
        if d:
            out[prefix + q] = ({t.name: (min(d, t.embedding_dim), q) for t in tables}, order, None)
    return out


def _run_signal_method(cfg: RunConfig, env: DistEnv, stage: str, ranks: Optional[Dict[str, int]], method: str,
                       dtypes: Sequence[str]) -> DimsFile:
    """`joint` (every dtype of `search.precision.dtypes`) or `dims` (fp32) on the shared signal, then the
    candidate check: joint's knapsack allocation against dims alone and precision alone at the same
    budget (`search.precision.check`); dims alone is trained only (its retrain reuses the training)."""
    tables = full_table_configs(cfg)
    align = cfg.export.row_alignment
    full, budget = serving_budget(tables, cfg.search.budget, align)
    sig = precision_signal(cfg, env)
    alloc = select(tables, sig, dtypes, budget, align, method, cfg.search.budget, full)
    order = {n: e["order"] for n, e in sig["tables"].items()}
    ckpt = sig["supernet_checkpoints"]
    candidates: Dict[str, Candidate] = {method: (alloc, order, ckpt)}
    if method == "joint" and cfg.search.precision.check:
        try:
            candidates["dims"] = (select(tables, sig, ["fp32"], budget, align, "dims", cfg.search.budget, full), order, ckpt)
        except InfeasibleBudget:  # below dims alone's floor: not a candidate
            pass
        candidates.update(uniform_candidates(tables, budget, cfg.search.precision.dtypes, align, "precision_"))
    check = check_allocations(cfg, env, tables, full, budget, method, candidates,
                              "best validation AUC of the compact models, trained in fp32 as retrain would, scored "
                              "with their tables fake-quantised to their dtypes")
    won_alloc, won_order, won_ckpt = candidates[check.winner]
    extra = {"signal": str(Path(cfg.run_dir) / SIGNAL_STAGE / "signal.json"), "signal_seconds": sig["seconds"],
             "dtypes_considered": list(dtypes), "drops": sig["drops"],
             "selection": "exact multiple-choice knapsack over (dim, dtype) per table (search/knapsack.py)"
                          + (", then the candidate check" if len(candidates) > 1 else "")}
    dims = serving_dims_file(method, tables, won_order, won_alloc, cfg, full, budget, extra,
                             supernet_checkpoints=won_ckpt, check=check)
    if env.is_main:
        save_search_result(Path(cfg.run_dir) / stage, dims, None, ranks)
    return dims


def run_joint(cfg: RunConfig, env: DistEnv, stage: str = "joint", ranks: Optional[Dict[str, int]] = None) -> DimsFile:
    """The joint search: (dim, dtype) per table under the serving-byte budget, written to `<run_dir>/<stage>/`."""
    return _run_signal_method(cfg, env, stage, ranks, "joint", cfg.search.precision.dtypes)


def run_dims(cfg: RunConfig, env: DistEnv, stage: str = "dims", ranks: Optional[Dict[str, int]] = None) -> DimsFile:
    """Dims alone: HAM's column signal, every table fp32, under the serving-byte budget."""
    return _run_signal_method(cfg, env, stage, ranks, "dims", ["fp32"])


# --------------------------------------------------------------------------- uniform dims, one dtype


def uniform_serving_fit(tables: Sequence[EmbeddingBagConfig], budget: int, dtype: str, row_alignment: int) -> int:
    """The largest uniform legal dim (each table at most its full dim) whose serving bytes as `dtype` fit; 0 if none."""
    best = 0
    for d in range(DIM_MULTIPLE, max(t.embedding_dim for t in tables) + 1, DIM_MULTIPLE):
        alloc = {t.name: (min(d, t.embedding_dim), dtype) for t in tables}
        if allocation_bytes(tables, alloc, row_alignment) > budget:
            break
        best = d
    return best


def run_precision(cfg: RunConfig, env: DistEnv, stage: str = "precision",
                  ranks: Optional[Dict[str, int]] = None) -> DimsFile:
    """Uniform dims, one dtype: per dtype the largest uniform dim that fits, the best validation AUC of
    their compact models (trained in fp32, scored fake-quantised) wins; retrain reuses its training."""
    tables = full_table_configs(cfg)
    align = cfg.export.row_alignment
    full, budget = serving_budget(tables, cfg.search.budget, align)
    candidates = uniform_candidates(tables, budget, cfg.search.precision.dtypes, align)
    if not candidates:
        need = min(allocation_bytes(tables, {t.name: (DIM_MULTIPLE, q) for t in tables}, align)
                   for q in cfg.search.precision.dtypes)
        raise InfeasibleBudget(f"search.budget {cfg.search.budget:g} ({budget:,} B of {full:,} B fp32 serving bytes) is "
                               f"not feasible for precision: every table at dim {DIM_MULTIPLE} in the cheapest dtype needs "
                               f"{need:,} B; the smallest feasible budget is {fraction_holding(need, full):.4f}")
    check = check_allocations(cfg, env, tables, full, budget, "precision", candidates,
                              "best validation AUC of each dtype's largest fitting uniform dim, trained in fp32 as "
                              "retrain would and scored with every table fake-quantised to the dtype")
    alloc, order, _ = candidates[check.winner]
    d = next(iter(alloc.values()))[0]
    dims = serving_dims_file("precision", tables, order, alloc, cfg, full, budget, {"uniform_dim": d}, check=check)
    if env.is_main:
        save_search_result(Path(cfg.run_dir) / stage, dims, None, ranks)
    return dims


# --------------------------------------------------------------------------- what serving sees

QAT_DTYPES = ("int8", "int4")  # the dtypes quantisation-aware fine-tuning trains for (fp16 is all but lossless)


def qat_callbacks(cfg: RunConfig, dims: DimsFile) -> List[QuantAwareTables]:
    """With `search.precision.qat_fraction` > 0, the callback that trains the int8/int4 tables of `dims`
    quantisation-aware over that last fraction of the compact model's training; else []."""
    from sharded_mde.search.fake_quant import served_dtypes

    dtypes = {n: q for n, q in served_dtypes(dims.tables).items() if q in QAT_DTYPES}
    fraction = cfg.search.precision.qat_fraction
    return [QuantAwareTables(dtypes, fraction)] if dtypes and fraction > 0 else []



def served_metrics(trainer: Any, dims: DimsFile, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """`metrics` of a trained compact model with its valid and test scores replaced by those of the model
    with every table fake-quantised to its dims-file dtype (what the exported model serves); the fp32
    scores stay under "fp32". Unchanged when every table is fp32."""
    from sharded_mde.search.fake_quant import served_dtypes

    dtypes = served_dtypes(dims.tables)
    if not dtypes:
        return metrics
    with fake_quantized(trainer.dmp, dtypes):
        valid, test = trainer.evaluate("valid"), trainer.evaluate("test")
    return {**metrics, "valid": valid, "test": test, "served_dtypes": dtypes,
            "fp32": {"valid": metrics["valid"], "test": metrics["test"]}}
