"""Benchmarks: shared helpers (machine description, medians, saving results) and `sharded-mde bench`."""

from sharded_mde.bench.common import machine_info, median_time, save_results

__all__ = ["machine_info", "median_time", "save_results"]
