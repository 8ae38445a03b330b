"""The joint dims x serving dtype search over PME's token groups: `search.method: joint_pme` (docs/precision.md).

PME gives every token a size, one table per (field, size) group; `joint_pme` serves each group table at its
own (dim, dtype) under one budget in serving bytes: `search.budget` x the full tables' fp32 serving bytes,
each group table at `dims.cost.serving_table_bytes(rows, dim, dtype, export.row_alignment)` (the group
projections and the routing are dense parts of the model, not tables, and are not counted, as a head is not).

1. The signal (`<run_dir>/precision_pme_signal_s<f>/`, shared by every budget with the same f): PME's search
   at f = min(1, `search.precision.pme_signal_scale` x `search.budget`) of the training bytes (its groups:
   which tokens share a table, and the data renumbered for them), its compact model trained in fp32 as retrain
   trains it, and on the validation split, per group table g, measured width d and dtype q, the log loss with
   g at its d largest-norm columns (the others zeroed: what a table of d columns holds) fake-quantised to q
   (`search/fake_quant.py`: the export's encode, FBGEMM's dequantiser), every other group as trained.
2. The choice: per group of size s the options (d, q), d a legal dim in (s', s] (s' the table's next smaller
   group size: the groups keep their order, so the renumbered data stays valid) and q in
   `search.precision.dtypes`, each at its serving bytes and worth (minus the loss, interpolated between
   the measured widths: `precision.worth_table`); the exact knapsack (`search/knapsack.py`) picks one per group.
3. The dims file: PME's, each group at its chosen size with its dtype (`TokenGroup.dtype`); retrain trains it
   from scratch on the signal's renumbered data and scores it as served; export writes each group table at
   its dtype.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig

from sharded_mde.config import RunConfig
from sharded_mde.dims import DimsFile, TableDims, TokenGroup, budget_bytes, group_name, load_dims, serving_table_bytes
from sharded_mde.dims.cost import DIM_MULTIPLE
from sharded_mde.io import atomic_write_json
from sharded_mde.plan.tables import full_table_configs, plan_tables
from sharded_mde.search.fake_quant import fake_quantized, table_pieces
from sharded_mde.search.ham_check import check_widths
from sharded_mde.search.pme import WEIGHT_DTYPE, run_pme
from sharded_mde.search.pme_select import ByteModel, histogram_bytes
from sharded_mde.search.precision import (cached_signal, choose_serving, dim_options, serving_budget,
                                         signal_fingerprint)
from sharded_mde.search.report import save_search_result
from sharded_mde.train.distributed import DistEnv

SIGNAL_STAGE = "precision_pme_signal"


def signal_fraction(cfg: RunConfig) -> float:
    """PME's training-byte budget for the groups of the signal: min(1, pme_signal_scale x search.budget)."""
    return min(1.0, cfg.search.precision.pme_signal_scale * float(cfg.search.budget))


def signal_dir(cfg: RunConfig) -> Path:
    """Where the signal of `cfg`'s `signal_fraction` lives (shared by every budget with the same fraction)."""
    return Path(cfg.run_dir) / f"{SIGNAL_STAGE}_s{signal_fraction(cfg):g}"


def column_norms(model: torch.nn.Module, tables: Sequence[EmbeddingBagConfig]) -> Dict[str, torch.Tensor]:
    """Each table's squared column norms over all its rows (summed over the ranks' row pieces)."""
    out = {t.name: torch.zeros(t.embedding_dim, dtype=torch.float64) for t in tables}
    for name, w in table_pieces(model, list(out)):
        out[name] += w.detach().double().pow(2).sum(0).cpu()
    if dist.is_initialized():
        for t in tables:  # every rank reduces every table in the same order (a rank without a piece adds zeros)
            dist.all_reduce(out[t.name])
    return out


def group_widths(low: int, size: int) -> List[int]:
    """The widths measured for a group whose legal widths are low..size: 0, low, size and the doubling grid between."""
    return sorted({0, low, size} | {w for w in check_widths(size) if w > low})


def pme_signal(cfg: RunConfig, env: DistEnv) -> Dict[str, Any]:
    """PME's groups at `signal_fraction`, their compact model trained in fp32, and the validation log loss of each
    group table at each measured width and dtype (computed the first time; later read from `signal.json`).

    Returns {"pme_dims": path, "groups": {group: {"table", "size", "low", "rows", "cap", "order",
    "loss": {dtype: {width: logloss}}, "auc": ...}}, "valid", "seconds"}.
    """
    frac = signal_fraction(cfg)
    out = signal_dir(cfg)
    base = out.name
    path = out / "signal.json"
    fp = {**signal_fingerprint(cfg), "pme": dataclasses.asdict(cfg.search.pme), "pme_budget": frac}
    sig = cached_signal(path, fp, "joint_pme signal")
    if sig is not None:
        return sig
    from sharded_mde.search.retrain import compact_trainer

    t0 = time.perf_counter()
    s = cfg.search
    pcfg = dataclasses.replace(cfg, search=dataclasses.replace(s, method="pme", budget=frac))
    dims = run_pme(pcfg, env, stage=f"{base}/pme")
    trainer, metrics, _ = compact_trainer(pcfg, env, dims, f"{base}/train")
    groups = plan_tables(dims, full_table_configs(cfg))
    norms = column_norms(trainer.dmp, groups)
    measured = list(dict.fromkeys(["fp32", *s.precision.dtypes]))
    rows = {g.name: g.num_embeddings for g in groups}
    entries: Dict[str, Any] = {}
    for t in dims.tables:
        below = 0  # the next smaller group size of the table: this group's widths are above it
        for size in sorted(g.size for g in t.groups if g.size and g.rows):
            name = group_name(t.name, size)
            order = torch.argsort(norms[name], descending=True, stable=True).tolist()
            low = below + DIM_MULTIPLE
            loss: Dict[str, Dict[str, float]] = {q: {} for q in measured}
            auc: Dict[str, Dict[str, float]] = {q: {} for q in measured}
            for d in group_widths(low, size):
                for q in measured:  # at width 0 the group serves nothing: every dtype scores as fp32
                    if d == 0 and q != "fp32":
                        m = {"logloss": loss["fp32"]["0"], "auc": auc["fp32"]["0"]}
                    else:
                        with fake_quantized(trainer.dmp, {name: q}, {name: order[:d]}, zero_others=True):
                            m = trainer.evaluate("valid", max_batches=s.check_batches)
                    loss[q][str(d)], auc[q][str(d)] = float(m["logloss"]), float(m["auc"])
            entries[name] = {"table": t.name, "size": size, "low": low, "rows": rows[name], "cap": size,
                             "order": order, "loss": loss, "auc": auc}
            below = size
    sig = {"config": fp, "pme_dims": str(out / "pme" / "dims.json"), "groups": entries,
           "valid": metrics["valid"], "seconds": time.perf_counter() - t0}
    if env.is_main:
        atomic_write_json(path, sig)
    if dist.is_initialized():
        dist.barrier()  # no rank looks for the file of a later cell before rank 0 has written it
    return sig


def select_groups(sig: Mapping[str, Any], dtypes: Sequence[str], budget: int, full: int, fraction: float,
                  row_alignment: int) -> Dict[str, Tuple[int, str]]:
    """The most worthy (dim, dtype) per group table within `budget` serving bytes (exact knapsack)."""
    options = {name: dim_options(e["rows"], e, range(e["low"], e["size"] + 1, DIM_MULTIPLE), dtypes, row_alignment)
               for name, e in sig["groups"].items()}
    return choose_serving(options, budget, full, fraction, "joint_pme",
                          f"every group table at its smallest width in {'/'.join(dtypes)}")


def _groups_bytes(groups: Sequence[TokenGroup], features: int, model: ByteModel) -> int:
    """Training bytes of a table's group tables and its features' projections (PME's byte model)."""
    return histogram_bytes([g.rows for g in groups], [g.size for g in groups], features, model)


def joint_pme_dims(cfg: RunConfig, pme: DimsFile, alloc: Mapping[str, Tuple[int, str]],
                   tables: Sequence[EmbeddingBagConfig], full: int, budget: int, extra: Dict[str, Any]) -> DimsFile:
    """PME's dims file with each group at its chosen (size, dtype): group bytes and projections recounted at the new
    sizes (the routing is unchanged: the same groups in the same order), reserved ids moved with their groups,
    the serving figures in `extra["serving"]`."""
    model = ByteModel(pme.weight_dtype, pme.optimizer, cfg.train.dense_optimizer, pme.pme.combine)
    entries: List[TableDims] = []
    reserved: Dict[str, List[int]] = {}
    for t in pme.tables:
        new = {g.size: alloc[group_name(t.name, g.size)] if g.size and g.rows else (g.size, "") for g in t.groups}
        groups = [TokenGroup(new[g.size][0], g.rows, model.group(g.rows, new[g.size][0]), new[g.size][1])
                  for g in t.groups]
        routing = t.bytes - _groups_bytes(t.groups, len(t.features), model)
        entries.append(dataclasses.replace(t, dim=max(g.size for g in groups), groups=groups,
                                           bytes=_groups_bytes(groups, len(t.features), model) + routing))
        reserved[t.name] = [new[s][0] for s in pme.pme.reserved_sizes.get(t.name, [])]
    record = dataclasses.replace(pme.pme, reserved_sizes=reserved, tokens={})  # token statistics: the signal's file
    served = {group_name(t.name, g.size): (g.rows, g.size, g.dtype) for t in entries for g in t.groups if g.size and g.rows}
    extra["serving"] = {"row_alignment": cfg.export.row_alignment, "full_bytes": full, "budget_bytes": budget,
                        "kept_bytes": sum(serving_table_bytes(r, d, q, cfg.export.row_alignment) for r, d, q in served.values()),
                        "dtypes": {n: q for n, (_, _, q) in served.items()}}
    return DimsFile(method="joint_pme", budget_fraction=float(cfg.search.budget),
                    budget_bytes=budget_bytes(tables, float(cfg.search.budget), WEIGHT_DTYPE, pme.optimizer),
                    full_bytes=pme.full_bytes, kept_bytes=sum(e.bytes for e in entries), tables=entries,
                    weight_dtype=pme.weight_dtype, optimizer=pme.optimizer, data_dir=pme.data_dir, pme=record,
                    extra=extra)


def run_joint_pme(cfg: RunConfig, env: DistEnv, stage: str = "joint_pme",
                  ranks: Optional[Dict[str, int]] = None) -> DimsFile:
    """The joint search over PME's token groups: (dim, dtype) per group table under the serving-byte budget,
    written to `<run_dir>/<stage>/`."""
    tables = full_table_configs(cfg)
    align = cfg.export.row_alignment
    full, budget = serving_budget(tables, float(cfg.search.budget), align)
    sig = pme_signal(cfg, env)
    alloc = select_groups(sig, cfg.search.precision.dtypes, budget, full, float(cfg.search.budget), align)
    extra = {"signal": str(signal_dir(cfg) / "signal.json"),
             "signal_pme_dims": sig["pme_dims"], "signal_pme_budget": signal_fraction(cfg),
             "signal_seconds": sig["seconds"], "dtypes_considered": list(cfg.search.precision.dtypes),
             "selection": "exact multiple-choice knapsack over (dim, dtype) per PME group table (search/knapsack.py)"}
    dims = joint_pme_dims(cfg, load_dims(sig["pme_dims"], tables), alloc, tables, full, budget, extra)
    if env.is_main:
        save_search_result(Path(cfg.run_dir) / stage, dims, None, ranks)
    return dims
