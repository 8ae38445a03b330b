"""Shared helpers of the benchmarks (`sharded-mde bench`, tools/): machine description, medians, saving results."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from sharded_mde.io import atomic_write_json


def machine_info() -> Dict[str, Any]:
    """What the figures were measured on: CPU, cores, device, library versions."""
    import fbgemm_gpu
    import torchrec

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchrec": getattr(torchrec, "__version__", "?"),
        "fbgemm_gpu": getattr(fbgemm_gpu, "__version__", "?"),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def save_results(path: str | Path, name: str, results: Dict[str, Any]) -> Dict[str, Any]:
    """Writes `{"benchmark", "machine", "results"}` as JSON atomically and returns it."""
    doc = {"benchmark": name, "machine": machine_info(), "results": results}
    atomic_write_json(path, doc)
    return doc
