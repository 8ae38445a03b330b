"""tools/bench_prepare.py --ranks 1,2 on tiny files: every pass runs on 1 and 2 torchrun ranks, the 2-rank
vocabularies and splits are the 1-rank ones, and the other keys of the JSON stay."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_ranks_tiny_run(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    out.write_text(json.dumps({"summary": {"kept": True}}))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_prepare.py"), "--rows", "6000",
                           "--high-fields", "2", "--high-vocab", "6000", "--small-vocab", "100", "--count-memory-mb",
                           "1", "--work", str(tmp_path / "w"), "--ranks", "1,2", "--ranks-inputs", "high", "--out", str(out)],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = json.loads(out.read_text())
    assert report["summary"] == {"kept": True}  # the single-process figures are left alone
    by = report["ranks"]["inputs"]["high"]["by_ranks"]
    two = by["2"]
    assert two["vocabularies_identical_to_1_rank"] is True and two["splits_identical_to_1_rank"] is True
    assert by["1"]["count"]["rows"] == two["encode"]["rows"] == 6000
    assert by["1"]["count"]["vocab_entries"] == two["count"]["vocab_entries"] > 6000  # 2 fields of many values
    assert len(two["count"]["peak_rss_mb_per_rank"]) == 2 and two["speedup_over_1_rank"]["total"] > 0
