"""tools/bench_prepare.py on a tiny file: every pass runs, bounded counting spills and agrees, DuckDB agrees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import bench_prepare  # noqa: E402


def test_bench_prepare_tiny_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_prepare.py"), "--rows", "20000",
                           "--high-fields", "2", "--high-vocab", "20000", "--small-vocab", "100",
                           "--count-memory-mb", "1", "--duckdb-memory-mb", "256", "--old-rows", "1000", "--repeats", "2", "--work", str(tmp_path / "w"),
                           "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = json.loads(out.read_text())
    summary, passes = report["summary"], report["passes"]
    assert summary["bounded_vocabularies_identical_to_unbounded"] is True
    assert passes["count_high"]["field_spills"] > 0 and passes["count_high_unbounded"]["field_spills"] == 0
    assert passes["encode_high"]["rows"] == passes["count_high"]["rows"] == 20000
    assert passes["encode_high"]["side_by_side"]["ids_identical"] is True
    assert len(passes["encode_small"]["runs_rows_per_s"]) == 2
    assert min(summary["high_fields_distinct_values"]) > 1000  # the high file's fields have many values
    assert summary["count_high_distinct_values_match_duckdb"] is True  # duckdb is in the bootstrap's packages
    assert report["machine"]["load_average"] and report["files"]["high"]["bytes"] > 0


def test_bench_prepare_says_when_duckdb_is_missing(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "duckdb", None)  # import duckdb now raises ImportError
    got = bench_prepare.child_duckdb(str(tmp_path / "none.tsv"), 64, str(tmp_path))
    assert got == {"error": bench_prepare.DUCKDB_MISSING} and "not installed" in got["error"]
