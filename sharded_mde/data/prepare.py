"""`prepare`: raw files (or the synthetic generator) -> vocabularies and Parquet train/valid/test splits.

Two streaming passes: the first counts the values of the rows assigned to the train split and
builds the vocabularies (valid/test values unseen in training encode to OOV, as at serving), the
second maps values to ids and writes the splits in parts. Rows are assigned to splits by their
physical index in the input (`splits.py`); a sequential split needs the total row count first,
read from Parquet metadata or, for text, counted by one scan for line breaks. Labels are checked
while reading: 0/1, or the codes of `data.label_map`; anything else is an error naming the line. Every file is written atomically and meta.json
last, so an interrupted run never leaves a directory that looks complete; a rerun with the same
config returns at once, and one interrupted after the vocabularies reuses them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from sharded_mde.config import DataConfig
from sharded_mde.data.encode import Encoder
from sharded_mde.data.meta import FORMAT_VERSION, META_FILE, DatasetMeta
from sharded_mde.data.parts import PartWriter
from sharded_mde.data.readers import DataWarning, SourceReader, expand_paths
from sharded_mde.data.schema import input_schema
from sharded_mde.data.splits import SPLITS, assign_splits
from sharded_mde.data.synth import generate, load_ground_truth, synth_fingerprint, synth_paths
from sharded_mde.data.vocab import ValueCounter, Vocabulary, save_vocab
from sharded_mde.io import atomic_path, atomic_write_json, read_json

VOCAB_DONE = "vocab/_complete.json"
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


def _split_total(cfg: DataConfig, reader: SourceReader) -> int:
    """The row count a sequential split divides (physical rows, cut at max_rows); 0 for hash splits."""
    if cfg.split_by != "sequential":
        return 0
    total = reader.count_rows()
    return min(total, cfg.max_rows) if cfg.max_rows else total


def _clear(out: Path, keep_vocab: bool) -> None:
    """Removes meta.json first (the directory stops looking complete), then stale outputs."""
    (out / META_FILE).unlink(missing_ok=True)
    for d in [*SPLITS, *([] if keep_vocab else ["vocab"])]:
        shutil.rmtree(out / d, ignore_errors=True)


def _build_vocabs(cfg: DataConfig, fmt: str, files: List[Path], out: Path, fp: str,
                  progress: bool) -> Tuple[Dict[str, int], int, int, int]:
    """Pass 1: counts the train split's values, writes vocab/<field>.parquet; returns (values per vocabulary,
    rows read, skipped lines, the split's row total). Holds no vocabulary: the encoding pass loads them."""
    reader = _reader(cfg, fmt, files)
    total = _split_total(cfg, reader)
    out.mkdir(parents=True, exist_ok=True)
    rows = 0
    sizes = {}
    with tempfile.TemporaryDirectory(prefix="_counting.", dir=out) as spill_dir:
        counter = ValueCounter(reader.schema.sparse, cfg.count_memory_mb, Path(spill_dir))
        with tqdm(desc="prepare: counting values", unit=" rows", disable=not progress) as bar:
            for table, phys in _limited(reader.blocks(), cfg.max_rows):
                train = assign_splits(phys, total, cfg.split, cfg.split_by) == 0
                counter.update(table.filter(pa.array(train)))
                rows += table.num_rows
                bar.update(table.num_rows)
        for f in reader.schema.sparse:
            table = counter.vocab(f, cfg.min_count, cfg.max_vocab)
            save_vocab(out, f, table)
            sizes[f] = table.num_rows
    atomic_write_json(out / VOCAB_DONE, {"fingerprint": fp, "rows": rows, "skipped_lines": reader.skipped,
                                         "split_total": total})
    return sizes, rows, reader.skipped, total


def prepare_vocabs(cfg: DataConfig, progress: bool = True) -> Dict[str, int]:
    """The counting pass alone: writes the vocabularies of `cfg.dir` (which a later `prepare` reuses);
    returns the number of values of each."""
    out = Path(cfg.dir)
    fmt, files, inputs = _sources(cfg, out)
    _clear(out, keep_vocab=False)
    if cfg.format == "synth":
        _ensure_synth(cfg, out, progress)
    return _build_vocabs(cfg, fmt, files, out, fingerprint(cfg, inputs), progress)[0]


def prepare(cfg: DataConfig, progress: bool = True) -> DatasetMeta:
    """Builds (or finds up to date) the processed data directory `cfg.dir` and returns its metadata."""
    out = Path(cfg.dir)
    fmt, files, inputs = _sources(cfg, out)
    fp = fingerprint(cfg, inputs)
    if (out / META_FILE).exists():
        try:
            meta = DatasetMeta.load(out)
            if meta.fingerprint == fp and meta.format_version == FORMAT_VERSION:
                return meta
        except ValueError:
            pass
    done = read_json(out / VOCAB_DONE, "vocabulary marker") if (out / VOCAB_DONE).exists() else {}
    resume = done.get("fingerprint") == fp
    _clear(out, keep_vocab=resume)
    truth = _ensure_synth(cfg, out, progress) if cfg.format == "synth" else None
    reader = _reader(cfg, fmt, files)
    schema = reader.schema
    if resume:
        rows, skipped, total = int(done["rows"]), int(done["skipped_lines"]), int(done["split_total"])
    else:
        _, rows, skipped, total = _build_vocabs(cfg, fmt, files, out, fp, progress)
    vocabs = {f: Vocabulary.load(out, f) for f in schema.sparse}
    encoder = Encoder(schema, vocabs)
    writers = {s: PartWriter(out, f"{s}/") for s in SPLITS}
    bag_values = {f: 0 for f in schema.multi}  # ids in the train split's bags
    with warnings.catch_warnings(), tqdm(total=rows, desc="prepare: writing splits", unit=" rows",
                                         disable=not progress) as bar:
        warnings.simplefilter("ignore", DataWarning)  # already reported by the counting pass
        for table, phys in _limited(reader.blocks(), cfg.max_rows):
            split = assign_splits(phys, total, cfg.split, cfg.split_by)
            encoded = encoder.encode(table)
            for i, s in enumerate(SPLITS):
                part = encoded.filter(pa.array(split == i))
                writers[s].add(part)
                if s == "train":
                    for f in bag_values:
                        bag_values[f] += len(pc.list_flatten(part.column(f)))
            bar.update(table.num_rows)
    parts = {s: w.close() for s, w in writers.items()}
    train_rows = sum(n for _, n in parts["train"])
    meta = DatasetMeta(
        dense_features=list(schema.dense), sparse_features=list(schema.sparse),
        num_embeddings={f: v.num_embeddings for f, v in vocabs.items()},
        rows={s: sum(n for _, n in parts[s]) for s in SPLITS}, skipped_lines=skipped,
        source=[str(p.resolve()) for p in files], fingerprint=fp, parts=parts,
        config={k: v for k, v in asdict(cfg).items()}, multi_valued=list(schema.multi),
        mean_bag_length={f: bag_values[f] / max(train_rows, 1) if f in bag_values else 1.0 for f in schema.sparse})
    if truth is not None:
        _copy_ground_truth(truth, out, vocabs)
    meta.save(out)
    if cfg.format == "synth":  # regenerated on demand; a stray raw copy would look like data to other tools
        shutil.rmtree(out / "raw", ignore_errors=True)
    meta.dir = str(out)
    return meta


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
