"""The registry of search methods: the one list that config validation, the CLI, bench, pipeline and retrain read.

A method's name is what `search.method` selects and what its dims file records as `method`. Its
search and its compact-model builder are named as "module:function" strings and imported on use
(`sharded_mde.search.registry`), so this module sits at the bottom with the rest of the shared
vocabulary (the config validates against it) and `sharded-mde --help` imports no search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple


@dataclass(frozen=True)
class SearchMethod:
    """One dimension search, or a dims file's method that only retrain knows.

    Args:
        name (str): the `search.method` value and the dims file's `method`.
        search (str): "module:function" of `fn(cfg, env, stage, ranks) -> DimsFile`; "" where no
            `search.method` runs it (the dims file is written by a tool).
        compact (str): "module:function" of retrain's builder of the compact model of its dims file,
            `fn(cfg, dims, full_tables, meta) -> (model, tables, warm_start)`.
        summary (str): one line for docs and errors.
        budget (str): what `search.budget` is a fraction of: "train" (weights + optimizer state) or
            "serving" (the fp32 serving bytes; the dims file's `extra["serving"]` holds its figures).

    Example::

        METHODS["ham"].search  # "sharded_mde.search.ham:run_ham"
    """

    name: str
    search: str
    compact: str
    summary: str
    budget: str = "train"


_COLUMNS = "sharded_mde.search.retrain:compact_ham"  # column-kept dims: the kept columns of each full table

# in the order bench runs and reports them
METHODS: Dict[str, SearchMethod] = {m.name: m for m in (
    SearchMethod("ham", "sharded_mde.search.ham:run_ham", _COLUMNS, "field-wise hard masks under the budget (docs/ham.md)"),
    SearchMethod("uniform", "sharded_mde.search.uniform:run_uniform", _COLUMNS,
                 "every table at the largest legal dim that fits (docs/baselines.md)"),
    SearchMethod("power_law", "sharded_mde.search.power_law:run_power_law", _COLUMNS,
                 "dim proportional to rows ** -alpha (docs/baselines.md)"),
    SearchMethod("magnitude", "sharded_mde.search.magnitude:run_magnitude", _COLUMNS,
                 "the trained full model's column norms (docs/baselines.md)"),
    SearchMethod("saliency", "sharded_mde.search.saliency:run_saliency", _COLUMNS,
                 "the trained full model's column saliency (docs/baselines.md)"),
    SearchMethod("pme", "sharded_mde.search.pme:run_pme", "sharded_mde.search.pme:compact_pme",
                 "token-wise sizes, one table per (field, size) group (docs/pme.md)"),
    SearchMethod("dims", "sharded_mde.search.precision:run_dims", _COLUMNS,
                 "HAM's column signal, every table fp32, under the serving-byte budget (docs/precision.md)",
                 "serving"),
    SearchMethod("precision", "sharded_mde.search.precision:run_precision", _COLUMNS,
                 "one uniform dim and one serving dtype for every table (docs/precision.md)", "serving"),
    SearchMethod("joint", "sharded_mde.search.precision:run_joint", _COLUMNS,
                 "dim and serving dtype per table, exact knapsack under the serving-byte budget "
                 "(docs/precision.md)", "serving"),
    SearchMethod("joint_pme", "sharded_mde.search.precision_pme:run_joint_pme", "sharded_mde.search.pme:compact_pme",
                 "PME's token groups, each group table at its own dim and serving dtype, exact knapsack under the "
                 "serving-byte budget (docs/precision.md)", "serving"),
    SearchMethod("planted_oracle", "", _COLUMNS, "the planted ranks' dims, written by tools/planted_oracle.py"),
)}

# the values of `search.method` (every method with a search), in bench order
SEARCH_METHODS: Tuple[str, ...] = tuple(m.name for m in METHODS.values() if m.search)
