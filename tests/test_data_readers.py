"""Readers, vocabularies and `prepare` on real-format Criteo TSV and Avazu CSV lines."""

from __future__ import annotations

import gzip
import math
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sharded_mde.config import DataConfig
from sharded_mde.data import DataWarning, DatasetMeta, Encoder, SourceReader, Vocabulary, prepare
from sharded_mde.data.convert import convert
from sharded_mde.data.splits import assign_splits
from sharded_mde.data.vocab import ValueCounter, build_vocab


def criteo_line(i: int) -> str:
    """A valid Criteo line: label, 13 integer counts (some empty), 26 hex values (some empty)."""
    dense = ["" if (i + j) % 5 == 0 else str((i * 7 + j) % 40 - (2 if j == 1 else 0)) for j in range(13)]
    sparse = ["" if (i + j) % 9 == 0 else f"{(i * (j + 3)) % 17:08x}" for j in range(25)]
    sparse.append(f"{i % 150:08x}")  # C26: values seen 2 or 3 times in 400 lines
    return "\t".join([str(i % 3 == 0 and 1 or 0), *dense, *sparse])


def write_criteo(path: Path, n: int, bad: dict | None = None, tail: str = "") -> Path:
    """n lines (1-based line numbers); `bad` replaces given lines; `tail` is appended without newline."""
    lines = [criteo_line(i) for i in range(1, n + 1)]
    for line_no, text in (bad or {}).items():
        lines[line_no - 1] = text
    path.write_text("\n".join(lines) + "\n" + tail)
    return path


def read_all(reader: SourceReader) -> pa.Table:
    return pa.concat_tables(list(reader))


def test_criteo_fields_empty_values_and_types(tmp_path):
    path = write_criteo(tmp_path / "day.tsv", 30)
    table = read_all(SourceReader("criteo_tsv", [str(path)]))
    assert table.num_rows == 30 and table.column_names[:2] == ["label", "I1"] and table.column_names[-1] == "C26"
    row = 4  # line 5: (5 + j) % 5 == 0 for j = 0 -> I1 empty, I2 = (35 + 1) % 40 - 2 = 34
    assert table.column("I1")[row].as_py() is None and table.column("I2")[row].as_py() == 34.0
    assert table.column("C5")[row].as_py() is None  # (5 + 4) % 9 == 0
    assert table.column("C1")[row].as_py() == f"{(5 * 3) % 17:08x}"
    assert table.schema.field("label").type == pa.float32() and table.schema.field("C1").type == pa.string()


def test_malformed_lines_skipped_with_file_and_line(tmp_path):
    fields = criteo_line(15).split("\t")
    fields[3] = "12x"  # non-numeric I3
    bad = {7: "1\t2\t3",  # wrong column count
           15: "\t".join(fields),
           23: "",  # empty line
           40: criteo_line(40) + "\textra"}
    path = write_criteo(tmp_path / "bad.tsv", 60, bad, tail=criteo_line(61)[:25])  # truncated last line
    reader = SourceReader("criteo_tsv", [str(path)], block_size=1500)  # many blocks: line numbers must carry over
    with pytest.warns(DataWarning) as record:
        table = read_all(reader)
    messages = [str(w.message) for w in record]
    assert table.num_rows == 60 - 4 and reader.skipped == 5
    for line, what in [(7, "expected 40 columns, got 3"), (15, "non-numeric value in I3"), (23, "empty line"),
                       (40, "expected 40 columns, got 41"), (61, "expected 40 columns")]:
        assert any(f"bad.tsv line {line}: skipped malformed line ({what}" in m for m in messages), (line, messages)
    # the surviving rows are the good lines, in order
    labels = table.column("label").to_numpy()
    good = [i for i in range(1, 61) if i not in (7, 15, 23, 40)]
    assert np.array_equal(labels, [1.0 if i % 3 == 0 else 0.0 for i in good])


def test_strict_names_file_and_line(tmp_path):
    fields = criteo_line(3).split("\t")
    fields[0] = "yes"
    path = write_criteo(tmp_path / "s.tsv", 10, {3: "\t".join(fields)})
    with pytest.raises(ValueError, match=r"s\.tsv line 3: malformed \(non-numeric label\)"):
        read_all(SourceReader("criteo_tsv", [str(path)], strict=True))


def empty_file(d: Path) -> Path:
    (d / "empty.tsv").write_text("")
    return d / "empty.tsv"


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.tsv", "missing.tsv: file not found"),
    (empty_file, "empty.tsv: empty file"),
    (lambda d: d, "is a directory"),
])
def test_unreadable_inputs_are_one_line_errors(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ValueError) as e:
        read_all(SourceReader("criteo_tsv", [str(path)]))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_gzip_and_glob(tmp_path):
    text = write_criteo(tmp_path / "a.tsv", 12).read_bytes()
    (tmp_path / "b.tsv.gz").write_bytes(gzip.compress(text))
    reader = SourceReader("criteo_tsv", [str(tmp_path / "*.ts*")])
    assert [p.name for p in reader.files] == ["a.tsv", "b.tsv.gz"] and read_all(reader).num_rows == 24


def test_avazu_header_drops_id_and_keeps_hour_categorical(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("id,click,hour,C1,banner_pos,site_id\n"
                    "1000009418151094273,0,14102100,1005,0,1fbe01fe\n"
                    "10000169349117863715,1,14102100,1005,,\n"
                    "10000371904215119486,0,14102101\n"
                    "10000640724480838376,x,14102101,1005,1,e151e245\n")
    reader = SourceReader("avazu_csv", [str(path)])
    with pytest.warns(DataWarning) as record:
        table = read_all(reader)
    assert [str(w.message).split("/")[-1] for w in record] == [
        "train.csv line 4: skipped malformed line (expected 6 columns, got 3)",
        "train.csv line 5: skipped malformed line (non-numeric label)"]
    assert reader.schema.dense == () and reader.schema.sparse == ("hour", "C1", "banner_pos", "site_id")
    assert table.column_names == ["label", "hour", "C1", "banner_pos", "site_id"]
    assert table.column("label").to_pylist() == [0.0, 1.0] and table.column("hour").to_pylist() == ["14102100"] * 2
    assert table.column("site_id").to_pylist() == ["1fbe01fe", None] and reader.skipped == 2


def test_avazu_without_click_column(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text("id,hour,C1\n1,14102100,1005\n")
    with pytest.raises(ValueError, match=r"test\.csv line 1: Avazu header has no 'click' column"):
        SourceReader("avazu_csv", [str(path)])


def test_vocab_order_ties_min_count_and_max_vocab():
    counter = ValueCounter(["f"])
    for values in (["b", "a", "c", None, "b"], ["a", "d", "b", "e", "e"]):
        counter.update(pa.table({"f": pa.array(values, pa.string())}))
    vocab = build_vocab(counter.counts("f"), min_count=2)
    # b: 3, then a and e tie at 2 (broken by value), c and d (1) fall below min_count
    assert vocab.column("value").to_pylist() == ["b", "a", "e"]
    assert vocab.column("id").to_pylist() == [2, 3, 4] and vocab.column("count").to_pylist() == [3, 2, 2]
    assert build_vocab(counter.counts("f"), max_vocab=2).column("value").to_pylist() == ["b", "a"]
    v = Vocabulary(vocab.column("value").combine_chunks())
    assert v.encode(["a", None, "c", "b", "zzz"]).tolist() == [3, 0, 1, 2, 1] and v.num_embeddings == 5


def test_value_counter_merges_geometrically_and_counts_exactly(monkeypatch):
    """Many distinct values: partial counts are merged O(log n) times, not once per block, and stay exact."""
    import collections

    from sharded_mde.data import vocab as vocab_mod

    monkeypatch.setattr(vocab_mod, "_MERGE_ROWS", 10)
    merges = []
    real_merge = ValueCounter._merge
    monkeypatch.setattr(ValueCounter, "_merge", lambda self, f: (merges.append(f), real_merge(self, f)))
    counter, expected = ValueCounter(["f"]), collections.Counter()
    for block in range(200):
        values = [f"v{block * 10 + i}" for i in range(10)] + ["common"]
        expected.update(values)
        counter.update(pa.table({"f": pa.array(values, pa.string())}))
    assert len(merges) <= 12  # 200 blocks of fresh values: the merged table doubles between merges
    got = counter.counts("f")
    assert dict(zip(got.column("value").to_pylist(), got.column("count").to_pylist())) == dict(expected)


def test_prepare_criteo_layout_idempotence_and_reuse(tmp_path):
    path = write_criteo(tmp_path / "raw.tsv", 400, {50: "1\t2"})
    cfg = DataConfig(format="criteo_tsv", paths=[str(path)], dir=str(tmp_path / "out"), min_count=3)
    with pytest.warns(DataWarning, match="raw.tsv line 50"):
        meta = prepare(cfg, progress=False)
    out = tmp_path / "out"
    assert sum(meta.rows.values()) == 399 and meta.skipped_lines == 1 and min(meta.rows.values()) > 0
    assert DatasetMeta.load(out).fingerprint == meta.fingerprint
    vocab = pq.read_table(out / "vocab" / "C1.parquet")
    assert meta.num_embeddings["C1"] == vocab.num_rows + 2 and min(vocab.column("count").to_pylist()) >= 3
    counts = vocab.column("count").to_numpy()
    assert np.all(np.diff(counts) <= 0)
    # processed rows: dense log1p(max(x, 0)) with empty = 0, ids from the saved vocabulary
    train = pa.concat_tables([pq.read_table(out / p) for p, _ in meta.parts["train"]])
    assert train.schema.field("C1").type == pa.int32() and train.schema.field("I1").type == pa.float32()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        blocks = list(SourceReader("criteo_tsv", [str(path)]).blocks())
    raw = pa.concat_tables([t for t, _ in blocks])
    phys = np.concatenate([r for _, r in blocks])  # splits go by physical row: the skipped line 50 counts
    assert 49 not in phys and phys.tolist() == [i for i in range(400) if i != 49]
    raw_train = raw.filter(pa.array(assign_splits(phys, 400, cfg.split) == 0))
    x = raw_train.column("I2").to_pylist()
    expected = [0.0 if v is None else math.log1p(max(v, 0.0)) for v in x]
    assert any(v is not None and v < 0 for v in x) and any(v is None for v in x)
    assert np.allclose(train.column("I2").to_numpy(), expected, rtol=1e-6)
    lookup = dict(zip(vocab.column("value").to_pylist(), vocab.column("id").to_pylist()))
    ids = [0 if v is None else lookup.get(v, 1) for v in raw_train.column("C1").to_pylist()]
    assert train.column("C1").to_pylist() == ids and 0 in ids
    c26 = pq.read_table(out / "vocab" / "C26.parquet")
    lookup = dict(zip(c26.column("value").to_pylist(), c26.column("id").to_pylist()))
    ids = [lookup.get(v, 1) for v in raw_train.column("C26").to_pylist()]
    assert train.column("C26").to_pylist() == ids and 1 in ids and max(ids) > 2
    # idempotent: same config returns at once without rewriting
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert prepare(cfg, progress=False).fingerprint == meta.fingerprint
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    # a changed setting rebuilds
    cfg.min_count = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        meta2 = prepare(cfg, progress=False)
    in_train = set(raw_train.column("C26").to_pylist()) - {None}  # train-only vocabulary
    assert meta2.fingerprint != meta.fingerprint and meta2.num_embeddings["C26"] == len(in_train) + 2
    assert meta2.num_embeddings["C26"] > meta.num_embeddings["C26"]
    # the saved vocabularies encode serving-time rows identically
    enc = Encoder.load(out)
    first = raw.slice(0, 5)
    assert enc.encode(first).column("C7").to_pylist() == Vocabulary.load(out, "C7").encode(first.column("C7")).tolist()


def test_convert_then_prepare_parquet_matches_direct(tmp_path):
    path = write_criteo(tmp_path / "raw.tsv", 300)
    summary = convert("criteo_tsv", [str(path)], tmp_path / "pq", part_rows=128, progress=False)
    assert summary["rows"] == 300 and len(summary["parts"]) == 3
    direct = prepare(DataConfig(format="criteo_tsv", paths=[str(path)], dir=str(tmp_path / "a")), progress=False)
    via = prepare(DataConfig(format="parquet", paths=[str(tmp_path / "pq")], dir=str(tmp_path / "b")), progress=False)
    assert direct.rows == via.rows and direct.num_embeddings == via.num_embeddings
    for split in ("train", "test"):
        a = pq.read_table(tmp_path / "a" / direct.parts[split][0][0])
        b = pq.read_table(tmp_path / "b" / via.parts[split][0][0])
        assert a.equals(b)


def test_prepare_sequential_split_and_max_rows(tmp_path):
    path = write_criteo(tmp_path / "raw.tsv", 200)
    meta = prepare(DataConfig(format="criteo_tsv", paths=[str(path)], dir=str(tmp_path / "o"), max_rows=100,
                              split=[0.6, 0.2, 0.2], split_by="sequential"), progress=False)
    assert meta.rows == {"train": 60, "valid": 20, "test": 20}
    test = pq.read_table(tmp_path / "o" / meta.parts["test"][0][0])
    assert test.column("label").to_pylist() == [1.0 if i % 3 == 0 else 0.0 for i in range(81, 101)]


def test_failed_prepare_never_looks_complete_and_resume_reuses_vocab(tmp_path):
    good = write_criteo(tmp_path / "good.tsv", 120)
    out = tmp_path / "o"
    cfg = DataConfig(format="criteo_tsv", paths=[str(good)], dir=str(out))
    meta = prepare(cfg, progress=False)
    # a later run that fails (strict, bad line) removes meta.json before it starts writing
    bad = write_criteo(tmp_path / "bad.tsv", 120, {60: "0\t1"})
    with pytest.raises(ValueError, match=r"bad\.tsv line 60"):
        prepare(DataConfig(format="criteo_tsv", paths=[str(bad)], dir=str(out), strict=True), progress=False)
    assert not (out / "meta.json").exists()
    with pytest.raises(ValueError, match="meta.json: not found"):
        DatasetMeta.load(out)
    # interrupted after the vocabulary pass: the rerun keeps the vocabularies and rebuilds the splits
    prepare(cfg, progress=False)
    stamp = (out / "vocab" / "C1.parquet").stat().st_mtime_ns
    (out / "meta.json").unlink()
    again = prepare(cfg, progress=False)
    assert (out / "vocab" / "C1.parquet").stat().st_mtime_ns == stamp
    assert again.rows == meta.rows and again.fingerprint == meta.fingerprint
