"""sharded_mde: find how many embedding columns each field needs, then plan, shard and export compact tables.

The public API (`__all__`, listed with examples in docs/api.md) is importable from the package:
`from sharded_mde import MaskedEmbeddingBagCollection, BudgetedSearch`. Names load on first use, so
`import sharded_mde` stays cheap for the command line and a broken optional part fails only when used.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List

__version__ = "0.1.0"

# public name -> the module that defines it
_API: Dict[str, str] = {
    # search-time modules (drop-in for TorchRec's EmbeddingBagCollection)
    "MaskedEmbeddingBagCollection": "sharded_mde.modules.masked_ebc",
    "TokenGroupEBC": "sharded_mde.modules.token_groups",
    "build_token_group_ebc": "sharded_mde.modules.token_groups",
    # the budgeted search: a hook for your own loop, and its adapter for this project's trainer
    "BudgetedSearch": "sharded_mde.search.budget",
    "BudgetController": "sharded_mde.search.budget",
    # the dims file and the mixed-dim tables and heads it gives
    "DimsFile": "sharded_mde.dims",
    "load_dims": "sharded_mde.dims",
    "save_dims": "sharded_mde.dims",
    "plan_tables": "sharded_mde.plan.tables",
    "MixedDimDLRM": "sharded_mde.modules.heads",
    "MixedDimDCN": "sharded_mde.modules.heads",
    # sharding plans and the memory report
    "plan_sharding": "sharded_mde.plan.sharding",
    "manual_plan": "sharded_mde.plan.sharding",
    "memory_report": "sharded_mde.plan.report",
    "render_markdown": "sharded_mde.plan.report",
    # compact export and serving
    "export_compact": "sharded_mde.export.export",
    "load_export": "sharded_mde.export.load",
}

__all__: List[str] = list(_API)


def __getattr__(name: str) -> Any:
    """Loads a public name from its module on first use (PEP 562)."""
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'sharded_mde' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(list(globals()) + __all__)
