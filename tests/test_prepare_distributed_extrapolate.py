"""tools/extrapolate_prepare.py: projections follow the stated assumptions, and only the marked section changes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import extrapolate_prepare as ex  # noqa: E402


def _run(rows_per_s_count: int, rows_per_s_encode: int, rss: float, entries: int) -> dict:
    return {"count": {"rows": 1000, "seconds": 1.0, "rows_per_s": rows_per_s_count, "peak_rss_mb_per_rank": [rss],
                      "vocab_entries": entries},
            "encode": {"rows": 1000, "seconds": 1.0, "rows_per_s": rows_per_s_encode, "peak_rss_mb_per_rank": [rss]},
            "total_seconds": 2.0}


def bench() -> dict:
    """1 process: 100k rows/s counting, 200k encoding; 2 processes 1.6x, 1.8x; RSS 500 MiB + 100 MiB per 1M values."""
    high1, small1 = _run(100_000, 200_000, 600.0, 1_000_000), _run(100_000, 200_000, 500.0, 0)
    high2 = _run(160_000, 360_000, 400.0, 1_000_000)
    high2["count"]["peak_rss_mb_per_rank"] = [400.0, 700.0]
    return {"ranks": {"command": "tools/bench_prepare.py --ranks 1,2", "count_memory_mb": 512, "machine": {},
                      "inputs": {"high": {"by_ranks": {"1": high1, "2": high2}},
                                 "small": {"by_ranks": {"1": small1, "2": small1}}}}}


def test_projection_follows_the_assumptions() -> None:
    x = ex.extrapolate(bench(), entries=3_000_000)
    assert x["efficiency"] == pytest.approx({"count": 0.8, "encode": 0.9})
    host, hosts = x["setups"]
    assert host["rows_per_s"]["count"] == pytest.approx(16 * 100_000 * 0.8)
    assert host["seconds_cut"]["encode"] == pytest.approx(ex.CRITEO_TB_ROWS / (16 * 200_000 * 0.9))
    # 24 gzipped day files, each read whole: on 16 ranks the busiest reads 2 of them; on 128 ranks 1
    assert host["busiest_share_of_day_files"] == pytest.approx(2 / 24)
    assert hosts["busiest_share_of_day_files"] == pytest.approx(1 / 24)
    assert hosts["seconds_day_files"]["count"] == pytest.approx(ex.CRITEO_TB_ROWS / 24 / (100_000 * 0.8))
    assert x["count_rss_mb"] == 700.0  # the largest rank's
    assert host["encode_rss_mb"] == pytest.approx(600.0 + 100.0 * 2)  # 100 MiB per 1M values, 2M more values


def test_section_between_markers_is_replaced(tmp_path: Path) -> None:
    doc = tmp_path / "plan.md"
    doc.write_text(f"# Plan\n\nbefore\n\n{ex.START}\nOLD TABLE\n{ex.END}\n\nafter\n")
    text = ex.table(ex.extrapolate(bench(), entries=ex.criteo_tb_vocab_entries()))
    ex.write_section(doc, text)
    body = doc.read_text()
    assert body.startswith("# Plan\n\nbefore\n\n") and body.endswith("\n\nafter\n") and "OLD TABLE" not in body
    assert body.count(ex.START) == 1 and "Extrapolated, not measured" in body and "| Criteo-TB, 8 hosts x 16, day files uncompressed |" in body
    assert ex.criteo_tb_vocab_entries() > 180_000_000  # MLPerf's 26 tables, C1 alone 39.9M
