"""Rows/s and peak memory of `prepare`'s counting and encoding passes, beside DuckDB counting the same file.

Writes two Criteo-format TSV files with the generator of `sharded-mde data synth --format tsv`
(13 dense, 26 categorical fields): `small`, every vocabulary at most --small-vocab values, and
`high`, --high-fields fields drawn from --high-vocab values each (over a million distinct values
per field at 4M rows). Each pass runs in a fresh process (its own peak RSS), with the whole input
in the train split (so vocabulary sizes can be checked against DuckDB's distinct counts):
- count: `prepare_vocabs` (read, count, build and save the vocabularies), on `high` both with the
  memory bound --count-memory-mb and without one (the vocabularies must be identical);
- encode: `prepare` reusing those vocabularies (read, encode, write the Parquet splits), with the
  seconds inside `Encoder.encode`, --repeats times per file alternating small/high (the fastest run
  reported, every run's rows/s beside it); in the first run, on its first --old-rows rows, also the
  encoding as it was before the persistent index (`pc.index_in` over the whole vocabulary per
  block), side by side;
- duckdb: one GROUP BY over the unpivoted categorical columns of the same file, with DuckDB's
  memory limit set to the same bound (--duckdb-memory-mb to change it) and one thread (the
  counting pass is one thread too).
Writes docs/bench_prepare.json (--out) and prints it. Timings on a loaded machine: compare the
ratios of one run, not absolute figures across runs.

With --ranks 1,2 it measures instead the distributed prepare (`data prepare` under torchrun): each
file of --ranks-inputs (one TSV file, which the ranks share by byte ranges) counted and then
encoded by 1 rank and by 2 ranks (`torchrun --nproc_per_node N`, each pass in fresh processes):
rows/s of each pass and in total, peak RSS of every rank, the speedup over 1 rank, and whether the
vocabularies (bytes) and splits (a digest of every column, rows in order) are the 1-rank ones. It updates only the "ranks" key of --out; the default run keeps that key.

    .venv/bin/python tools/bench_prepare.py --rows 4000000 --work /tmp/bench_prepare
    .venv/bin/python tools/bench_prepare.py --rows 4000000 --work /tmp/bench_prepare --ranks 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUM_DENSE, NUM_SPARSE = 13, 26
DUCKDB_MISSING = "duckdb is not installed (.venv/bin/python -m pip install duckdb): no DuckDB comparison"


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _data_config(tsv: str, out: str, memory_mb: int):
    from sharded_mde.config import DataConfig

    return DataConfig(format="criteo_tsv", paths=[tsv], dir=out, split=[1.0, 0.0, 0.0], count_memory_mb=memory_mb)


def child_count(tsv: str, out: str, memory_mb: int) -> Dict[str, Any]:
    """The counting pass alone (read, count, build and save the vocabularies)."""
    from sharded_mde.data.prepare import VOCAB_DONE, prepare_vocabs
    from sharded_mde.data.vocab import ValueCounter

    spills = []
    real_spill = ValueCounter._spill
    ValueCounter._spill = lambda self, f: (spills.append(f), real_spill(self, f))[1]  # counts the spills
    start_rss = _peak_rss_mb()
    t0 = time.perf_counter()
    sizes = prepare_vocabs(_data_config(tsv, out, memory_mb), progress=False)
    seconds = time.perf_counter() - t0
    rows = json.loads((Path(out) / VOCAB_DONE).read_text())["rows"]
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
            "count_memory_mb": memory_mb, "field_spills": len(spills), "peak_rss_mb": _peak_rss_mb(),
            "rss_after_imports_mb": start_rss, "vocab_sizes": sizes}


def _old_encode(values, column):
    """The encoding before the persistent index: Arrow rebuilt the vocabulary's hash table per call."""
    import numpy as np
    import pyarrow.compute as pc

    found = pc.index_in(column, value_set=values)
    ids = pc.fill_null(pc.add(found.cast("int32"), 2), 1)
    return pc.if_else(pc.is_null(column), 0, ids).to_numpy(zero_copy_only=False).astype(np.int32)


def child_encode(tsv: str, out: str, old_rows: int) -> Dict[str, Any]:
    """The encoding pass (`prepare` reusing the saved vocabularies), then old vs new encoding side by side."""
    import numpy as np
    import pyarrow as pa

    from sharded_mde.data.encode import Encoder
    from sharded_mde.data.meta import META_FILE
    from sharded_mde.data.prepare import prepare
    from sharded_mde.data.readers import SourceReader

    spent = [0.0]
    real_encode = Encoder.encode

    def timed_encode(self, table):
        t = time.perf_counter()
        try:
            return real_encode(self, table)
        finally:
            spent[0] += time.perf_counter() - t

    Encoder.encode = timed_encode
    (Path(out) / META_FILE).unlink(missing_ok=True)  # a rerun must write again (it reuses the vocabularies)
    t0 = time.perf_counter()
    meta = prepare(_data_config(tsv, out, 0), progress=False)
    seconds = time.perf_counter() - t0
    Encoder.encode = real_encode
    rows = sum(meta.rows.values())
    result = {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
              "encode_seconds": round(spent[0], 2), "encode_rows_per_s": round(rows / spent[0]),
              "peak_rss_mb": _peak_rss_mb()}
    if old_rows:
        encoder = Encoder.load(out)
        for vocab in encoder.vocabs.values():  # builds each index once, as the pass above did, untimed
            vocab.encode(pa.array([], pa.string()))
        new_s = old_s = 0.0
        done = 0
        for table in SourceReader("criteo_tsv", [tsv]):
            t = time.perf_counter()
            new = [encoder.vocabs[f].encode(table.column(f)) for f in encoder.schema.sparse]
            new_s += time.perf_counter() - t
            t = time.perf_counter()
            old = [_old_encode(encoder.vocabs[f].values, table.column(f)) for f in encoder.schema.sparse]
            old_s += time.perf_counter() - t
            if not all(np.array_equal(a, b) for a, b in zip(new, old)):
                raise SystemExit("bench_prepare: the new encoding differs from the old one")
            done += table.num_rows
            if done >= old_rows:
                break
        result["side_by_side"] = {"rows": done, "categorical_fields_only": True, "ids_identical": True,
                                  "new_rows_per_s": round(done / new_s), "old_rows_per_s": round(done / old_s),
                                  "speedup": round(old_s / new_s, 1)}
    return result


def child_duckdb(tsv: str, memory_mb: int, temp_dir: str) -> Dict[str, Any]:
    """DuckDB counting every categorical value of the file: distinct values per field."""
    try:
        import duckdb
    except ImportError:
        return {"error": DUCKDB_MISSING}
    cols = {"label": "INTEGER", **{f"I{i + 1}": "BIGINT" for i in range(NUM_DENSE)},
            **{f"C{i + 1}": "VARCHAR" for i in range(NUM_SPARSE)}}
    sparse = ", ".join(f"C{i + 1}" for i in range(NUM_SPARSE))
    con = duckdb.connect()
    con.execute(f"SET threads = 1; SET memory_limit = '{memory_mb}MB'; SET temp_directory = '{temp_dir}'")
    columns = "{" + ", ".join(f"'{k}': '{v}'" for k, v in cols.items()) + "}"
    query = (f"SELECT name, count(*), sum(n) FROM (SELECT name, value, count(*) AS n FROM (UNPIVOT (SELECT {sparse} "
             f"FROM read_csv('{tsv}', delim='\\t', header=false, quote='', escape='', columns={columns})) "
             f"ON {sparse} INTO NAME name VALUE value) GROUP BY name, value) GROUP BY name")
    start_rss = _peak_rss_mb()
    t0 = time.perf_counter()
    try:
        got = con.execute(query).fetchall()
    except duckdb.Error as e:  # e.g. out of memory under the bound: reported, not fatal
        return {"error": f"duckdb {duckdb.__version__}: {str(e).splitlines()[0]}", "memory_limit_mb": memory_mb}
    seconds = time.perf_counter() - t0
    rows = con.execute(f"SELECT count(*) FROM read_csv('{tsv}', delim='\\t', header=false, quote='', escape='', "
                       f"columns={columns})").fetchone()[0]
    return {"rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
            "duckdb": duckdb.__version__, "threads": 1, "memory_limit_mb": memory_mb,
            "peak_rss_mb": _peak_rss_mb(), "rss_after_imports_mb": start_rss,
            "vocab_sizes": {name: int(n) for name, n, _ in sorted(got, key=lambda r: int(r[0][1:]))}}


def child_dist(kind: str, tsv: str, out: str, memory_mb: int) -> Optional[Dict[str, Any]]:
    """One pass of the distributed prepare on this torchrun rank (count: the vocabularies; encode: the splits,
    reusing them); rank 0 returns the pass's rows/s over all ranks and every rank's peak RSS."""
    import torch.distributed as dist

    from sharded_mde.data.group import TorchGroup
    from sharded_mde.data.meta import META_FILE
    from sharded_mde.data.prepare import VOCAB_DONE, prepare, prepare_vocabs
    from sharded_mde.train.distributed import init_distributed, shutdown_distributed

    env = init_distributed(prefer_cuda=False)
    group = TorchGroup()
    cfg = _data_config(tsv, out, memory_mb)
    if kind == "encode" and env.is_main:
        (Path(out) / META_FILE).unlink(missing_ok=True)  # a rerun must write again (it reuses the vocabularies)
    dist.barrier()
    t0 = time.perf_counter()
    if kind == "count":
        sizes = prepare_vocabs(cfg, progress=False, group=group)
    else:
        meta = prepare(cfg, progress=False, group=group)
    dist.barrier()
    seconds = time.perf_counter() - t0
    rss = group.gather(_peak_rss_mb())
    shutdown_distributed(wait_for_peers=True)
    if not env.is_main:
        return None
    if kind == "count":
        rows = json.loads((Path(out) / VOCAB_DONE).read_text())["rows"]
        extra = {"count_memory_mb": memory_mb, "vocab_entries": sum(sizes.values())}
    else:
        rows, extra = sum(meta.rows.values()), {}
    return {"ranks": env.world_size, "rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds),
            "rows_per_s_per_rank": round(rows / seconds / env.world_size), "peak_rss_mb_per_rank": rss, **extra}


def _split_digests(data_dir: Path) -> Dict[str, str]:
    """sha256 of each column of each split, rows in meta.json's order (independent of how parts cut them)."""
    import hashlib

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from sharded_mde.data.meta import DatasetMeta

    meta = DatasetMeta.load(data_dir)
    out = {}
    for split in meta.rows:
        digests: Dict[str, Any] = {}
        for path, _ in meta.split_parts(split):
            for batch in pq.ParquetFile(str(path)).iter_batches():
                for name, col in zip(batch.schema.names, batch.columns):
                    h = digests.setdefault(name, hashlib.sha256())
                    if pa.types.is_list(col.type):  # a list column: its bag lengths, then its values
                        h.update(np.asarray(pc.list_value_length(col), dtype=np.int32).tobytes())
                        col = col.flatten()
                    h.update(col.to_numpy(zero_copy_only=False).tobytes())
        out.update({f"{split}/{k}": v.hexdigest() for k, v in digests.items()})
    return out


def _run_ranks(n: int, args: List[str]) -> Dict[str, Any]:
    """One distributed pass on `n` torchrun ranks in fresh processes; rank 0's JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                           __file__, "--child", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_prepare: {n}-rank pass {args[0]} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_ranks(args: argparse.Namespace, work: Path, files: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The distributed prepare by 1 rank and by each of --ranks, on each of --ranks-inputs, side by side."""
    ranks = sorted({int(r) for r in args.ranks.split(",")} | {1})
    out: Dict[str, Any] = {"ranks": ranks, "count_memory_mb": args.count_memory_mb, "cores": os.cpu_count(),
                           "inputs": {}}
    for name in args.ranks_inputs.split(","):
        tsv = files[name]["path"]
        res: Dict[str, Any] = {}
        for n in ranks:
            data = str(work / f"{name}_ranks{n}")
            count = _run_ranks(n, ["dist", "count", tsv, data, str(args.count_memory_mb)])
            encode = _run_ranks(n, ["dist", "encode", tsv, data, str(args.count_memory_mb)])
            total_s = count["seconds"] + encode["seconds"]
            res[str(n)] = {"count": count, "encode": encode, "total_seconds": round(total_s, 2),
                           "total_rows_per_s": round(count["rows"] / total_s)}
        one = work / f"{name}_ranks1"
        for n in ranks[1:]:
            other, r = work / f"{name}_ranks{n}", res[str(n)]
            r["vocabularies_identical_to_1_rank"] = all(v.read_bytes() == (other / "vocab" / v.name).read_bytes()
                                                        for v in sorted((one / "vocab").glob("*.parquet")))
            r["splits_identical_to_1_rank"] = _split_digests(one) == _split_digests(other)
            r["speedup_over_1_rank"] = {
                "count": round(r["count"]["rows_per_s"] / res["1"]["count"]["rows_per_s"], 2),
                "encode": round(r["encode"]["rows_per_s"] / res["1"]["encode"]["rows_per_s"], 2),
                "total": round(r["total_rows_per_s"] / res["1"]["total_rows_per_s"], 2)}
        out["inputs"][name] = {"file": files[name], "by_ranks": res}
    return out


def _run_child(args: List[str]) -> Dict[str, Any]:
    """One pass in a fresh process; its JSON result (the last stdout line)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, __file__, "--child", *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench_prepare: pass {args[0]} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _write_tsv(path: Path, rows: int, vocab_sizes: List[int], zipf: float) -> Dict[str, Any]:
    """The synthetic Criteo TSV of `data synth --format tsv` (generated unless already there)."""
    from sharded_mde.config import DataConfig
    from sharded_mde.data.synth import generate, synth_fingerprint

    cfg = DataConfig(synth_rows=rows, synth_num_dense=NUM_DENSE, synth_num_sparse=NUM_SPARSE, synth_zipf=zipf,
                     synth_vocab_sizes=vocab_sizes, synth_ranks=[1] * NUM_SPARSE, synth_teacher="factorised")
    truth_path = path.with_name(path.stem + ".ground_truth.json")
    if not (truth_path.exists() and json.loads(truth_path.read_text()).get("fingerprint") == synth_fingerprint(cfg)):
        generate(cfg, path, "tsv", progress=True)
    return {"path": str(path), "bytes": path.stat().st_size, "rows": rows, "vocab_sizes": vocab_sizes, "zipf": zipf}


def _machine() -> Dict[str, Any]:
    """`bench.common.machine_info` plus what this benchmark depends on: memory, load, pyarrow, numpy, duckdb."""
    import numpy
    import pyarrow

    from sharded_mde.bench.common import machine_info

    try:
        import duckdb
        duck = duckdb.__version__
    except ImportError:
        duck = None
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), None)
    return {**machine_info(), "memory_mb": mem, "load_average": [round(x, 2) for x in os.getloadavg()],
            "pyarrow": pyarrow.__version__, "numpy": numpy.__version__, "duckdb": duck}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4_000_000, help="rows per TSV file")
    p.add_argument("--work", default="/tmp/bench_prepare", help="scratch directory for the TSV files and outputs")
    p.add_argument("--high-fields", type=int, default=6, help="fields with --high-vocab values in the high file")
    p.add_argument("--high-vocab", type=int, default=4_000_000, help="values of each high-cardinality field")
    p.add_argument("--small-vocab", type=int, default=10_000, help="largest vocabulary of the small file")
    p.add_argument("--zipf", type=float, default=0.5, help="Zipf exponent of every field (low: many distinct values)")
    p.add_argument("--count-memory-mb", type=int, default=512, help="data.count_memory_mb of the bounded counting")
    p.add_argument("--duckdb-memory-mb", type=int, default=0, help="DuckDB's memory_limit (0: --count-memory-mb)")
    p.add_argument("--old-rows", type=int, default=200_000, help="rows encoded the old way side by side (0: none)")
    p.add_argument("--repeats", type=int, default=3, help="encoding passes per file, alternating small/high")
    p.add_argument("--note", default="", help="what else ran on the machine (saved with the figures)")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_prepare.json"), help="JSON output ('' = print only)")
    p.add_argument("--ranks", default="", help="e.g. 1,2: the distributed prepare on that many torchrun ranks "
                                                "instead of the passes above (updates only the 'ranks' key of --out)")
    p.add_argument("--ranks-inputs", default="small,high", help="files the --ranks comparison prepares")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        fn = {"count": lambda: child_count(rest[0], rest[1], int(rest[2])),
              "encode": lambda: child_encode(rest[0], rest[1], int(rest[2])),
              "duckdb": lambda: child_duckdb(rest[0], int(rest[1]), rest[2]),
              "dist": lambda: child_dist(rest[0], rest[1], rest[2], int(rest[3]))}[kind]
        result = fn()
        if result is not None:
            print(json.dumps(result))
        return 0

    import numpy as np
    import pyarrow.parquet as pq

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    machine = _machine()
    small_sizes = [int(v) for v in np.round(np.geomspace(10, args.small_vocab, NUM_SPARSE))]
    high_sizes = [args.high_vocab] * args.high_fields + small_sizes[args.high_fields:]
    sizes = {"small": small_sizes, "high": high_sizes}
    names = args.ranks_inputs.split(",") if args.ranks else list(sizes)
    files = {name: _write_tsv(work / f"{name}.tsv", args.rows, sizes[name], args.zipf) for name in names}
    previous = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).exists() else {}
    if args.ranks:
        ranks = bench_ranks(args, work, files)
        machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        report = {**previous, "ranks": {"command": "tools/bench_prepare.py " + " ".join(sys.argv[1:]),
                                        "machine": machine, "note": args.note, **ranks}}
        return _write_report(report, args.out)
    mb, res = args.count_memory_mb, {}
    for name in ("small", "high"):  # bounded counting
        res[f"count_{name}"] = _run_child(["count", files[name]["path"], str(work / name), str(mb)])
    runs: Dict[str, List[Dict[str, Any]]] = {"small": [], "high": []}
    for r in range(args.repeats):  # encoding passes alternate, so that a change of load hits both alike
        for name in ("small", "high"):
            old_rows = str(args.old_rows if r == 0 else 0)
            runs[name].append(_run_child(["encode", files[name]["path"], str(work / name), old_rows]))
    for name in ("small", "high"):  # the fastest run of each (the least disturbed), every run's rows/s beside it
        res[f"encode_{name}"] = dict(max(runs[name], key=lambda x: x["rows_per_s"]),
                                     side_by_side=runs[name][0].get("side_by_side"),
                                     runs_rows_per_s=[x["rows_per_s"] for x in runs[name]])
    res["count_high_unbounded"] = _run_child(["count", files["high"]["path"], str(work / "high_free"), "0"])
    same = all(pq.read_table(work / "high" / "vocab" / f"C{i + 1}.parquet").equals(
        pq.read_table(work / "high_free" / "vocab" / f"C{i + 1}.parquet")) for i in range(NUM_SPARSE))
    for name in ("small", "high"):
        res[f"duckdb_{name}"] = _run_child(["duckdb", files[name]["path"], str(args.duckdb_memory_mb or mb),
                                            str(work / "duckdb_tmp")])
    summary: Dict[str, Any] = {
        "bounded_vocabularies_identical_to_unbounded": same,
        "high_fields_distinct_values": sorted(res["count_high"]["vocab_sizes"].values())[-args.high_fields:],
        "encode_rows_per_s_small_over_high": round(res["encode_small"]["rows_per_s"] / res["encode_high"]["rows_per_s"], 2),
        "encode_only_rows_per_s_small_over_high":
            round(res["encode_small"]["encode_rows_per_s"] / res["encode_high"]["encode_rows_per_s"], 2),
        "count_high_bounded_peak_rss_mb": res["count_high"]["peak_rss_mb"],
    }
    for name in ("small", "high"):
        duck = res[f"duckdb_{name}"]
        if "error" in duck:
            summary[f"duckdb_{name}"] = duck["error"]
            continue
        ours = res[f"count_{name}"]
        summary[f"count_{name}_duckdb_rows_per_s_over_ours"] = round(duck["rows_per_s"] / ours["rows_per_s"], 2)
        summary[f"count_{name}_distinct_values_match_duckdb"] = duck["vocab_sizes"] == ours["vocab_sizes"]
    for k in ("count_small", "count_high", "count_high_unbounded", "duckdb_small", "duckdb_high"):
        res[k].pop("vocab_sizes", None)  # compared above; the high fields' sizes are in the summary
    machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {**previous, "command": "tools/bench_prepare.py " + " ".join(sys.argv[1:]), "machine": machine,
              "note": args.note, "files": files, "summary": summary, "passes": res}
    return _write_report(report, args.out)


def _write_report(report: Dict[str, Any], out: str) -> int:
    """Prints the report and writes it to `out` ('' = print only)."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
