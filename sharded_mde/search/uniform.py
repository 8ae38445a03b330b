"""The uniform-dimension baseline: one legal dim for every table, at the search's byte budget.

It takes the largest legal dim whose bytes fit the budget, so like every method it never keeps more
bytes than the budget. A budget below every table at dim 4 is infeasible, as for every field-wise method.
Every table keeps its first `dim` columns; it trains from scratch in `retrain`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

from torchrec import EmbeddingBagConfig

from sharded_mde.config import RunConfig
from sharded_mde.dims import DIM_MULTIPLE, DimsFile, budget_bytes, check_feasible, dims_bytes
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.budget import make_dims_file
from sharded_mde.search.report import save_search_result
from sharded_mde.train.distributed import DistEnv

WEIGHT_DTYPE = "fp32"


def uniform_fit(tables: Sequence[EmbeddingBagConfig], budget: int, weight_dtype: str = WEIGHT_DTYPE,
                optimizer: str = "rowwise_adagrad", multiple: int = DIM_MULTIPLE) -> Dict[str, int]:
    """Per table, the largest uniform dim (each table at most its full dim) whose bytes fit `budget` bytes
    (every table at `multiple` columns where even that does not fit)."""
    best = {t.name: min(multiple, t.embedding_dim) for t in tables}
    for d in range(multiple, max(t.embedding_dim for t in tables) + 1, multiple):
        dims = {t.name: min(d, t.embedding_dim) for t in tables}
        if dims_bytes(tables, dims, weight_dtype, optimizer) > budget:
            break
        best = dims
    return best


def uniform_dim(tables: Sequence[EmbeddingBagConfig], fraction: float, optimizer: str = "rowwise_adagrad") -> int:
    """The largest multiple of 4 whose bytes (every table at min(dim, its full dim)) fit the budget.

    A budget below every table at dim 4 is InfeasibleBudget (`check_feasible`, the rule all field-wise methods share).
    """
    check_feasible(tables, fraction, WEIGHT_DTYPE, optimizer, method="uniform")
    return max(uniform_fit(tables, budget_bytes(tables, fraction, WEIGHT_DTYPE, optimizer), WEIGHT_DTYPE, optimizer).values())


def uniform_dims(tables: Sequence[EmbeddingBagConfig], fraction: float, optimizer: str = "rowwise_adagrad") -> DimsFile:
    """The uniform baseline's dims file (method "uniform")."""
    d = uniform_dim(tables, fraction, optimizer)
    kept = {t.name: list(range(min(d, t.embedding_dim))) for t in tables}
    return make_dims_file("uniform", tables, kept, fraction, WEIGHT_DTYPE, optimizer, {"uniform_dim": d})


def run_uniform(cfg: RunConfig, env: DistEnv, stage: str = "uniform", ranks: Optional[Dict[str, int]] = None) -> DimsFile:
    """Writes the uniform baseline's dims file and PNG to `<run_dir>/<stage>/` (no training)."""
    dims = uniform_dims(full_table_configs(cfg), cfg.search.budget, cfg.train.embedding_optimizer)
    if env.is_main:
        save_search_result(Path(cfg.run_dir) / stage, dims, None, ranks)
    return dims
