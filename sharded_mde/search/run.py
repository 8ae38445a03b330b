"""Runs the search that `search.method` names (the registry: `sharded_mde.dims.methods`), with the planted ranks of synthetic data."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from sharded_mde.config import CAPS, RunConfig
from sharded_mde.dims import DimsFile
from sharded_mde.search.registry import search_function
from sharded_mde.train.distributed import DistEnv


def planted_ranks(cfg: RunConfig) -> Optional[Dict[str, int]]:
    """Planted rank per feature when the data is synthetic with a ground truth, else None."""
    from sharded_mde.data.synth import load_ground_truth

    truth = load_ground_truth(Path(cfg.data.dir) / "ground_truth.json")
    return {f: int(r) for f, r in truth["ranks"].items()} if truth else None


def run_search(cfg: RunConfig, env: DistEnv, stage: Optional[str] = None) -> DimsFile:
    """Runs the search named by `cfg.search.method` in `<run_dir>/<stage or method>/`.

    Args:
        cfg (RunConfig): the run config.
        env (DistEnv): this process's rank and world.
        stage (Optional[str]): the stage directory (default: the method name).

    Example::

        dims = run_search(cfg, env)  # writes <run_dir>/ham/dims.json (search.budget: caps adds the plan, search/caps.py)
    """
    if cfg.search.budget == CAPS:  # the plan section's per-rank caps as the constraint (HAM only)
        from sharded_mde.search.caps import run_ham_caps

        return run_ham_caps(cfg, env, stage or cfg.search.method, planted_ranks(cfg))
    search = search_function(cfg.search.method)
    return search(cfg, env, stage or cfg.search.method, planted_ranks(cfg))
