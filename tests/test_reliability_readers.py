"""Property tests of the raw readers: random bytes, wrong column counts, huge values, other encodings, empty files."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharded_mde.data import DataWarning, SourceReader
from test_data_readers import criteo_line, read_all

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FIELD = st.text(alphabet=st.characters(blacklist_characters="\t\n\r", blacklist_categories=("Cs",)), max_size=6)
BAD_LINE = st.one_of(
    st.lists(FIELD, max_size=45).map("\t".join),  # wrong column count (or, rarely, a right one)
    st.integers(41, 60).map(lambda n: "\t".join(["1"] * n)),  # too many columns
    st.sampled_from(["9" * 400, "1e999", "-1e999", "nan", "0x1F", "１２"]).map(  # huge / odd numbers in I1
        lambda v: criteo_line(1).replace(criteo_line(1).split("\t")[1], v, 1)),
)


@FAST
@given(raw=st.binary(max_size=400), strict=st.booleans())
def test_random_bytes_are_read_or_one_error_naming_the_file(tmp_path: Path, raw: bytes, strict: bool) -> None:
    path = tmp_path / "day_0.tsv"
    path.write_bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        try:
            reader = SourceReader("criteo_tsv", [str(path)], strict=strict)
            rows = sum(t.num_rows for t in reader)
        except ValueError as e:
            assert "\n" not in str(e) and str(path) in str(e), str(e)
            return
    lines = raw.count(b"\n") + (0 if raw.endswith(b"\n") or not raw else 1)
    assert rows + reader.skipped <= lines  # no row appears from nowhere


@FAST
@given(bad=st.dictionaries(st.integers(1, 30), BAD_LINE, max_size=8))
def test_every_line_is_read_or_counted_as_skipped(tmp_path: Path, bad: dict) -> None:
    """Valid lines are all read, in order; each bad line is skipped and counted, never silently lost or kept."""
    lines = [criteo_line(i) for i in range(1, 31)]
    for i, text in bad.items():
        lines[i - 1] = text
    path = tmp_path / "day_0.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        try:
            reader = SourceReader("criteo_tsv", [str(path)])
            table = read_all(reader)
        except ValueError as e:  # only a first line the reader cannot lay out may stop it
            assert str(path) in str(e) and 1 in bad, str(e)
            return
    good = [i for i in range(1, 31) if i not in bad]
    assert table.num_rows + reader.skipped == 30
    assert table.num_rows >= len(good)
    labels = table.column("label").to_pylist()
    assert set(labels) <= {0.0, 1.0}, labels


def test_strict_reports_the_first_bad_line(tmp_path: Path) -> None:
    lines = [criteo_line(i) for i in range(1, 11)]
    lines[6] = "1\t2\t3"
    path = tmp_path / "day_0.tsv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{path} line 7: malformed"):
        read_all(SourceReader("criteo_tsv", [str(path)], strict=True))


def test_a_line_that_is_not_utf8_is_skipped_and_counted_or_strict_names_it(tmp_path: Path) -> None:
    """Latin-1 bytes on line 2 of 3: that line is skipped and counted, the other two read; strict names line 2."""
    latin = tmp_path / "latin.tsv"
    lines = [criteo_line(i) for i in range(1, 4)]
    lines[1] = lines[1].replace("\t0000000", "\t\xe9\xe8", 1)
    latin.write_bytes("".join(f"{line}\n" for line in lines).encode("latin-1"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        reader = SourceReader("criteo_tsv", [str(latin)])
        table = read_all(reader)
    assert table.num_rows == 2 and reader.skipped == 1
    assert any(f"{latin} line 2: skipped malformed line (bytes that are not UTF-8)" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match=rf"{latin} line 2: malformed \(bytes that are not UTF-8\)"):
        read_all(SourceReader("criteo_tsv", [str(latin)], strict=True))


def test_a_file_of_only_malformed_lines_is_an_error_naming_it(tmp_path: Path) -> None:
    good, bad = tmp_path / "day_0.tsv", tmp_path / "day_1.tsv"
    good.write_text(criteo_line(1) + "\n")
    bad.write_text("1\t2\t3\nnot\ta\trow\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        with pytest.raises(ValueError, match=rf"{bad}: no valid row \(2 malformed lines skipped"):
            read_all(SourceReader("criteo_tsv", [str(good), str(bad)]))


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(ValueError, match=rf"{empty}: empty file"):
        SourceReader("criteo_tsv", [str(empty)])
