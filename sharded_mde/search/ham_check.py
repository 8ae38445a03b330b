"""HAM's validation checks on the trained supernet: loss effect per table width, harmless drops, candidates.

The loss effect: the trained supernet evaluated on the validation split (`search.check_batches`
batches, 0 = all) with hard column masks set on its `ColumnGate`. The base mask is the supernet's
own final mask (what its head adapted to). For each table, keeping its top d columns (by mask
value) is measured with every other table at the base mask, at d = 0, 4, 8, 16, ... up to its
kept count rounded up to a legal dim (columns pruned earlier stopped training, so the supernet
cannot say what they would be worth), linear between and flat beyond; `select_dims` spends the
budget on the largest validation-loss drop per byte.

The candidate check: HAM's allocation, the mask-value allocation, uniform and power-law dims at
the same budget are each trained as the compact model `retrain` would train (`search.check_epochs`)
and scored on the validation split; the best validation AUC leaves the search. The supernet
cannot judge them: it adapted to its own mask, and adding the columns it pruned costs it AUC.
The search never reads the test split's scores.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Dict, List, Mapping, Sequence

import torch
from torchrec import EmbeddingBagConfig

from sharded_mde.modules.masked_ebc import ColumnGate
from sharded_mde.dims import DIM_MULTIPLE, CandidateCheck, CandidateScore, budget_bytes, dim_cap, dims_bytes
from sharded_mde.search.budget import select_dims, select_widths
from sharded_mde.search.uniform import uniform_fit

Scorer = Callable[[Mapping[str, Sequence[int]]], Dict[str, float]]


def gate_scorer(gate: ColumnGate, evaluate: Callable[[], Dict[str, float]]) -> Scorer:
    """A scorer: sets the gate to keep exactly the given columns, evaluates, restores the gate's mask."""

    def score(kept: Mapping[str, Sequence[int]]) -> Dict[str, float]:
        saved = gate.mask.detach().clone()
        try:
            gate.set_kept(kept)
            m = evaluate()
        finally:
            with torch.no_grad():
                gate.mask.copy_(saved)
        return {"auc": float(m["auc"]), "logloss": float(m["logloss"])}

    return score


def check_widths(cap: int, multiple: int = DIM_MULTIPLE) -> List[int]:
    """The widths whose loss effect is measured: 0, 4, 8, 16, ... (doubling) and the cap itself."""
    out, d = [0], multiple
    while d < cap:
        out.append(d)
        d *= 2
    return out + [cap]


def interpolate(points: Mapping[int, float], cap: int, multiple: int = DIM_MULTIPLE) -> List[float]:
    """Values at every legal width 0, multiple, ..., cap: linear between the measured `points`, flat past the widest."""
    xs = sorted(points)
    out = []
    for d in range(0, cap + 1, multiple):
        d = min(d, xs[-1])
        hi = next(x for x in xs if x >= d)
        lo = max(x for x in xs if x <= d)
        w = 0.0 if hi == lo else (d - lo) / (hi - lo)
        out.append((1 - w) * points[lo] + w * points[hi])
    return out


def measured_widths(base: int, cap: int, multiple: int = DIM_MULTIPLE) -> List[int]:
    """Widths measured for a table the supernet keeps `base` columns of: the doubling grid up to base
    rounded up to a legal dim (the columns it pruned stopped training, so wider is not measurable),
    and base rounded down (both legal neighbours of an illegal width)."""
    top = min(cap, max(multiple, -(-base // multiple) * multiple))
    return sorted(set(check_widths(top, multiple)) | {min(top, base // multiple * multiple)})


def top_columns(order: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> Dict[str, List[int]]:
    """Each table's `dims[t]` columns of largest mask value (its `order` prefix), sorted."""
    return {n: sorted(order[n][:d].tolist()) for n, d in dims.items()}


def loss_curves(score: Scorer, tables: Sequence[EmbeddingBagConfig], base: Mapping[str, int],
                order: Mapping[str, torch.Tensor], caps: Mapping[str, int]) -> Dict[str, Dict[int, Dict[str, float]]]:
    """Per table and measured width d: validation metrics with that table at its top d columns, others at `base`."""
    curves: Dict[str, Dict[int, Dict[str, float]]] = {}
    for t in tables:
        curves[t.name] = {}
        for d in measured_widths(base[t.name], caps[t.name]):
            curves[t.name][d] = score(top_columns(order, {**base, t.name: d}))
    return curves


def harmless_drops(curves: Mapping[str, Mapping[int, Mapping[str, float]]], tolerance: float) -> Dict[str, Dict[str, Any]]:
    """Per table: validation AUC without the field against with it at its widest measured width;
    harmless if it falls by at most `tolerance`."""
    out = {}
    for name, c in curves.items():
        without, with_ = c[0]["auc"], c[max(c)]["auc"]
        out[name] = {"auc_without": round(without, 6), "auc_with": round(with_, 6),
                     "harmless": bool(with_ - without <= tolerance)}
    return out


def candidate_dims(tables: Sequence[EmbeddingBagConfig], fraction: float, values: Mapping[str, torch.Tensor],
                   worth: Mapping[str, Sequence[float]], droppable: Collection[str], power_law: Mapping[str, int],
                   weight_dtype: str, optimizer: str) -> Dict[str, Dict[str, int]]:
    """The allocations checked at the same budget: HAM by loss effect, HAM by mask value, uniform
    (largest fitting dim, then filled by loss effect) and power law."""
    budget = budget_bytes(tables, fraction, weight_dtype, optimizer)
    caps = {t.name: dim_cap(t.num_embeddings, t.embedding_dim) for t in tables}

    def widths(kept: Mapping[str, Sequence[int]]) -> Dict[str, int]:
        return {n: len(c) for n, c in kept.items()}

    out = {"ham": widths(select_dims(values, tables, fraction, droppable, weight_dtype, optimizer, worth=worth)),
           "ham_mask": widths(select_dims(values, tables, fraction, droppable, weight_dtype, optimizer))}
    if power_law:  # the rules keep every field: only where that is feasible (not after a harmless drop)
        uni = uniform_fit(tables, budget, weight_dtype, optimizer)
        out["uniform"] = uni
        out["uniform_filled"] = select_widths(worth, tables, budget, uni, {n: max(caps[n], uni[n]) for n in caps},
                                              weight_dtype, optimizer)
        out["power_law"] = dict(power_law)
    return out


def check_candidates(score: Callable[[str, Mapping[str, int]], Dict[str, float]], tables: Sequence[EmbeddingBagConfig],
                     candidates: Mapping[str, Mapping[str, int]], weight_dtype: str, optimizer: str) -> CandidateCheck:
    """Scores every candidate (`score(name, dims)` -> validation metrics; equal dims are scored once);
    returns all of them, the winner (best validation AUC, then lower logloss, then fewer bytes) and
    its margin over HAM's own allocation and over the runner-up."""
    rows: List[CandidateScore] = []
    for name, dims in candidates.items():
        same = next((r for r in rows if r.dims == dict(dims)), None)
        m = {"auc": same.valid_auc, "logloss": same.valid_logloss} if same else score(name, dims)
        rows.append(CandidateScore(name=name, dims=dict(dims), kept_bytes=dims_bytes(tables, dims, weight_dtype, optimizer),
                                   valid_auc=round(float(m["auc"]), 6), valid_logloss=round(float(m["logloss"]), 6),
                                   same_as=same.name if same else None))
    ranked = sorted(rows, key=lambda r: (-r.valid_auc, r.valid_logloss, r.kept_bytes))
    win = ranked[0]
    own = next(r for r in rows if r.name == "ham")
    others = [r for r in ranked if r.dims != win.dims]
    return CandidateCheck(candidates=rows, winner=win.name, margin_vs_ham=round(win.valid_auc - own.valid_auc, 6),
                          runner_up=others[0].name if others else None,
                          margin_vs_runner_up=round(win.valid_auc - others[0].valid_auc, 6) if others else None)
