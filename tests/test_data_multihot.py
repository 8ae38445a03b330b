"""Multi-valued (multi-hot) fields in the data stage: readers, train-only vocabularies over bag
values, list<int32> splits, mean bag lengths and KJTs with real lengths, against per-row references."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sharded_mde.config import DataConfig
from sharded_mde.data import Vocabulary, iterate_eval_batches, prepare
from sharded_mde.data.batches import _blocks, _concat_shares, _read, _share_of, batch_from_table
from sharded_mde.data.readers import SourceReader, split_values
from sharded_mde.data.splits import assign_splits
from sharded_mde.data.vocab import MISSING_ID, OOV_ID

N = 60
TAGS = ["x", "y", "z", "w", "late"]


def raw_rows() -> Dict[str, list]:
    """Rows with bags of 0..3 tags (empty, null, repeated values) and a single-valued user field."""
    rng = np.random.default_rng(3)
    tags: List[Optional[List[str]]] = []
    for i in range(N):
        k = int(rng.integers(0, 4))
        bag = [TAGS[int(j)] for j in rng.integers(0, 4, k)]  # "late" only in the last rows (test)
        tags.append(None if i % 11 == 5 else bag + (["late"] if i >= 57 else []))
    tags[1] = ["x", "x"]
    users = [None if i % 13 == 4 else f"u{i % 7}" for i in range(N)]
    return {"label": [float(i % 2) for i in range(N)], "user": users, "tags": tags}


def write_parquet(path: Path) -> Path:
    pq.write_table(pa.table({"label": pa.array(raw_rows()["label"], pa.float32()), "user": raw_rows()["user"],
                             "tags": pa.array(raw_rows()["tags"], pa.list_(pa.string()))}), path)
    return path


def write_csv(path: Path) -> Path:
    """The same rows as Avazu-style CSV with the bag joined by '|' (empty and null bags: an empty field)."""
    r = raw_rows()
    lines = ["id,click,user,tags"] + [f"{i},{int(y)},{u or ''},{'|'.join(t or [])}"
                                      for i, (y, u, t) in enumerate(zip(r["label"], r["user"], r["tags"]))]
    path.write_text("\n".join(lines) + "\n")
    return path


def reference(cfg: DataConfig) -> Dict[str, object]:
    """Per-row Python reference: train-only vocabularies, then every row's ids per field."""
    r = raw_rows()
    split = assign_splits(np.arange(N), N, cfg.split, cfg.split_by)
    counts: Dict[str, Dict[str, int]] = {"user": {}, "tags": {}}
    for i in np.flatnonzero(split == 0):
        for v in ([r["user"][i]] if r["user"][i] is not None else []) + (r["tags"][i] or []):
            f = "user" if v.startswith("u") else "tags"
            counts[f][v] = counts[f].get(v, 0) + 1
    ids = {f: {v: 2 + k for k, (v, _) in enumerate(sorted(c.items(), key=lambda vc: (-vc[1], vc[0])))}
           for f, c in counts.items()}
    rows = [{"label": r["label"][i],
             "user": [MISSING_ID if r["user"][i] is None else ids["user"].get(r["user"][i], OOV_ID)],
             "tags": [ids["tags"].get(v, OOV_ID) for v in (r["tags"][i] or [])]} for i in range(N)]
    return {"split": split, "counts": counts, "rows": rows}


@pytest.fixture(params=["parquet", "avazu_csv"])
def prepared(request, tmp_path: Path):
    if request.param == "parquet":
        cfg = DataConfig(format="parquet", paths=[str(write_parquet(tmp_path / "in.parquet"))],
                         split_by="sequential", dir=str(tmp_path / "o"))
    else:
        cfg = DataConfig(format="avazu_csv", paths=[str(write_csv(tmp_path / "in.csv"))], split_by="sequential",
                         multi_valued={"tags": "|"}, dir=str(tmp_path / "o"))
    return cfg, prepare(cfg, progress=False), reference(cfg)


def test_prepare_multi_valued_vocab_splits_and_mean_bag_length(prepared) -> None:
    cfg, meta, ref = prepared
    assert meta.multi_valued == ["tags"] and meta.sparse_features == ["user", "tags"]
    vocab = pq.read_table(Path(cfg.dir) / "vocab" / "tags.parquet").to_pydict()
    assert dict(zip(vocab["value"], vocab["count"])) == ref["counts"]["tags"] and "late" not in vocab["value"]
    train_rows = [row for row, s in zip(ref["rows"], ref["split"]) if s == 0]
    assert meta.mean_bag_length == {"user": 1.0, "tags": pytest.approx(sum(len(r["tags"]) for r in train_rows)
                                                                       / len(train_rows))}
    for k, s in enumerate(("train", "valid", "test")):
        table = pa.concat_tables([pq.read_table(p) for p, _ in meta.split_parts(s)])
        assert table.schema.field("tags").type == pa.list_(pa.int32()) and table.schema.field("user").type == pa.int32()
        want = [row for row, sp in zip(ref["rows"], ref["split"]) if sp == k]
        assert table.column("tags").to_pylist() == [r["tags"] for r in want]
        assert table.column("user").to_pylist() == [r["user"][0] for r in want]
    test_tags = [t for row, sp in zip(ref["rows"], ref["split"]) if sp == 2 for t in row["tags"]]
    assert OOV_ID in test_tags  # "late" appears only after the training period


def kjt_rows(kjt, keys) -> List[Dict[str, list]]:
    """Per row, per key the ids of a KJT (read back through TorchRec's own per-key view)."""
    per_key = kjt.to_dict()
    out = [dict() for _ in range(kjt.stride())]
    for k in keys:
        for i, ids in enumerate(per_key[k].to_dense()):
            out[i][k] = ids.tolist()
    return out


def test_batches_match_the_per_row_reference(prepared) -> None:
    cfg, meta, ref = prepared
    train = [row for row, s in zip(ref["rows"], ref["split"]) if s == 0]
    share = _read(meta, _blocks(meta, "train", 0, meta.rows["train"]))
    idx = np.array([1, 5, 0, 16, 16, 3])  # a repeated row, the ["x", "x"] bag, the null (empty) bag
    batch = share.take(idx).to_batch()
    kjt = batch.sparse_features
    assert kjt.keys() == ["user", "tags"] and kjt.stride() == len(idx)
    assert kjt_rows(kjt, kjt.keys()) == [{"user": train[i]["user"], "tags": train[i]["tags"]} for i in idx]
    lengths = kjt.lengths().view(2, -1)  # key-major
    assert lengths[0].tolist() == [1] * len(idx) and lengths[1].tolist() == [len(train[i]["tags"]) for i in idx]
    assert 0 in lengths[1].tolist() and train[1]["tags"][0] == train[1]["tags"][1]
    assert batch.labels.tolist() == [train[i]["label"] for i in idx]
    # evaluation batches of rank 1 of 2: its rows in order, the tail padded
    valid = [row for row, s in zip(ref["rows"], ref["split"]) if s == 1]
    start = (len(valid) + 1) // 2
    got = [r for b, n in iterate_eval_batches(meta.dir, "valid", 2, rank=1, world_size=2)
           for r in kjt_rows(b.sparse_features, ["user", "tags"])[:n]]
    assert got == [{"user": r["user"], "tags": r["tags"]} for r in valid[start:]]


def test_concatenated_parts_and_batch_from_table(prepared) -> None:
    cfg, meta, ref = prepared
    table = pa.concat_tables([pq.read_table(p) for p, _ in meta.split_parts("train")])
    whole = _share_of(table, meta.dense_features, meta.sparse_features)
    cut = 17
    joined = _concat_shares([_share_of(table.slice(0, cut), [], meta.sparse_features),
                             _share_of(table.slice(cut), [], meta.sparse_features)])
    for k in ("tags",):
        assert np.array_equal(joined.bags[k][0], whole.bags[k][0]) and np.array_equal(joined.bags[k][1], whole.bags[k][1])
    b = batch_from_table(table.slice(cut, 9), meta.dense_features, meta.sparse_features)
    train = [row for row, s in zip(ref["rows"], ref["split"]) if s == 0]
    assert kjt_rows(b.sparse_features, meta.sparse_features) == [{"user": r["user"], "tags": r["tags"]}
                                                                 for r in train[cut:cut + 9]]


def test_declared_separator_errors_name_the_file(tmp_path: Path) -> None:
    csv = write_csv(tmp_path / "in.csv")
    with pytest.raises(ValueError, match=rf"{csv}: data.multi_valued names 'genre', not a categorical column"):
        SourceReader("avazu_csv", [str(csv)], multi_valued={"genre": "|"})
    pqf = write_parquet(tmp_path / "in.parquet")
    with pytest.raises(ValueError, match=rf"{pqf}: column 'tags' is already a list"):
        SourceReader("parquet", [str(pqf)], multi_valued={"tags": "|"})


def test_split_values_and_encode_bags() -> None:
    bags = split_values(pa.array(["a|b", "", None, "|c||a|", "b"]), "|")
    assert bags.to_pylist() == [["a", "b"], [], [], ["c", "a"], ["b"]]
    vocab = Vocabulary(pa.array(["a", "b"]))
    assert vocab.encode_bags(pa.array([["b", None, "q"], None, []], pa.list_(pa.string()))).to_pylist() == \
        [[3, MISSING_ID, OOV_ID], [], []]
    assert vocab.encode_bags(bags.slice(3)).to_pylist() == [[OOV_ID, 2], [3]]
