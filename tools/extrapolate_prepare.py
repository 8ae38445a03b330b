"""Criteo-Terabyte `data prepare` time and memory per process, extrapolated from measured rows/s.

Reads the "ranks" section of docs/bench_prepare.json (`tools/bench_prepare.py --ranks 1,2`: the
distributed prepare of the same input by 1 and by N processes) and writes a markdown table into
docs/plan.md between the markers below: the measured rows/s per process of each pass, and the
projected wall time of Criteo-Terabyte (4,373,472,329 rows in 24 day files, 13 dense + 26
categorical fields) on 1 host x 16 processes and 8 hosts x 16 processes, with peak memory per
process. Extrapolated, not measured; the assumptions are written under the table:
- every process keeps the measured 1-process rows/s times the measured N-process efficiency
  (rows/s of N processes over N times that of 1), at any number of processes (linear scaling);
- uncompressed text is shared by byte ranges, so the work divides evenly; a gzipped file is read
  whole by one rank, so with the 24 files as downloaded (day_N.gz) the busiest rank reads about
  24/P of them (by the shares' own assignment), and gzip's decompression is not in the measured rate;
- counting memory is what the bench measured under data.count_memory_mb (counts beyond it spill,
  so it does not grow with rows); encoding memory grows with the vocabularies every rank loads:
  the bench's 1-process encode RSS plus the bytes per vocabulary entry measured between its small
  and high inputs, times the Criteo-Terabyte vocabularies (configs/tables/criteo_terabyte.yaml,
  MLPerf's sizes under the 40M cap).

    .venv/bin/python tools/extrapolate_prepare.py [--bench docs/bench_prepare.json] [--doc docs/plan.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sharded_mde.data.shares import cut  # noqa: E402

CRITEO_TB_ROWS = 4_373_472_329
CRITEO_TB_FILES = 24  # day_0 .. day_23, taken as equal in size
TABLES = ROOT / "configs" / "tables" / "criteo_terabyte.yaml"
SETUPS = [("1 host x 16", 16), ("8 hosts x 16", 128)]
START, END = "<!-- prepare_extrapolation:start -->", "<!-- prepare_extrapolation:end -->"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h"


def _mb(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def criteo_tb_vocab_entries(tables: Path = TABLES) -> int:
    """Values in the Criteo-Terabyte vocabularies (the MLPerf table sizes)."""
    return sum(int(t["num_embeddings"]) for t in yaml.safe_load(tables.read_text())["tables"])


def busiest_share(files: int, processes: int) -> float:
    """Fraction of equal whole files the busiest of `processes` ranks reads (the prepare's own assignment)."""
    ranks = cut([1.0] * files, processes)
    return max(ranks.count(r) for r in set(ranks)) / files


def extrapolate(bench: Dict[str, Any], entries: int, input_name: str = "high") -> Dict[str, Any]:
    """The measured figures and the projections (seconds, MiB) of every setup, as a dict."""
    ranks = bench["ranks"]
    inputs = ranks["inputs"]
    if input_name not in inputs:
        raise SystemExit(f"extrapolate_prepare: the bench's ranks section has no input {input_name!r} "
                         f"(has {sorted(inputs)}); run tools/bench_prepare.py --ranks 1,2")
    by = inputs[input_name]["by_ranks"]
    n = max(int(k) for k in by)
    one, many = by["1"], by[str(n)]
    per_process = {p: one[p]["rows_per_s"] for p in ("count", "encode")}
    efficiency = {p: many[p]["rows_per_s"] / (n * per_process[p]) for p in ("count", "encode")}
    count_rss = max(max(by[k]["count"]["peak_rss_mb_per_rank"]) for k in by)
    if "small" in inputs and input_name != "small":  # bytes per vocabulary entry: between the two inputs' encodes
        small = inputs["small"]["by_ranks"]["1"]
        per_entry_mb = (one["encode"]["peak_rss_mb_per_rank"][0] - small["encode"]["peak_rss_mb_per_rank"][0]) / \
            max(one["count"]["vocab_entries"] - small["count"]["vocab_entries"], 1)
    else:
        raise SystemExit("extrapolate_prepare: needs the small and high inputs (--ranks-inputs small,high)")
    encode_rss = one["encode"]["peak_rss_mb_per_rank"][0] + per_entry_mb * (entries - one["count"]["vocab_entries"])
    setups = []
    for name, procs in SETUPS:
        rate = {p: procs * per_process[p] * efficiency[p] for p in per_process}
        even = {p: CRITEO_TB_ROWS / rate[p] for p in rate}
        busiest = busiest_share(CRITEO_TB_FILES, procs)
        days = {p: CRITEO_TB_ROWS * busiest / (per_process[p] * efficiency[p]) for p in rate}
        setups.append({"setup": name, "processes": procs, "rows_per_s": rate, "seconds_cut": even,
                       "seconds_day_files": days, "busiest_share_of_day_files": busiest,
                       "encode_rss_mb": encode_rss, "count_rss_mb": count_rss})
    return {"input": input_name, "measured_ranks": n, "rows": one["count"]["rows"], "per_process": per_process,
            "efficiency": efficiency, "count_rss_mb": count_rss, "per_entry_bytes": per_entry_mb * (1 << 20),
            "encode_rss_mb_measured": one["encode"]["peak_rss_mb_per_rank"][0], "bench_entries":
            one["count"]["vocab_entries"], "entries": entries, "setups": setups, "by": by,
            "count_memory_mb": ranks.get("count_memory_mb"), "machine": ranks.get("machine", {}),
            "command": ranks.get("command", "")}


def table(x: Dict[str, Any]) -> str:
    """The markdown section (between the markers)."""
    m = x["machine"]
    lines = [START, "", "Extrapolated, not measured: generated by `tools/extrapolate_prepare.py` from the `ranks` "
             f"section of `docs/bench_prepare.json` (`{x['command']}`; {m.get('cores', '?')} cores, "
             f"{m.get('date', '?')}). Input: the bench's `{x['input']}` file, {x['rows']:,} rows.", "",
             "| | processes | counting rows/s | encoding rows/s | counting | encoding | total | "
             "peak RSS per process (count / encode) |", "|---|---|---|---|---|---|---|---|"]
    for k in sorted(x["by"], key=int):
        r = x["by"][k]
        rss = [_mb(max(r[p]["peak_rss_mb_per_rank"])) for p in ("count", "encode")]
        lines.append(f"| measured | {k} | {r['count']['rows_per_s']:,} | {r['encode']['rows_per_s']:,} | "
                     f"{r['count']['seconds']} s | {r['encode']['seconds']} s | {r['total_seconds']} s | "
                     f"{rss[0]} / {rss[1]} |")
    for s in x["setups"]:
        for label, key in (("day files uncompressed", "seconds_cut"), ("day_N.gz as downloaded", "seconds_day_files")):
            t = s[key]
            lines.append(f"| Criteo-TB, {s['setup']}, {label} | {s['processes']} | "
                         f"{s['rows_per_s']['count']:,.0f} | {s['rows_per_s']['encode']:,.0f} | "
                         f"{_hours(t['count'])} | {_hours(t['encode'])} | {_hours(t['count'] + t['encode'])} | "
                         f"{_mb(s['count_rss_mb'])} / {_mb(s['encode_rss_mb'])} |")
    eff = x["efficiency"]
    lines += ["", f"- Rows/s per process: the 1-process figures ({x['per_process']['count']:,} counting, "
              f"{x['per_process']['encode']:,} encoding), times the measured {x['measured_ranks']}-process "
              f"efficiency ({eff['count']:.2f} counting, {eff['encode']:.2f} encoding: rows/s of "
              f"{x['measured_ranks']} processes over {x['measured_ranks']} x 1 process), assumed to hold at 16 and "
              f"128 processes (linear scaling; not measured beyond {x['measured_ranks']}).",
              f"- Criteo-TB: {CRITEO_TB_ROWS:,} rows in {CRITEO_TB_FILES} day files taken as equal. Uncompressed "
              "text is shared by byte ranges (the work divides evenly); a gzipped file is read whole by one rank, "
              "so with the day_N.gz files as downloaded the busiest rank reads "
              + ", ".join(f"{s['busiest_share_of_day_files'] * CRITEO_TB_FILES:.0f} of {CRITEO_TB_FILES} "
                          f"({s['setup']})" for s in x["setups"])
              + ", and gzip's decompression is not in the measured rate (so those times are lower bounds).",
              f"- Peak RSS per process: counting as measured with `data.count_memory_mb: {x['count_memory_mb']}` "
              "(counts beyond it spill to disk, so it does not grow with rows); encoding: every process loads every "
              f"vocabulary: the measured 1-process encoding RSS ({_mb(x['encode_rss_mb_measured'])} at "
              f"{x['bench_entries']:,} vocabulary values) plus {x['per_entry_bytes']:.0f} bytes per value (measured "
              f"between the bench's small and high inputs) for Criteo-TB's {x['entries']:,} values "
              "(configs/tables/criteo_terabyte.yaml); a host of 16 processes needs 16 times that "
              f"({_mb(16 * x['setups'][0]['encode_rss_mb'])}). Not in the counting figure: the rank that builds a "
              "field's vocabulary (each field is built by one rank) holds up to twice `max_vocab` values of it "
              "(80M at Criteo-TB's 40M cap).", "", END]
    return "\n".join(lines)


def write_section(doc: Path, text: str) -> None:
    """Replaces the text between the markers of `doc` (appends a section with them when missing)."""
    body = doc.read_text()
    if START in body and END in body:
        body = body[:body.index(START)] + text + body[body.index(END) + len(END):]
    else:
        body = body.rstrip("\n") + "\n\n## Preparing Criteo-Terabyte on many processes\n\n" + text + "\n"
    doc.write_text(body)


def main(argv: List[str] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bench", default=str(ROOT / "docs" / "bench_prepare.json"))
    p.add_argument("--doc", default=str(ROOT / "docs" / "plan.md"), help="markdown file to update ('' = print only)")
    p.add_argument("--input", default="high", help="which bench input's rows/s to extrapolate")
    args = p.parse_args(argv)
    bench = json.loads(Path(args.bench).read_text())
    if "ranks" not in bench:
        raise SystemExit(f"extrapolate_prepare: {args.bench} has no ranks section; run "
                         "tools/bench_prepare.py --ranks 1,2 first")
    text = table(extrapolate(bench, criteo_tb_vocab_entries(), args.input))
    print(text)
    if args.doc:
        write_section(Path(args.doc), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
