"""PME's vocabulary renumbering and the per-token statistics of a selection.

Each field's ids are renumbered group by group (largest size first, then by old id, so by
frequency), the reserved ids (0 missing, 1 out-of-vocabulary) keeping theirs: the renumbered
vocabulary is all serving needs, with no remap. `renumber_data` writes a copy of the processed
data directory in the new ids (splits and vocabularies) for retraining. `token_stats` relates the
chosen sizes to token frequency and, on planted data, to each token's planted capacity.
`scoring_batches` reads only the rows that scoring looks at (a training epoch loads them all).
`plot_token_sizes` draws the share of each field's tokens and traffic at each size.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec import EmbeddingBagConfig
from torchrec.datasets.utils import Batch

from sharded_mde.data.batches import batch_from_table
from sharded_mde.data.meta import DatasetMeta
from sharded_mde.data.parts import ROW_GROUP_ROWS
from sharded_mde.data.readers import LABEL
from sharded_mde.data.vocab import NUM_RESERVED, OOV_ID, vocab_path
from sharded_mde.io import atomic_path, read_json
from sharded_mde.plots import pyplot, save_png


READ_ROWS = 1 << 16  # rows per streamed read of a part


def scoring_batches(data_dir: str | Path, batch_size: int, num_batches: int, rank: int = 0,
                    world_size: int = 1) -> Iterator[Batch]:
    """`num_batches` batches of consecutive training rows for this rank, from the start of the train split.

    Rank r reads rows [r m, (r + 1) m), m = num_batches x batch_size, and only the parts holding them.
    """
    meta = DatasetMeta.load(data_dir)
    m = num_batches * batch_size
    start, stop = rank * m, (rank + 1) * m
    if world_size * m > meta.rows["train"]:
        raise ValueError(f"{data_dir}: scoring needs {world_size * m} training rows, the train split has {meta.rows['train']}")
    columns = [LABEL] + meta.dense_features + meta.sparse_features
    parts, offset = [], 0
    for path, n in meta.split_parts("train"):
        lo, hi = max(start, offset) - offset, min(stop, offset + n) - offset
        if lo < hi:  # stream the part up to row hi: the scored rows are a few % of an epoch
            pos = 0
            for rb in pq.ParquetFile(str(path)).iter_batches(batch_size=min(m, READ_ROWS), columns=columns):
                if pos + rb.num_rows > lo:
                    parts.append(pa.Table.from_batches([rb]).slice(max(0, lo - pos), hi - max(lo, pos)))
                pos += rb.num_rows
                if pos >= hi:
                    break
        offset += n
    table = pa.concat_tables(parts)
    for b in range(num_batches):
        yield batch_from_table(table.slice(b * batch_size, batch_size), meta.dense_features, meta.sparse_features)


def split_counts(data_dir: str | Path, split: str, tables: List[EmbeddingBagConfig], start: int = 0,
                 stop: Optional[int] = None) -> Dict[str, np.ndarray]:
    """Per table, how often each id occurs in rows [start, stop) of `split` (every feature of the table, every entry of a bag)."""
    meta = DatasetMeta.load(data_dir)
    out = {t.name: np.zeros(t.num_embeddings, np.int64) for t in tables}
    offset = 0
    for path, n in meta.split_parts(split):
        lo, hi = max(0, start - offset), n if stop is None else min(n, stop - offset)
        offset += n
        if lo >= hi:
            continue
        for t in tables:
            for f in t.feature_names:
                col = pq.read_table(str(path), columns=[f]).column(f).slice(lo, hi - lo).combine_chunks()
                if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
                    col = pc.list_flatten(col)
                ids = col.to_numpy(zero_copy_only=False).astype(np.int64)
                out[t.name] += np.bincount(ids, minlength=t.num_embeddings)[:t.num_embeddings]
    return out


def token_order(sizes: np.ndarray) -> np.ndarray:
    """New id of every old id: reserved ids fixed, kept tokens by descending size then old id, pruned ones OOV (1)."""
    sizes = np.asarray(sizes)
    r = min(NUM_RESERVED, len(sizes))
    regular = np.arange(r, len(sizes))
    kept = regular[sizes[r:] > 0]
    order = kept[np.lexsort((kept, -sizes[kept]))]
    new = np.full(len(sizes), OOV_ID, dtype=np.int64)
    new[:r] = np.arange(r)
    new[order] = np.arange(r, r + len(order))
    return new


def tail_rate(train_counts: np.ndarray, new: np.ndarray, share: float) -> float:
    """The rate at which a field's kept training ids are sent to its OOV row so that the row reads >= `share` of them.

    The OOV row is what pruned tokens and values unseen in training read. Trained on the pruned tokens'
    rows alone it is one token's row when a single token is pruned (at 10% on MovieLens-100K: one user's
    row, read by the 85% of validation rows whose user is new). Where the pruned tokens carry a share
    `pruned` < `share` of the field's ids, kept ids are rewritten at (share - pruned) / (1 - pruned), so the
    row learns the field's average token; where they carry more (a tight budget) nothing is rewritten.
    """
    regular = np.arange(len(new)) >= NUM_RESERVED
    total = float(train_counts[regular].sum())
    if share <= 0 or total == 0:
        return 0.0
    pruned = float(train_counts[regular & (new == OOV_ID)].sum()) / total
    return max(0.0, (share - pruned) / (1.0 - pruned))


def tail_rows(ids: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
    """`ids` with each kept token's id (>= NUM_RESERVED) rewritten to the out-of-vocabulary id with probability `rate`."""
    if rate <= 0:
        return ids
    out = ids.copy()
    out[(ids >= NUM_RESERVED) & (rng.random(len(ids)) < rate)] = OOV_ID
    return out


def renumber_data(src: str | Path, dst: str | Path, new_ids: Mapping[str, np.ndarray],
                  tail_rates: Optional[Mapping[str, float]] = None, seed: int = 0) -> None:
    """Copies a processed data directory with every listed field's ids (data and vocabulary) renumbered.

    `tail_rates` (per field, `tail_rate`): the training split's kept ids are also sent to the OOV row at that
    rate (`tail_rows`, seeded by `seed`); validation and test are renumbered only.
    """
    src, dst = Path(src), Path(dst)
    fields = set(new_ids)
    rng = np.random.default_rng(seed)
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        rel = path.relative_to(src)
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if rel.parts[0] == "vocab" and path.suffix == ".parquet" and path.stem in fields:
            _renumber_vocab(path, target, new_ids[path.stem])
        elif path.suffix == ".parquet":
            table = pq.read_table(str(path))
            rates = (tail_rates or {}) if rel.parts[0] == "train" else {}
            for f in sorted(fields & set(table.column_names)):  # a split: one id column (or list of ids) per field
                table = _map_ids(table, f, new_ids[f], lambda ids: tail_rows(ids, rates.get(f, 0.0), rng))
            if {"field", "id"} <= set(table.column_names):  # per-token facts (planted capacities): (field, id) rows
                ids = table.column("id").to_numpy().astype(np.int64).copy()
                field_col = table.column("field").to_numpy(zero_copy_only=False)
                for f in fields:
                    rows = field_col == f
                    ids[rows] = new_ids[f][ids[rows]]
                table = _set_ids(table, "id", ids)
            with atomic_path(target) as tmp:  # row groups as prepare writes them: the unit a training rank streams
                pq.write_table(table, str(tmp), row_group_size=ROW_GROUP_ROWS)
        else:
            with atomic_path(target) as tmp:
                shutil.copyfile(path, tmp)


def _map_ids(table: pa.Table, column: str, new: np.ndarray,
             then: Callable[[np.ndarray], np.ndarray] = lambda ids: ids) -> pa.Table:
    """`table` with every id of `column` (ids, or lists of ids for a multi-valued field) replaced by then(new[id])."""
    col = table.column(column).combine_chunks()
    if not pa.types.is_list(col.type):
        return _set_ids(table, column, then(new[col.to_numpy().astype(np.int64)]))
    values = then(new[pc.list_flatten(col).to_numpy().astype(np.int64)]).astype(col.type.value_type.to_pandas_dtype())
    mapped = pa.ListArray.from_arrays(col.offsets, pa.array(values), mask=col.is_null())
    return table.set_column(table.column_names.index(column), column, mapped.cast(col.type))


def _set_ids(table: pa.Table, column: str, ids: np.ndarray) -> pa.Table:
    """`table` with `column` replaced by `ids`, in the column's own integer type."""
    col = table.column(column)
    return table.set_column(table.column_names.index(column), column, pa.array(ids.astype(col.type.to_pandas_dtype())))


def _renumber_vocab(path: Path, target: Path, new: np.ndarray) -> None:
    """A vocabulary file's rows reordered so that file order is again id order (2, 3, ...); pruned values left out.

    A value left out encodes to the out-of-vocabulary id at serving, as the renumbered splits have it.
    """
    table = pq.read_table(str(path))
    table = table.filter(pa.array(new[table.column("id").to_numpy().astype(np.int64)] != OOV_ID))
    old = table.column("id").to_numpy().astype(np.int64)
    order = np.argsort(new[old], kind="stable")
    table = _set_ids(table.take(pa.array(order)), "id", np.sort(new[old]))
    with atomic_path(target) as tmp:
        pq.write_table(table, str(tmp))


def _average_ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 0.. with ties sharing their average rank, in O(n log n)."""
    order = np.argsort(v, kind="stable")
    sv = v[order]
    first = np.r_[True, sv[1:] != sv[:-1]]
    group = np.cumsum(first) - 1
    starts = np.flatnonzero(first)
    ends = np.r_[starts[1:], len(v)]
    ranks = np.empty(len(v))
    ranks[order] = ((starts + ends - 1) / 2)[group]
    return ranks


def rank_correlation(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    """Spearman's rho (average ranks for ties); None when either side is constant."""
    rx, ry = _average_ranks(np.asarray(x, float)), _average_ranks(np.asarray(y, float))
    if len(rx) < 2 or rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _capacities(data_dir: Path) -> Optional[pa.Table]:
    """The planted per-token capacity table (field, id, capacity, ...) of synthetic data, or None."""
    truth_path = data_dir / "ground_truth.json"
    if not truth_path.is_file():
        return None
    name = read_json(truth_path, "synthetic ground truth").get("token_capacity_file")
    return pq.read_table(str(data_dir / name)) if name and (data_dir / name).is_file() else None


def token_stats(data_dir: str | Path, tables: List[EmbeddingBagConfig], sizes: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Per field: tokens per size, and Spearman of size with frequency (vocabulary count) and planted capacity.

    Both correlations run over the vocabulary's tokens (ids 2..), reserved ids excluded.
    """
    data_dir = Path(data_dir)
    caps = _capacities(data_dir)
    out: Dict[str, Any] = {}
    for t in tables:
        s = sizes[t.name].numpy()
        for f in t.feature_names:
            vocab = pq.read_table(str(vocab_path(data_dir, f)), columns=["id", "count"])
            ids = vocab.column("id").to_numpy().astype(np.int64)
            entry: Dict[str, Any] = {
                "tokens_per_size": {int(k): int(n) for k, n in zip(*np.unique(s, return_counts=True))},
                "reserved_sizes": [int(x) for x in s[:NUM_RESERVED]],
                "spearman_frequency": rank_correlation(s[ids], vocab.column("count").to_numpy()),
                "traffic_mean_size": float((s[ids] * vocab.column("count").to_numpy()).sum()
                                           / max(1, vocab.column("count").to_numpy().sum())),
            }
            if caps is not None:
                mine = caps.filter(pc.equal(caps.column("field"), f))
                cid = mine.column("id").to_numpy().astype(np.int64)
                keep = cid >= NUM_RESERVED  # values the vocabulary kept (others share the OOV id)
                cap = mine.column("capacity").to_numpy()[keep]
                entry["spearman_capacity"] = rank_correlation(s[cid[keep]], cap)
                entry["mean_size_by_capacity"] = {int(c): float(s[cid[keep]][cap == c].mean()) for c in np.unique(cap)}
            out[f] = entry
    return out


def plot_token_sizes(path: str | Path, stats: Mapping[str, Any], ranks: Optional[Mapping[str, int]] = None) -> None:
    """PNG: per field, the share of tokens at each size (bars) and the traffic-weighted mean size (dots)."""
    plt = pyplot()

    fields = list(stats)
    sizes = sorted({int(k) for v in stats.values() for k in v["tokens_per_size"]})
    fig, ax = plt.subplots(figsize=(max(8, 0.38 * len(fields) + 3), 4.5))
    bottom = np.zeros(len(fields))
    cmap = plt.get_cmap("viridis", len(sizes))
    for i, size in enumerate(sizes):
        share = np.array([stats[f]["tokens_per_size"].get(size, stats[f]["tokens_per_size"].get(str(size), 0))
                          / max(1, sum(stats[f]["tokens_per_size"].values())) for f in fields])
        ax.bar(np.arange(len(fields)), share, bottom=bottom, color=cmap(i), label=f"size {size}")
        bottom += share
    ax.set_ylabel("share of the field's tokens")
    ax.set_xticks(np.arange(len(fields)), fields, rotation=90)
    twin = ax.twinx()
    twin.plot(np.arange(len(fields)), [stats[f]["traffic_mean_size"] for f in fields], "o", color="#d62728",
              label="traffic-weighted mean size")
    if ranks:
        twin.plot(np.arange(len(fields)), [ranks.get(f, np.nan) for f in fields], "_", color="black", markersize=14,
                  label="planted rank")
    twin.set_ylabel("columns")
    handles = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="upper left", ncol=2)
    ax.set_title("PME token sizes per field")
    save_png(fig, path)
