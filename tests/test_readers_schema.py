"""Declared input schemas: Parquet, CSV and TSV (with and without header) declared in `data.*` prepare to the
same data as the equivalent canonical Parquet; declared roles override the dtype guess; a value that breaks
its declared type is an error naming file, line and column; Criteo and Avazu are presets of the mechanism."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharded_mde.cli import main
from sharded_mde.config import ConfigError, DataConfig, RunConfig, from_dict
from sharded_mde.data import DatasetMeta, SourceReader, prepare
from sharded_mde.data.schema import input_schema
from test_data_readers import read_all, write_criteo

N = 150
SITES = ["news", "shop", "a,b", "mail", "x"]
TAGS = ["t1", "t2", "t3", "t4"]
# file order of the declared inputs: the dense fields keep the order d_float, d_int and the sparse ones
# user_id, cat_f, site, tags, as in the canonical file; the label and a column to drop sit in between
TEXT_COLUMNS = ["user_id", "y", "d_float", "cat_f", "ts", "d_int", "site", "tags"]
DECLARED = {"label": "y", "dense": ["d_float", "d_int"], "drop": ["ts"], "types": {"user_id": "int", "cat_f": "float"},
            "multi_valued": {"tags": "|"}}
META_KEYS = ("dense_features", "sparse_features", "num_embeddings", "rows", "skipped_lines", "multi_valued",
             "mean_bag_length")


def rows() -> Dict[str, List[Any]]:
    """The data: integer ids, a float-coded categorical, integer counts meant dense, missing values, bags."""
    rng = np.random.default_rng(7)
    users = [None if i % 17 == 3 else int(rng.integers(1, 40)) for i in range(N)]
    cat_f = [None if i % 13 == 5 else float(rng.choice([1.0, 2.0, 3.5, 10.0])) for i in range(N)]
    d_float = [None if i % 11 == 2 else float(np.round(rng.normal(3, 2), 4)) for i in range(N)]
    d_int = [None if i % 9 == 4 else int(rng.integers(0, 500)) for i in range(N)]
    site = [None if i % 10 == 7 else SITES[int(rng.integers(0, len(SITES)))] for i in range(N)]
    tags = [[TAGS[int(j)] for j in rng.integers(0, 4, int(rng.integers(0, 4)))] for _ in range(N)]
    return {"y": [int(rng.random() < 0.3) for _ in range(N)], "ts": rng.random(N).tolist(), "d_float": d_float,
            "d_int": d_int, "user_id": users, "cat_f": cat_f, "site": site, "tags": tags}


def cat_text(v: Optional[float]) -> Optional[str]:
    """The canonical string of a float-coded category (what `types: float` normalises every spelling to)."""
    return None if v is None else pa.array([v]).cast(pa.string())[0].as_py()


def write_canonical(path: Path) -> Path:
    """The equivalent canonical Parquet: `label`, dense floats, sparse strings, bags as list<string>."""
    r = rows()
    pq.write_table(pa.table({
        "label": pa.array(r["y"], pa.float32()), "d_float": pa.array(r["d_float"], pa.float64()),
        "d_int": pa.array([None if v is None else float(v) for v in r["d_int"]], pa.float64()),
        "user_id": [None if v is None else str(v) for v in r["user_id"]],
        "cat_f": [cat_text(v) for v in r["cat_f"]], "site": r["site"],
        "tags": pa.array(r["tags"], pa.list_(pa.string()))}), path)
    return path


def write_declared_parquet(path: Path) -> Path:
    """The same rows with their raw dtypes: int64 label, ids and counts, float categories, bags joined by '|'."""
    r = rows()
    pq.write_table(pa.table({
        "y": pa.array(r["y"], pa.int64()), "ts": r["ts"], "d_float": pa.array(r["d_float"], pa.float64()),
        "user_id": pa.array(r["user_id"], pa.int64()), "d_int": pa.array(r["d_int"], pa.int64()),
        "cat_f": pa.array(r["cat_f"], pa.float64()), "site": r["site"], "tags": ["|".join(t) for t in r["tags"]]}),
        path)
    return path


def text_rows() -> List[List[str]]:
    """The rows as text, with the spellings a declared type normalises: '+7', '007'; '2', '2.0', '1e1'."""
    r = rows()
    out = []
    for i in range(N):
        u = r["user_id"][i]
        user = "" if u is None else ("+" if i % 5 == 0 else "") + ("00" if i % 3 == 0 else "") + str(u)
        c = r["cat_f"][i]
        cat = "" if c is None else [repr(c), f"{c:g}", f"{c:.3e}"][i % 3]
        values = {"user_id": user, "y": str(r["y"][i]), "d_float": "" if r["d_float"][i] is None else repr(r["d_float"][i]),
                  "cat_f": cat, "ts": f"{r['ts'][i]:.6f}", "d_int": "" if r["d_int"][i] is None else str(r["d_int"][i]),
                  "site": r["site"][i] or "", "tags": "|".join(r["tags"][i])}
        out.append([values[c] for c in TEXT_COLUMNS])
    return out


def write_text(path: Path, delimiter: str, header: bool, quote: bool) -> Path:
    """The rows as delimited text (CSV quoting where `quote`), optionally gzipped (by the .gz suffix)."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n",
                        quoting=csv.QUOTE_MINIMAL if quote else csv.QUOTE_NONE)
    writer.writerows(([TEXT_COLUMNS] if header else []) + text_rows())
    data = buf.getvalue().encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def prepared(meta: DatasetMeta) -> Dict[str, Any]:
    """What a prepared directory holds, without where it came from: meta fields, vocabularies and splits."""
    out = Path(meta.dir)
    vocabs = {f: pq.read_table(out / "vocab" / f"{f}.parquet") for f in meta.sparse_features}
    splits = {s: pa.concat_tables([pq.read_table(out / p) for p, _ in meta.parts[s]]) for s in meta.parts}
    return {"meta": {k: getattr(meta, k) for k in META_KEYS}, "vocabs": vocabs, "splits": splits}


def assert_same_prepared(a: DatasetMeta, b: DatasetMeta) -> None:
    pa_, pb = prepared(a), prepared(b)
    assert pa_["meta"] == pb["meta"]
    for f, table in pa_["vocabs"].items():
        assert table.equals(pb["vocabs"][f]), f
    for s, table in pa_["splits"].items():
        assert table.equals(pb["splits"][s]), s


@pytest.fixture(scope="module")
def canonical(tmp_path_factory) -> DatasetMeta:
    d = tmp_path_factory.mktemp("canonical")
    src = write_canonical(d / "canonical.parquet")
    meta = prepare(DataConfig(format="parquet", paths=[str(src)], dir=str(d / "out"), min_count=2), progress=False)
    assert meta.dense_features == ["d_float", "d_int"] and meta.multi_valued == ["tags"]
    assert meta.sparse_features == ["user_id", "cat_f", "site", "tags"] and meta.skipped_lines == 0
    return meta


def test_declared_parquet_matches_canonical(tmp_path, canonical):
    src = write_declared_parquet(tmp_path / "raw.parquet")
    cfg = DataConfig(format="parquet", paths=[str(src)], dir=str(tmp_path / "out"), min_count=2, sparse=["cat_f"],
                     **DECLARED)
    assert_same_prepared(prepare(cfg, progress=False), canonical)
    vocab = pq.read_table(tmp_path / "out" / "vocab" / "cat_f.parquet").column("value").to_pylist()
    assert sorted(vocab) == ["1", "10", "2", "3.5"]


def test_declared_roles_override_the_dtype_guess(tmp_path):
    """Integer counts declared dense are dense, a float-coded categorical declared sparse is sparse; undeclared,
    the same file gives the dtype guess (which is what the declaration overrides)."""
    src = write_declared_parquet(tmp_path / "raw.parquet")
    guessed = SourceReader(input_schema(DataConfig(format="parquet", label="y"), "parquet"), [str(src)]).schema
    assert guessed.dense == ("ts", "d_float", "cat_f") and guessed.sparse == ("user_id", "d_int", "site", "tags")
    declared = SourceReader(input_schema(DataConfig(format="parquet", sparse=["cat_f", "user_id"], **DECLARED),
                                         "parquet"), [str(src)])
    assert declared.schema.dense == ("d_float", "d_int") and declared.schema.multi == ("tags",)
    table = read_all(declared)
    assert table.schema.field("d_int").type == pa.float32() and table.schema.field("cat_f").type == pa.string()
    assert table.column("d_int").to_pylist()[:3] == [float(v) for v in rows()["d_int"][:3]]
    ids = pq.read_table(src).column("user_id").to_pylist()  # an integer id column declared sparse stays sparse
    assert table.column("user_id").to_pylist() == [None if v is None else str(v) for v in ids]


@pytest.mark.parametrize("fmt, name, delimiter, header", [
    ("csv", "in.csv", "", True),
    ("csv", "in.csv", "", False),
    ("tsv", "in.tsv", "", True),
    ("tsv", "in.tsv.gz", "", False),
    ("csv", "in.txt", ";", False),
], ids=["csv-header", "csv-no-header", "tsv-header", "tsv-gz-no-header", "semicolon-no-header"])
def test_declared_text_matches_canonical(tmp_path, canonical, fmt, name, delimiter, header):
    sep = delimiter or ("," if fmt == "csv" else "\t")
    src = write_text(tmp_path / name, sep, header, quote=fmt == "csv")
    cfg = DataConfig(format=fmt, paths=[str(src)], dir=str(tmp_path / "out"), min_count=2, delimiter=delimiter,
                     header=header, columns=[] if header else TEXT_COLUMNS, **DECLARED)
    meta = prepare(cfg, progress=False)
    assert_same_prepared(meta, canonical)
    users = pq.read_table(tmp_path / "out" / "vocab" / "user_id.parquet").column("value").to_pylist()
    assert users and all(u == str(int(u)) for u in users)  # "+7" and "007" were normalised to "7"
    if fmt == "csv" and not delimiter:  # a quoted value keeps its delimiter
        assert "a,b" in pq.read_table(tmp_path / "out" / "vocab" / "site.parquet").column("value").to_pylist()


def test_convert_declared_csv_then_plain_parquet_matches_canonical(tmp_path, canonical):
    """`data convert --config` writes canonical Parquet (types normalised, bags split) that prepares, with no
    declaration, to the same data."""
    src = write_text(tmp_path / "in.csv", ",", header=False, quote=True)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"data": {"format": "csv", "paths": [str(src)], "header": False,
                                               "columns": TEXT_COLUMNS, **DECLARED}}))
    assert main(["data", "convert", "--config", str(config), "--out", str(tmp_path / "pq")]) == 0
    summary = json.loads((tmp_path / "pq" / "convert.json").read_text())
    assert summary["rows"] == N and summary["multi_valued"] == ["tags"] and summary["format"] == "csv"
    part = pq.read_table(tmp_path / "pq" / summary["parts"][0][0])
    assert part.schema.field("tags").type == pa.list_(pa.string()) and "y" not in part.column_names
    meta = prepare(DataConfig(format="parquet", paths=[str(tmp_path / "pq")], dir=str(tmp_path / "out"), min_count=2),
                   progress=False)
    assert_same_prepared(meta, canonical)
    # the preset path of the command still works, and a format without files or config is a usage error
    crit = write_criteo(tmp_path / "day.tsv", 20)
    assert main(["data", "convert", "--format", "criteo_tsv", "--out", str(tmp_path / "c"), str(crit)]) == 0
    assert main(["data", "convert", "--out", str(tmp_path / "c"), str(crit)]) == 2


def write_csv_lines(path: Path, lines: List[str]) -> Path:
    path.write_text("\n".join(["user_id,y,d_int,tags"] + lines) + "\n")
    return path


@pytest.mark.parametrize("bad_line, column, value, kind", [
    ("12a,1,3,1", "user_id", "12a", "int"),  # an id declared int
    ("12,1,2.5,1", "d_int", "2.5", "int"),  # a count declared int
    ("12,0,3,1|x9|2", "tags", "x9", "int"),  # one value of a bag whose values are declared int
])
def test_type_mismatch_names_file_line_and_column(tmp_path, bad_line, column, value, kind):
    """Whatever `strict` says: a declared type is a promise about the data, not a line to skip."""
    lines = ["1,0,4,7", "2,1,,8|9", "3,0,6,", bad_line, "5,1,2,1"]
    src = write_csv_lines(tmp_path / "bad.csv", lines)
    cfg = DataConfig(format="csv", paths=[str(src)], dir=str(tmp_path / "out"), label="y", dense=["d_int"],
                     types={"user_id": "int", "d_int": "int", "tags": "int"}, multi_valued={"tags": "|"})
    with pytest.raises(ValueError) as e:
        prepare(cfg, progress=False)
    assert str(e.value) == (f"{src} line 5, column {column!r}: value {value!r} does not match its declared type "
                            f"{kind} (data.types)")


def test_type_mismatch_in_parquet_names_the_row(tmp_path):
    src = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"label": [0.0, 1.0, 0.0], "cat_f": ["1.5", "2", "n/a"], "n": [1.0, 2.0, 2.5]}), src)
    cfg = DataConfig(format="parquet", paths=[str(src)], dir=str(tmp_path / "o"), sparse=["cat_f"],
                     types={"cat_f": "float"})
    with pytest.raises(ValueError, match=rf"^{src} row 3, column 'cat_f': value 'n/a' does not match its declared "
                                         r"type float \(data.types\)$"):
        prepare(cfg, progress=False)
    cfg = DataConfig(format="parquet", paths=[str(src)], dir=str(tmp_path / "o"), types={"n": "int"})
    with pytest.raises(ValueError, match=rf"^{src} row 3, column 'n': value 2.5 does not match"):
        prepare(cfg, progress=False)


def test_undeclared_columns_guess_drop_or_error(tmp_path):
    src = write_text(tmp_path / "in.csv", ",", header=True, quote=True)
    base = dict(format="csv", label="y", dense=["d_float"], sparse=["site"])
    with pytest.raises(ValueError, match=rf"^{src}: column 'user_id' has no declared role"):
        SourceReader(input_schema(DataConfig(**base, undeclared="error"), "csv"), [str(src)])
    only = SourceReader(input_schema(DataConfig(**base, undeclared="drop"), "csv"), [str(src)])
    assert only.schema.dense == ("d_float",) and only.schema.sparse == ("site",)
    assert read_all(only).column_names == ["label", "d_float", "site"]
    guessed = SourceReader(input_schema(DataConfig(**base), "csv"), [str(src)]).schema  # text: undeclared = sparse
    assert guessed.dense == ("d_float",) and guessed.sparse == ("user_id", "cat_f", "ts", "d_int", "site", "tags")


def test_schema_errors_in_files_are_one_line(tmp_path):
    src = write_text(tmp_path / "in.csv", ",", header=True, quote=True)
    with pytest.raises(ValueError, match=rf"^{src} line 1: CSV header has no 'label' column"):
        SourceReader("csv", [str(src)])
    with pytest.raises(ValueError, match=rf"^{src}: data.sparse names 'zip', not a column of this file$"):
        SourceReader(input_schema(DataConfig(format="csv", label="y", sparse=["zip"]), "csv"), [str(src)])
    stray = tmp_path / "stray.parquet"  # a column called `label` that is not the declared label
    pq.write_table(pa.table({"y": [1.0], "label": [0.0], "c": ["a"]}), stray)
    with pytest.raises(ValueError, match=rf"^{stray}: column 'label' is not the label \(data.label is 'y'\)"):
        SourceReader(input_schema(DataConfig(format="parquet", label="y"), "parquet"), [str(stray)])
    reader = SourceReader(input_schema(DataConfig(format="parquet", label="y", drop=["label"]), "parquet"), [str(stray)])
    assert read_all(reader).column_names == ["label", "c"] and read_all(reader).column("label").to_pylist() == [1.0]


def test_criteo_and_avazu_are_presets_of_the_declared_mechanism(tmp_path):
    """Declaring Criteo's layout on the generic tsv format reads exactly what the criteo_tsv preset reads;
    the same for Avazu on csv."""
    crit = write_criteo(tmp_path / "day.tsv", 60)
    columns = ["label", *[f"I{i}" for i in range(1, 14)], *[f"C{i}" for i in range(1, 27)]]
    declared = DataConfig(format="tsv", header=False, columns=columns, dense=[f"I{i}" for i in range(1, 14)])
    a = read_all(SourceReader("criteo_tsv", [str(crit)]))
    b = read_all(SourceReader(input_schema(declared, "tsv"), [str(crit)]))
    assert a.equals(b) and a.num_rows == 60
    avazu = tmp_path / "train.csv"
    avazu.write_text("id,click,hour,C1,site_id\n1,0,14102100,1005,1fbe01fe\n2,1,14102100,1005,\n")
    a = read_all(SourceReader("avazu_csv", [str(avazu)]))
    b = read_all(SourceReader(input_schema(DataConfig(format="csv", label="click", drop=["id"]), "csv"), [str(avazu)]))
    assert a.equals(b) and a.column_names == ["label", "hour", "C1", "site_id"]
    # a preset takes declarations column by column: Criteo with C3 dropped and I1 categorical
    cfg = DataConfig(format="criteo_tsv", drop=["C3"], sparse=["I1"], types={"I2": "int"})
    reader = SourceReader(input_schema(cfg, "criteo_tsv"), [str(crit)])
    assert "C3" not in reader.schema.sparse and reader.schema.sparse[0] == "I1" and "I1" not in reader.schema.dense


@pytest.mark.parametrize("data, message", [
    ({"format": "csv", "types": {"a": "date"}}, "data.types.a: one of string, int, float, got 'date'"),
    ({"format": "csv", "dense": ["a"], "sparse": ["a"]}, "data.sparse.a: also listed in dense"),
    ({"format": "csv", "header": False}, "data.columns: text without a header needs every column's name"),
    ({"format": "csv", "columns": ["a", "b"]}, "data.columns: only for text without a header"),
    ({"format": "parquet", "delimiter": ";"}, "data.delimiter: only for text formats"),
    ({"format": "csv", "delimiter": "ab"}, "data.delimiter: one character"),
    ({"format": "csv", "header": False, "columns": ["y", "a"], "sparse": ["b"]}, "data.sparse.b: not one of data.columns"),
    ({"format": "csv", "label": "y", "dense": ["y"]}, "data.dense.y: is the label column"),
    ({"format": "csv", "dense": ["a"], "types": {"a": "string"}}, "data.types.a: a dense column holds numbers"),
    ({"format": "csv", "drop": ["g"], "multi_valued": {"g": "|"}}, "data.multi_valued.g: a multi-valued column is sparse"),
    ({"format": "csv", "undeclared": "skip"}, "data.undeclared: one of guess, drop, error, got 'skip'"),
    ({"format": "synth", "label": "y"}, "data.label: the synthetic generator has its own schema"),
])
def test_schema_config_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(RunConfig, {"data": data})
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_the_docs_example_declaration_prepares(tmp_path):
    """The YAML example of docs/data.md loads and reads a file of the layout it describes."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "data.md").read_text()
    block = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    src = tmp_path / "clicks.csv.gz"
    src.write_bytes(gzip.compress(b"007,1,2.5,3.0,17,4,news,a|b\n8,0,,3,18,5,,\n+7,1,1.25,2e0,19,0,shop,b\n"))
    block["data"].update(paths=[str(src)], dir=str(tmp_path / "out"))
    meta = prepare(from_dict(RunConfig, block).data, progress=False)
    assert meta.dense_features == ["price", "visits"] and meta.sparse_features == ["user_id", "category", "site", "tags"]
    assert meta.multi_valued == ["tags"] and sum(meta.rows.values()) == 3


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ints=st.lists(st.tuples(st.integers(-10 ** 20, 10 ** 20), st.sampled_from(["", "+"]), st.integers(0, 3)),
                     min_size=1, max_size=8),
       floats=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1, max_size=8))
def test_typed_spellings_normalise_to_one_value(tmp_path, ints, floats):
    """Any spelling of an integer ('+', leading zeros, beyond int64) reads as its decimal digits, and any exact
    spelling of a double as the double's shortest form: the same strings a Parquet column of numbers gives."""
    n = max(len(ints), len(floats))
    lines = ["y,i,f"]
    for k in range(n):
        i = ""
        if k < len(ints):
            v, plus, zeros = ints[k]
            i = ("-" if v < 0 else plus) + "0" * zeros + str(abs(v))
        f = "" if k >= len(floats) else [repr, "{:.17e}".format, "{:.17g}".format][k % 3](floats[k])
        lines.append(f"1,{i},{f}")
    src = tmp_path / "t.csv"
    src.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(format="csv", label="y", types={"i": "int", "f": "float"})
    table = read_all(SourceReader(input_schema(cfg, "csv"), [str(src)]))
    assert table.column("i").to_pylist() == [str(v) for v, _, _ in ints] + [None] * (n - len(ints))
    expected = pa.array(floats, pa.float64()).cast(pa.string()).to_pylist() + [None] * (n - len(floats))
    assert table.column("f").to_pylist() == expected
