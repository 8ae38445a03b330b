"""`prepare`: raw files (or the synthetic generator) -> vocabularies and Parquet train/valid/test splits.

Two streaming passes: the first counts the values of the rows assigned to the train split and
builds the vocabularies (valid/test values unseen in training encode to OOV, as at serving), the
second maps values to ids and writes the splits in parts. Rows are assigned to splits by their
physical index in the input (`splits.py`); a sequential split needs the total row count first,
read from Parquet metadata or, for text, counted by one scan for line breaks. Labels are checked
while reading: 0/1, or the codes of `data.label_map`; anything else is an error naming the line.
Every file is written atomically and meta.json last, so an interrupted run never leaves a
directory that looks complete; a rerun with the same config returns at once, and one interrupted
after the vocabularies reuses them.

On several ranks (`sharded-mde data prepare` under torchrun, `group=TorchGroup()`), each rank
counts and encodes a contiguous share of the input (`shares.py`: Parquet row groups, byte ranges
of uncompressed text, whole compressed files); counts are exchanged by value hash through files
in the data directory and merged by the rank owning each hash bucket, each vocabulary is built by
one rank (the fields shared out by size), rank 0 writes meta.json, and every step ends with the
ranks agreeing that none failed (`group.py`). The vocabularies are byte for byte, the splits row
for row, those of one process.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sharded_mde.config import DataConfig
from sharded_mde.data.encode import Encoder
from sharded_mde.data.group import Group, Progress
from sharded_mde.data.meta import FORMAT_VERSION, META_FILE, DatasetMeta
from sharded_mde.data.parts import PartWriter
from sharded_mde.data.readers import ByteRange, DataWarning, SourceReader, expand_paths
from sharded_mde.data.schema import Schema, input_schema
from sharded_mde.data.shares import Share, assign_shares
from sharded_mde.data.splits import SPLITS, assign_splits
from sharded_mde.data.synth import generate, load_ground_truth, synth_fingerprint, synth_paths
from sharded_mde.data.vocab import (SPILL_BUCKETS, ValueCounter, Vocabulary, build_vocab, kept_counts, merged_buckets,
                                    save_vocab)
from sharded_mde.io import atomic_path, atomic_write_json, read_json

VOCAB_DONE = "vocab/_complete.json"
COUNTING_DIR = "_counting"  # spilled counts, one folder per rank (removed once the vocabularies are written)
_NOT_IN_FINGERPRINT = ("dir", "count_memory_mb")  # settings that do not change the processed data
# Text parsed per block: Arrow's CSV reader holds about 36 times this (600 MB at 16 MB); 4 MB reads as fast.
_TEXT_BLOCK_BYTES = 4 << 20


def _sources(cfg: DataConfig, out: Path) -> Tuple[str, List[Path], Dict]:
    """(reader format, input files, identity of the inputs for the fingerprint)."""
    if cfg.format == "synth":
        data, _ = synth_paths(out / "raw", "parquet")
        return "parquet", [data], {"synth": synth_fingerprint(cfg)}
    files = expand_paths(cfg.paths, cfg.format)
    ident = []
    for p in files:
        try:
            st = p.stat()
        except OSError:
            raise ValueError(f"{p}: file not found") from None
        ident.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return cfg.format, files, {"files": ident}


def fingerprint(cfg: DataConfig, inputs: Dict) -> str:
    """Digest of everything that determines the processed data (not the output directory)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in _NOT_IN_FINGERPRINT and not (k.startswith("synth_"))}
    blob = json.dumps({"format_version": FORMAT_VERSION, "config": settings, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _limited(blocks: Iterable[Tuple[pa.Table, np.ndarray]], max_rows: int) -> Iterator[Tuple[pa.Table, np.ndarray]]:
    """The (block, physical rows) pairs of rows before physical row `max_rows` (0 = no limit)."""
    for table, rows in blocks:
        if max_rows and len(rows) and rows[-1] >= max_rows:
            keep = rows < max_rows
            yield table.filter(pa.array(keep)), rows[keep]
            return
        yield table, rows


def _reader(cfg: DataConfig, fmt: str, files: List[Path]) -> SourceReader:
    """The reader of the inputs by their declared schema, checking labels."""
    return SourceReader(input_schema(cfg, fmt), [str(p) for p in files], strict=cfg.strict, labels=cfg.label_codes(),
                        block_size=_TEXT_BLOCK_BYTES)


def _shifted(blocks: Iterable[Tuple[pa.Table, np.ndarray]], base: int) -> Iterator[Tuple[pa.Table, np.ndarray]]:
    """The blocks with their rows' index in the whole input (a rank's rows start at `base`)."""
    for table, rows in blocks:
        yield table, rows + base


def _clear(out: Path, keep_vocab: bool) -> None:
    """Removes meta.json first (the directory stops looking complete), then stale outputs."""
    (out / META_FILE).unlink(missing_ok=True)
    for d in [*SPLITS, COUNTING_DIR, *([] if keep_vocab else ["vocab"])]:
        shutil.rmtree(out / d, ignore_errors=True)


@dataclass
class _Work:
    """What one rank reads: its share of the inputs (text files read in part: (start, end, data lines of the
    file before start)), the index of its first file's first row in the whole input, and the row count a
    sequential split divides (0 for hash splits, and when a resumed run reads it from the vocabulary marker)."""

    schema: Schema
    share: Share
    reader: Optional[SourceReader]
    byte_ranges: Dict[Path, ByteRange]
    base: int
    split_total: int

    def blocks(self, cfg: DataConfig) -> Iterator[Tuple[pa.Table, np.ndarray]]:
        """This rank's blocks and their rows' index in the whole input, cut at `data.max_rows`."""
        if self.reader is None:
            return iter(())
        return _limited(_shifted(self.reader.blocks(self.share.row_groups, self.byte_ranges), self.base),
                        cfg.max_rows)


def _plan_work(cfg: DataConfig, fmt: str, files: List[Path], group: Group, need_total: bool) -> _Work:
    """This rank's share and where its rows start; with several ranks each counts the rows of what it reads
    (Parquet metadata, or one scan for line breaks) and the ranks exchange the counts."""
    sequential = need_total and cfg.split_by == "sequential"

    def layout() -> Tuple[Schema, Share, Optional[SourceReader], Dict[Tuple[int, int], int]]:
        every = _reader(cfg, fmt, files)  # every file's columns must agree, as with one process
        if group.world == 1:
            return every.schema, Share(list(files)), every, {(0, 0): every.count_rows()} if sequential else {}
        share = assign_shares(files, every.input.text, group.world, every.input.quote)[group.rank]
        reader = _reader(cfg, fmt, share.files) if share.files else None
        counts = {}
        if sequential or group.rank < group.world - 1:  # the last rank's rows only add to a sequential total
            for i, p in enumerate(share.files):
                if p in share.byte_ranges:
                    counts[(share.first + i, share.byte_ranges[p][0])] = reader.count_range(p, *share.byte_ranges[p])
                elif share.starts_file(p):
                    counts[(share.first + i, 0)] = _reader(cfg, fmt, [p]).count_rows()
        return every.schema, share, reader, counts

    schema, share, reader, counts = group.agree(layout)
    rows: Dict[Tuple[int, int], int] = {}
    for counted in group.gather(counts):
        rows.update(counted)
    total = sum(rows.values()) if sequential else 0
    ranges = {p: (start, end, sum(n for (i, s), n in rows.items() if i == share.first + share.files.index(p)
                                  and s < start))
              for p, (start, end) in share.byte_ranges.items()}
    return _Work(schema, share, reader, ranges, sum(n for (i, _), n in rows.items() if i < share.first),
                 min(total, cfg.max_rows) if cfg.max_rows else total)


def _count_share(cfg: DataConfig, work: _Work, counter: ValueCounter, bar: Progress) -> None:
    """Counts the values of this rank's train rows into `counter`, the rows read into `bar`."""
    for table, phys in work.blocks(cfg):
        train = assign_splits(phys, work.split_total, cfg.split, cfg.split_by) == 0
        counter.update(table.filter(pa.array(train)))
        bar.add(table.num_rows)


def _merge_owned(cfg: DataConfig, fields: Sequence[str], spills: Dict[str, List[Path]], group: Group,
                 into: Path) -> Dict[str, Tuple[str, int]]:
    """Adds up every rank's counts of the hash buckets this rank owns (bucket b: rank b % world) and writes
    the (value, count) that can enter each field's vocabulary; returns each field's (file, rows)."""
    owned = [b for b in range(SPILL_BUCKETS) if b % group.world == group.rank]
    kept = {}
    for i, f in enumerate(fields):
        table = kept_counts(merged_buckets(spills[f], owned), cfg.min_count, cfg.max_vocab)
        path = str(into / f"kept.{i}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        kept[f] = (path, table.num_rows)
    return kept


def _vocab_builders(fields: Sequence[str], kept: List[Dict[str, Tuple[str, int]]], world: int) -> Dict[str, int]:
    """The rank that builds each field's vocabulary: fields by descending kept values (ties in field order),
    each to the rank with the fewest kept values so far (ties: the lowest), so the ranks sort about as much."""
    rows = {f: sum(k[f][1] for k in kept) for f in fields}
    load = [0] * world
    builder = {}
    for f in sorted(fields, key=lambda f: -rows[f]):
        builder[f] = load.index(min(load))
        load[builder[f]] += rows[f]
    return builder


def _write_vocabs(cfg: DataConfig, fields: Sequence[str], kept: List[Dict[str, Tuple[str, int]]],
                  out: Path) -> Dict[str, int]:
    """The vocabularies of `fields` from every owner's kept values (one field at a time, cut to the running
    top max_vocab as the owners' files are read); returns their sizes."""
    sizes = {}
    for f in fields:
        owners = (pa.ipc.open_file(pa.OSFile(k[f][0])).read_all() for k in kept)
        table = build_vocab(kept_counts(owners, cfg.min_count, cfg.max_vocab), cfg.min_count, cfg.max_vocab)
        save_vocab(out, f, table)
        sizes[f] = table.num_rows
    return sizes


def _build_vocabs(cfg: DataConfig, work: _Work, out: Path, fp: str, progress: bool,
                  group: Group) -> Tuple[Dict[str, int], int, int]:
    """Pass 1: counts the train split's values, writes vocab/<field>.parquet; returns (values per vocabulary,
    rows read, skipped lines). Holds no vocabulary: the encoding pass loads them. With several ranks each
    counts its share and spills its counts by value hash; the owner of a bucket adds it up over the ranks
    and keeps what passes min_count (and its top max_vocab); each field's vocabulary is then built
    by one rank from the owners' kept values (the fields shared out by size), so no rank holds every count,
    the ranks share the sorting, and the vocabulary is the one-process one."""
    fields = list(work.schema.sparse)
    counting = out / COUNTING_DIR
    mine = counting / f"rank{group.rank:05d}"
    try:
        def count() -> Tuple[int, int, Dict[str, Any]]:
            with group.progress("prepare: counting values", progress) as bar:  # first: a failure below ends it too
                mine.mkdir(parents=True, exist_ok=True)
                counter = ValueCounter(fields, cfg.count_memory_mb, mine)
                _count_share(cfg, work, counter, bar)
            rows = bar.rows
            skipped = work.reader.skipped if work.reader is not None else 0
            if group.world > 1:
                return rows, skipped, {f: [str(p) for p in ps] for f, ps in counter.spill_all().items()}
            sizes = {}
            for f in fields:
                table = counter.vocab(f, cfg.min_count, cfg.max_vocab)
                save_vocab(out, f, table)
                sizes[f] = table.num_rows
            return rows, skipped, sizes

        counted = group.agree(count, share=True)
        rows, skipped = sum(c[0] for c in counted), sum(c[1] for c in counted)
        sizes = counted[0][2]
        if group.world > 1:
            spills = {f: [Path(p) for c in counted for p in c[2][f]] for f in fields}
            kept = group.agree(lambda: _merge_owned(cfg, fields, spills, group, mine), share=True)
            builder = _vocab_builders(fields, kept, group.world)
            built = group.agree(lambda: _write_vocabs(cfg, [f for f in fields if builder[f] == group.rank], kept,
                                                      out), share=True)
            sizes = {f: built[builder[f]][f] for f in fields}

        def mark() -> None:
            if group.rank == 0:
                atomic_write_json(out / VOCAB_DONE, {"fingerprint": fp, "rows": rows, "skipped_lines": skipped,
                                                     "split_total": work.split_total})
                shutil.rmtree(counting, ignore_errors=True)

        group.agree(mark)
    finally:
        shutil.rmtree(mine, ignore_errors=True)
    return sizes, rows, skipped


def prepare_vocabs(cfg: DataConfig, progress: bool = True, group: Optional[Group] = None) -> Dict[str, int]:
    """The counting pass alone: writes the vocabularies of `cfg.dir` (which a later `prepare` reuses);
    returns the number of values of each. `group`: the ranks that share the work (default: this process)."""
    group = group or Group()
    out = Path(cfg.dir)
    fmt, files, inputs = group.agree(lambda: _sources(cfg, out))

    def start() -> None:
        if group.rank == 0:
            _clear(out, keep_vocab=False)
            if cfg.format == "synth":
                _ensure_synth(cfg, out, progress)

    group.agree(start)
    work = _plan_work(cfg, fmt, files, group, need_total=True)
    return _build_vocabs(cfg, work, out, fingerprint(cfg, inputs), progress, group)[0]


def prepare(cfg: DataConfig, progress: bool = True, group: Optional[Group] = None) -> DatasetMeta:
    """Builds (or finds up to date) the processed data directory `cfg.dir` and returns its metadata.

    `group`: the ranks that share the work (default: this process alone; `TorchGroup()` under torchrun).
    Every rank must call it with the same config; the result is the one-process result, whatever the
    number of ranks (vocabularies byte for byte, splits row for row in the same order)."""
    group = group or Group()
    out = Path(cfg.dir)
    fmt, files, inputs = group.agree(lambda: _sources(cfg, out))
    fp = fingerprint(cfg, inputs)
    truth: List[Optional[Dict]] = [None]

    def start() -> Optional[Dict]:
        """Rank 0: "done" if up to date; else clears stale outputs and returns the vocabulary marker to resume."""
        if group.rank != 0:
            return None
        if (out / META_FILE).exists():
            try:
                meta = DatasetMeta.load(out)
                if meta.fingerprint == fp and meta.format_version == FORMAT_VERSION:
                    return {"done": True}
            except ValueError:
                pass
        done = read_json(out / VOCAB_DONE, "vocabulary marker") if (out / VOCAB_DONE).exists() else {}
        resume = done.get("fingerprint") == fp
        _clear(out, keep_vocab=resume)
        if cfg.format == "synth":
            truth[0] = _ensure_synth(cfg, out, progress)
        return done if resume else {}

    state = group.agree(start, share=True)[0]
    if state.get("done"):
        return DatasetMeta.load(out)
    resume = bool(state)
    work = _plan_work(cfg, fmt, files, group, need_total=not resume)
    if resume:
        rows, skipped, work.split_total = int(state["rows"]), int(state["skipped_lines"]), int(state["split_total"])
    else:
        _, rows, skipped = _build_vocabs(cfg, work, out, fp, progress, group)
    schema = work.schema
    vocabs: Dict[str, Vocabulary] = {}  # loaded for the encoding, reused by rank 0 for meta.json

    def encode() -> Tuple[Dict[str, List[Tuple[str, int]]], Dict[str, int]]:
        """This rank's rows encoded into its own parts of each split; (parts, ids in the train split's bags)."""
        prefix = "" if group.world == 1 else f"rank{group.rank:05d}-"
        writers = {s: PartWriter(out, f"{s}/{prefix}") for s in SPLITS}
        bag_values = {f: 0 for f in schema.multi}
        with warnings.catch_warnings(), group.progress("prepare: writing splits", progress, rows) as bar:
            warnings.simplefilter("ignore", DataWarning)  # already reported by the counting pass
            vocabs.update({f: Vocabulary.load(out, f) for f in schema.sparse})
            encoder = Encoder(schema, vocabs)
            for table, phys in work.blocks(cfg):
                split = assign_splits(phys, work.split_total, cfg.split, cfg.split_by)
                encoded = encoder.encode(table)
                for i, s in enumerate(SPLITS):
                    part = encoded.filter(pa.array(split == i))
                    writers[s].add(part)
                    if s == "train":
                        for f in bag_values:
                            bag_values[f] += len(pc.list_flatten(part.column(f)))
                bar.add(table.num_rows)
        return {s: w.close() for s, w in writers.items()}, bag_values

    encoded = group.agree(encode, share=True)

    def finish() -> Optional[DatasetMeta]:
        """Rank 0: meta.json, written last, from every rank's parts in rank order (the input's order)."""
        if group.rank != 0:
            return None
        parts = {s: [part for rank_parts, _ in encoded for part in rank_parts[s]] for s in SPLITS}
        bag_values = {f: sum(b[f] for _, b in encoded) for f in schema.multi}
        train_rows = sum(n for _, n in parts["train"])
        meta = DatasetMeta(
            dense_features=list(schema.dense), sparse_features=list(schema.sparse),
            num_embeddings={f: v.num_embeddings for f, v in vocabs.items()},
            rows={s: sum(n for _, n in parts[s]) for s in SPLITS}, skipped_lines=skipped,
            source=[str(p.resolve()) for p in files], fingerprint=fp, parts=parts,
            config={k: v for k, v in asdict(cfg).items()}, multi_valued=list(schema.multi),
            mean_bag_length={f: bag_values[f] / max(train_rows, 1) if f in bag_values else 1.0
                             for f in schema.sparse})
        if truth[0] is not None:
            _copy_ground_truth(truth[0], out, vocabs)
        meta.save(out)
        if cfg.format == "synth":  # regenerated on demand; a stray raw copy would look like data to other tools
            shutil.rmtree(out / "raw", ignore_errors=True)
        meta.dir = str(out)
        return meta

    meta = group.agree(finish)
    return meta if group.rank == 0 else DatasetMeta.load(out)


def _ensure_synth(cfg: DataConfig, out: Path, progress: bool) -> Dict:
    """Generates the synthetic raw data into <dir>/raw unless a complete matching copy is there."""
    _, truth_path = synth_paths(out / "raw", "parquet")
    truth = load_ground_truth(truth_path)
    if truth is None or truth.get("fingerprint") != synth_fingerprint(cfg) or truth.get("split") != list(cfg.split) \
            or truth.get("split_by") != cfg.split_by:
        truth = generate(cfg, out / "raw", "parquet", progress=progress)
    return truth


def _copy_ground_truth(truth: Dict, out: Path, vocabs: Dict[str, Vocabulary]) -> None:
    """ground_truth.json beside the data; per-token capacities gain the vocabulary id of each value."""
    truth = dict(truth)
    cap_name = truth.pop("token_capacity_file", None)
    truth.pop("data_file", None)
    if cap_name:
        caps = pq.read_table(out / "raw" / cap_name)
        ids = np.empty(caps.num_rows, dtype=np.int32)
        field_col = caps.column("field")
        for f, vocab in vocabs.items():
            rows = np.flatnonzero(pc.equal(field_col, f).to_numpy(zero_copy_only=False))
            ids[rows] = vocab.encode(caps.column("value").take(pa.array(rows)))
        with atomic_path(out / "token_capacity.parquet") as tmp:
            pq.write_table(caps.append_column("id", pa.array(ids)), tmp)
        truth["token_capacity_file"] = "token_capacity.parquet"
    atomic_write_json(out / "ground_truth.json", truth)
