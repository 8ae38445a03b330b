"""Serving throughput of exports side by side: the same requests, the same serving path, alternating order.

Used by `sharded-mde bench speed` (full vs compact) and tools/bench_serving.py (any two exports).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Dict, List

import torch

from sharded_mde.export import load_export, read_manifest, script, serving_bytes
from sharded_mde.export.serve import Request, score
from sharded_mde.train.metrics import classification_metrics


def bench_dtype(exports: Dict[str, Path], dtype: str, requests: List[Request], device: torch.device, repeats: int,
                row_alignment: int, scripted: bool) -> Dict[str, Any]:
    """Examples/s of two exports at `dtype` over `repeats` interleaved passes, with AUC, bytes and the ratios (first / second)."""
    models = {}
    for name, root in exports.items():
        model = load_export(root, dtype, row_alignment, device)
        models[name] = script(model) if scripted else model
        score(models[name], requests[:2], device)  # warm-up
    rates: Dict[str, List[float]] = {name: [] for name in exports}
    quality: Dict[str, Dict[str, float]] = {}
    for r in range(repeats):
        order = list(exports) if r % 2 == 0 else list(exports)[::-1]
        for name in order:
            logits, labels, seconds = score(models[name], requests, device)
            rates[name].append(labels.numel() / seconds)
            quality.setdefault(name, classification_metrics(logits, labels))
    names = list(exports)
    out: Dict[str, Any] = {}
    for name, root in exports.items():
        manifest = read_manifest(root)
        out[name] = {"export": str(root), "examples_per_s_median": statistics.median(rates[name]),
                     "examples_per_s": rates[name], "auc": quality[name]["auc"], "logloss": quality[name]["logloss"],
                     "rows": quality[name]["rows"], "serving_table_bytes": serving_bytes(manifest, dtype, row_alignment)}
    a, b = names
    out["ratio_median"] = out[a]["examples_per_s_median"] / out[b]["examples_per_s_median"]
    out["ratio_per_repeat_median"] = statistics.median(x / y for x, y in zip(rates[a], rates[b]))
    out["bytes_ratio"] = out[a]["serving_table_bytes"] / out[b]["serving_table_bytes"]
    return out
