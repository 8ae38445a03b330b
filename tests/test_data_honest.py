"""Honest evaluation data: vocabularies from the train split only, labels checked in `prepare`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sharded_mde.config import ConfigError, DataConfig, from_dict
from sharded_mde.data import DataWarning, DatasetMeta, Vocabulary, prepare
from sharded_mde.data.meta import FORMAT_VERSION
from sharded_mde.data.readers import SourceReader
from sharded_mde.data.splits import assign_splits
from sharded_mde.data.vocab import OOV_ID
from test_data_readers import criteo_line, write_criteo


def split_rows(meta: DatasetMeta, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p, _ in meta.split_parts(split)])


def test_values_unseen_in_training_encode_to_oov(tmp_path: Path) -> None:
    # 10 rows in time order: rows 0-7 train, 8 valid, 9 test
    users = ["a", "b", "a", "c", "b", "a", "c", "a", "v_only", "t_only"]
    items = ["x", "y", "x", "y", "x", "y", "x", "y", "x", "x"]
    pq.write_table(pa.table({"label": pa.array([1, 0] * 5, pa.float32()), "user": users, "item": items}),
                   tmp_path / "in.parquet")
    cfg = DataConfig(format="parquet", paths=[str(tmp_path / "in.parquet")], dir=str(tmp_path / "o"),
                     split=[0.8, 0.1, 0.1], split_by="sequential")
    meta = prepare(cfg, progress=False)
    assert meta.rows == {"train": 8, "valid": 1, "test": 1}
    vocab = pq.read_table(tmp_path / "o" / "vocab" / "user.parquet").to_pydict()
    assert vocab["value"] == ["a", "b", "c"] and vocab["count"] == [4, 2, 2]  # train counts only
    assert meta.num_embeddings["user"] == 5
    assert split_rows(meta, "valid").column("user").to_pylist() == [OOV_ID]
    assert split_rows(meta, "test").column("user").to_pylist() == [OOV_ID]
    assert split_rows(meta, "test").column("item").to_pylist() == [Vocabulary.load(tmp_path / "o", "item")
                                                                  .encode(["x"])[0]] != [OOV_ID]


def test_hash_split_vocabulary_counts_exactly_the_train_rows(tmp_path: Path) -> None:
    path = write_criteo(tmp_path / "raw.tsv", 300, {17: "1\t2"})  # a skipped line keeps its physical row
    with pytest.warns(DataWarning, match=r"raw\.tsv line 17: skipped"):
        meta = prepare(DataConfig(format="criteo_tsv", paths=[str(path)], dir=str(tmp_path / "o")), progress=False)
    lines = [criteo_line(i) for i in range(1, 301)]
    train = assign_splits(np.arange(300), 300, [0.8, 0.1, 0.1]) == 0
    expected: dict = {}
    for i in np.flatnonzero(train):
        if i != 16:
            v = lines[i].split("\t")[14 + 25] or None  # C26
            expected[v] = expected.get(v, 0) + 1
    expected.pop(None, None)
    got = pq.read_table(tmp_path / "o" / "vocab" / "C26.parquet").to_pydict()
    assert dict(zip(got["value"], got["count"])) == expected
    assert meta.skipped_lines == 1 and meta.rows["train"] == int(train.sum()) - 1


def test_sequential_split_of_text_counts_lines_and_catches_a_mismatch(tmp_path: Path) -> None:
    path = write_criteo(tmp_path / "raw.tsv", 50, {46: "x"})
    with pytest.warns(DataWarning, match=r"raw\.tsv line 46: skipped"):
        meta = prepare(DataConfig(format="criteo_tsv", paths=[str(path)], dir=str(tmp_path / "o"),
                                  split=[0.8, 0.1, 0.1], split_by="sequential"), progress=False)
    assert meta.rows == {"train": 40, "valid": 5, "test": 4}  # line 46 (test) skipped, cuts unchanged
    assert SourceReader("criteo_tsv", [str(path)]).count_rows() == 50
    lone_cr = tmp_path / "cr.tsv"  # pyarrow ends a line at a lone CR: the line count no longer holds
    lone_cr.write_text(criteo_line(1) + "\r" + criteo_line(2) + "\n" + criteo_line(3) + "\n", newline="")
    with pytest.raises(ValueError, match=r"cr\.tsv: parsed 3 lines but the file has 2"):
        prepare(DataConfig(format="criteo_tsv", paths=[str(lone_cr)], dir=str(tmp_path / "c"),
                           split_by="sequential"), progress=False)


def pm1_lines(tmp_path: Path, labels: list) -> Path:
    lines = [criteo_line(i).split("\t", 1)[1] for i in range(1, len(labels) + 1)]
    path = tmp_path / "pm1.tsv"
    path.write_text("".join(f"{y}\t{rest}\n" for y, rest in zip(labels, lines)))
    return path


def test_labels_outside_0_1_need_a_map(tmp_path: Path) -> None:
    path = pm1_lines(tmp_path, [1, 1, -1, 1, -1] * 4)
    cfg = DataConfig(format="criteo_tsv", paths=[str(path)], dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=rf"^{path} line 3: label -1 is not one of 0, 1 \(map other codes to 0/1 "
                                         r"with data.label_map\)$"):
        prepare(cfg, progress=False)
    assert not (tmp_path / "o" / "meta.json").exists()
    cfg.label_map = {"-1": 0, 1: 1}
    cfg.__post_init__()
    meta = prepare(cfg, progress=False)
    labels = np.concatenate([pq.read_table(p).column("label").to_numpy()
                             for s in ("train", "valid", "test") for p, _ in meta.split_parts(s)])
    assert sorted(set(labels.tolist())) == [0.0, 1.0] and labels.sum() == 12
    # a code the map does not name is an error, even when the data set is otherwise fine
    bad = pm1_lines(tmp_path, [1, -1, 0, 1])
    with pytest.raises(ValueError, match=rf"{bad} line 3: label 0 is not one of -1, 1"):
        prepare(DataConfig(format="criteo_tsv", paths=[str(bad)], dir=str(tmp_path / "b"),
                           label_map={"-1": 0, "1": 1}), progress=False)


def test_parquet_label_error_names_the_row(tmp_path: Path) -> None:
    pq.write_table(pa.table({"label": pa.array([0, 1, 1, 0.5], pa.float32()), "f": ["a"] * 4}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p\.parquet row 4: label 0.5 is not one of 0, 1"):
        prepare(DataConfig(format="parquet", paths=[str(tmp_path / "p.parquet")], dir=str(tmp_path / "o")),
                progress=False)


@pytest.mark.parametrize("section, message", [
    ({"label_map": {"yes": 1}}, "label_map.yes: a label code must be a number"),
    ({"label_map": {"-1": 2}}, "label_map.-1: must map to 0 or 1"),
    ({"multi_valued": {"genres": ""}}, "multi_valued.genres: the separator must not be empty"),
])
def test_bad_label_map_or_separator_names_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=f"^data.{message}"):
        from_dict(DataConfig, section, prefix="data")


def test_directories_of_the_old_format_are_rebuilt(tmp_path: Path) -> None:
    pq.write_table(pa.table({"label": pa.array([0, 1] * 10, pa.float32()), "f": list("ab") * 10}),
                   tmp_path / "p.parquet")
    cfg = DataConfig(format="parquet", paths=[str(tmp_path / "p.parquet")], dir=str(tmp_path / "o"))
    prepare(cfg, progress=False)
    meta_path = tmp_path / "o" / "meta.json"
    raw = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps(raw | {"format_version": 1}))
    assert DatasetMeta.load(tmp_path / "o").format_version == 1  # old directories still load for their consumers
    assert prepare(cfg, progress=False).format_version == FORMAT_VERSION == 2
    assert json.loads(meta_path.read_text())["format_version"] == 2
