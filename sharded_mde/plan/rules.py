"""Dims from a documented rule instead of a search, for table presets that come without data.

`power_law`: dim_t = min(full_dim_t, floor4(scale * rows_t ** -alpha)), at least 4, with the largest
`scale` whose tables fit the byte budget. This is the mixed-dimension rule of Ginart et al.
("Mixed Dimension Embeddings", 2019) with a field's popularity taken as 1/rows: large
vocabularies get fewer columns. `uniform` is the same rule with alpha = 0 (one dim for all).
"""

from __future__ import annotations

import math
from typing import List

from torchrec import EmbeddingBagConfig

from sharded_mde.dims import DimsFile, InfeasibleBudget, RuleRecord, TableDims, round_to_legal, table_bytes

RULES = ("power_law", "uniform")


def rule_dims(
    full_tables: List[EmbeddingBagConfig],
    rule: str,
    budget_fraction: float,
    alpha: float = 0.3,
    weight_dtype: str = "fp32",
    optimizer: str = "rowwise_adagrad",
) -> DimsFile:
    """A dims file for `full_tables` from `rule` under `budget_fraction` of the full bytes."""
    if rule not in RULES:
        raise ValueError(f"dims rule must be one of {', '.join(RULES)}, got {rule!r}")
    if not 0 < budget_fraction <= 1:
        raise ValueError(f"budget fraction must be in (0, 1], got {budget_fraction}")
    a = alpha if rule == "power_law" else 0.0

    def dims_at(log_scale: float) -> List[int]:
        return [round_to_legal(math.exp(log_scale) * t.num_embeddings ** -a, mode="down", max_dim=t.embedding_dim)
                for t in full_tables]

    def kept(ds: List[int]) -> int:
        return sum(table_bytes(t.num_embeddings, d, weight_dtype, optimizer).total for t, d in zip(full_tables, ds))

    full = kept([t.embedding_dim for t in full_tables])
    budget = int(budget_fraction * full)
    lo, hi = -50.0, 50.0  # log(scale); dims grow monotonically with it
    if kept(dims_at(lo)) > budget:
        raise InfeasibleBudget(f"budget {budget:,} B ({budget_fraction:g} of {full:,}) is below every table at dim 4 "
                         f"({kept(dims_at(lo)):,} B)")
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if kept(dims_at(mid)) <= budget else (lo, mid)
    dims = dims_at(lo)
    tables = [TableDims(name=t.name, features=list(t.feature_names), num_embeddings=t.num_embeddings,
                        full_dim=t.embedding_dim, dim=d, kept_columns=list(range(d)),
                        bytes=table_bytes(t.num_embeddings, d, weight_dtype, optimizer).total)
              for t, d in zip(full_tables, dims)]
    return DimsFile(method=rule, budget_fraction=budget_fraction, budget_bytes=budget, full_bytes=full,
                    kept_bytes=kept(dims), tables=tables, weight_dtype=weight_dtype, optimizer=optimizer,
                    rule=RuleRecord("dim = min(full_dim, floor4(scale * rows ** -alpha)), at least 4", a, math.exp(lo)),
                    extra={"kept_columns": "the first dim columns: a rule sizes tables, it does not pick columns"})
