"""The power-law baseline (the DLRM "mixed dimension embeddings" rule), met exactly at the byte budget.

The ideal dim of table t is x_t = min(full_dim_t, scale * rows_t ** -alpha) (`search.power_law_alpha`), with the
scale of `plan/rules.py`'s power_law rule (the largest whose floor-to-4 dims fit the budget).
Legal dims come from `select_dims` with column values (x_t - c + max full dim) x (bytes of a
column of t): from 4 columns per table it adds the step most below its table's ideal dim while
one still fits, up to the table's row cap. Every table keeps at least 4 columns (the shared
feasibility rule), its first `dim` ones; it trains from scratch in `retrain`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from torchrec import EmbeddingBagConfig

from sharded_mde.config import RunConfig
from sharded_mde.dims import DimsFile, RuleRecord, check_feasible, column_cost
from sharded_mde.plan.rules import rule_dims
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.budget import make_dims_file, select_dims
from sharded_mde.search.report import save_search_result
from sharded_mde.train.distributed import DistEnv

WEIGHT_DTYPE = "fp32"


def power_law_dims(tables: Sequence[EmbeddingBagConfig], fraction: float, alpha: float = 0.3,
                   optimizer: str = "rowwise_adagrad") -> DimsFile:
    """The power-law baseline's dims file (method "power_law") at `fraction` of the full bytes."""
    check_feasible(tables, fraction, WEIGHT_DTYPE, optimizer, method="power_law")
    scale = rule_dims(list(tables), "power_law", fraction, alpha, WEIGHT_DTYPE, optimizer).rule.scale
    ideal = {t.name: min(float(t.embedding_dim), scale * t.num_embeddings ** -alpha) for t in tables}
    # value per byte of column c: x_t - c, shifted by the widest table so that every value is
    # positive and the columns above x_t keep their order (nearest above the ideal dim first)
    shift = max(t.embedding_dim for t in tables)
    values = {t.name: (ideal[t.name] + shift - torch.arange(t.embedding_dim, dtype=torch.float64))
              * column_cost(t.num_embeddings, WEIGHT_DTYPE, optimizer) for t in tables}
    kept = select_dims(values, tables, fraction, (), WEIGHT_DTYPE, optimizer)
    rule = RuleRecord("dim ~ scale * rows ** -alpha, legal dims by select_dims at the budget (docs/baselines.md)",
                      alpha, scale)
    return make_dims_file("power_law", tables, kept, fraction, WEIGHT_DTYPE, optimizer,
                          {"ideal_dims": {n: round(x, 3) for n, x in ideal.items()}}, rule=rule)


def run_power_law(cfg: RunConfig, env: DistEnv, stage: str = "power_law",
                  ranks: Optional[Dict[str, int]] = None) -> DimsFile:
    """Writes the power-law baseline's dims file and PNG to `<run_dir>/<stage>/` (no training)."""
    dims = power_law_dims(full_table_configs(cfg), cfg.search.budget, cfg.search.power_law_alpha,
                          cfg.train.embedding_optimizer)
    if env.is_main:
        save_search_result(Path(cfg.run_dir) / stage, dims, None, ranks)
    return dims
