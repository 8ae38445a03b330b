"""The search methods' functions, imported on use from the registry (`sharded_mde.dims.methods`)."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Iterable

from sharded_mde.dims.methods import METHODS, SEARCH_METHODS


def _load(target: str) -> Callable[..., Any]:
    """The function named by a registry target "module:function"."""
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def search_function(method: str) -> Callable[..., Any]:
    """The search of `method` (`fn(cfg, env, stage, ranks) -> DimsFile`); ValueError naming the known ones."""
    check_search_methods([method])
    return _load(METHODS[method].search)


def compact_builder(method: str, where: str = "dims file") -> Callable[..., Any]:
    """Retrain's builder of the compact model of a dims file written by `method`; ValueError naming `where`."""
    if method not in METHODS:
        raise ValueError(f"{where}: no retrain builder for method {method!r} (known: {', '.join(METHODS)})")
    return _load(METHODS[method].compact)


def check_search_methods(methods: Iterable[str]) -> None:
    """Raises one ValueError naming the first of `methods` that is no `search.method` (before any work starts)."""
    for m in methods:
        if m not in SEARCH_METHODS:
            raise ValueError(f"search method {m!r} is not available (known: {', '.join(SEARCH_METHODS)})")
