"""`prepare` on 2 gloo ranks gives the one-process result: vocabularies byte for byte, every split row for row
in the same order, the same metadata; for several TSV files and one TSV file (a multi-valued column, cut by
byte ranges, a malformed line skipped), one Parquet file cut by row groups and the synthetic generator, with
hash and sequential splits, min_count, max_vocab, max_rows and spilled counts. A rank that fails makes every
rank fail, naming the file's line, and leaves no meta.json. Shares are contiguous and cover the input. The
vocabularies are built by every rank, fields shared out by their kept values (in the TSV and Parquet cases
uid, the largest, on rank 0, site and tags on rank 1; spilled, cut by min_count and max_vocab)."""

from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dist_utils import run_ranks
from sharded_mde.config import DataConfig
from sharded_mde.data.group import Group, TorchGroup
from sharded_mde.data.meta import META_FILE, DatasetMeta
from sharded_mde.data.prepare import COUNTING_DIR, _vocab_builders, prepare
from sharded_mde.data.shares import assign_shares
from sharded_mde.data.splits import SPLITS

TSV_ROWS = [1300, 700, 1100]  # uneven files: the 2-rank cut falls between them
PARQUET_ROWS, ROW_GROUP = 3000, 250
MALFORMED_LINE = 2501  # in the second half of one.tsv: rank 1's byte range
META_KEYS = ("dense_features", "sparse_features", "num_embeddings", "rows", "skipped_lines", "multi_valued",
             "mean_bag_length")


def _columns(n: int, seed: int) -> Dict[str, list]:
    """Labels, two dense columns, a many-valued id, a small categorical with missing values, bags of tags."""
    rng = np.random.default_rng(seed)
    ids = rng.zipf(1.3, n) % 5000
    return {"label": rng.integers(0, 2, n).tolist(), "d1": np.round(rng.normal(2, 1, n), 3).tolist(),
            "d2": rng.integers(0, 100, n).tolist(), "uid": [f"u{v}" for v in ids],
            "site": [None if i % 7 == 3 else f"s{int(v)}" for i, v in enumerate(rng.integers(0, 30, n))],
            "tags": [[f"t{int(t)}" for t in rng.integers(0, 60, int(k))] for k in rng.integers(0, 4, n)]}


def write_tsv(path: Path, n: int, seed: int, malformed: int = 0) -> Path:
    """A TSV file with a header; `tags` holds its bag joined by '|', an empty field is a missing value;
    `malformed`: that line (1-based, the header is line 1) has too few columns."""
    c = _columns(n, seed)
    lines = ["label\td1\td2\tuid\tsite\ttags"]
    for i in range(n):
        lines.append("\t".join([str(c["label"][i]), str(c["d1"][i]), str(c["d2"][i]), c["uid"][i],
                                c["site"][i] or "", "|".join(c["tags"][i])]))
    if malformed:
        lines[malformed - 1] = "1\t0.5"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path) -> Path:
    """One canonical Parquet file in many row groups (a list<string> column for the bags)."""
    c = _columns(PARQUET_ROWS, 99)
    table = pa.table({"label": pa.array(c["label"], pa.float32()), "d1": pa.array(c["d1"], pa.float32()),
                      "d2": pa.array(c["d2"], pa.float32()), "uid": c["uid"], "site": c["site"],
                      "tags": pa.array(c["tags"], pa.list_(pa.string()))})
    pq.write_table(table, path, row_group_size=ROW_GROUP)
    return path


def cases(tmp: Path) -> Dict[str, DataConfig]:
    """Each input and setting prepared by 1 and by 2 ranks (their dir is set per run)."""
    tsv = [str(write_tsv(tmp / f"day_{i}.tsv", n, i)) for i, n in enumerate(TSV_ROWS)]
    pqt = [str(write_parquet(tmp / "one.parquet"))]
    text = dict(format="tsv", paths=tsv, dense=["d1", "d2"], multi_valued={"tags": "|"})
    one_tsv = dict(text, paths=[str(write_tsv(tmp / "one.tsv", 3000, 7, malformed=MALFORMED_LINE))])
    return {
        "tsv_hash": DataConfig(**text, min_count=2, count_memory_mb=1),
        "tsv_sequential": DataConfig(**text, split_by="sequential", max_vocab=40),
        "one_tsv_hash": DataConfig(**one_tsv),  # the malformed line is skipped by the rank reading it
        "one_tsv_sequential": DataConfig(**one_tsv, split_by="sequential", max_rows=2900),
        "parquet_hash": DataConfig(format="parquet", paths=pqt, max_vocab=300, count_memory_mb=1),
        "parquet_sequential": DataConfig(format="parquet", paths=pqt, split_by="sequential", min_count=2,
                                         max_rows=2600),
        # generated on rank 0 into <dir>/raw, one row group: one rank has no share and still takes part
        "synth": DataConfig(format="synth", synth_rows=2000, synth_num_dense=2, synth_num_sparse=3,
                            synth_vocab_max=300),
    }


def _two_ranks(rank: int, world: int, configs: Dict[str, DataConfig], bad: DataConfig) -> None:
    group = TorchGroup()
    for cfg in configs.values():
        prepare(cfg, progress=False, group=group)
    with pytest.raises(ValueError) as err:  # rank 1 reads the malformed line; rank 0 must fail as well
        prepare(bad, progress=False, group=group)
    assert f"one.tsv line {MALFORMED_LINE}: malformed" in str(err.value)
    assert str(err.value).startswith("prepare: rank 1 of 2 failed") == (rank == 0)


def _split_rows(data_dir: Path, split: str) -> pa.Table:
    meta = DatasetMeta.load(data_dir)
    return pa.concat_tables([pq.read_table(p) for p, _ in meta.split_parts(split)])


@pytest.mark.filterwarnings("ignore::sharded_mde.data.readers.DataWarning")  # one.tsv's malformed line
def test_two_ranks_prepare_what_one_process_does(tmp_path: Path) -> None:
    configs = cases(tmp_path)
    one = {k: dataclasses.replace(c, dir=str(tmp_path / "one" / k)) for k, c in configs.items()}
    two = {k: dataclasses.replace(c, dir=str(tmp_path / "two" / k)) for k, c in configs.items()}
    bad = dataclasses.replace(configs["one_tsv_hash"], strict=True, dir=str(tmp_path / "two" / "bad"))
    run_ranks(_two_ranks, two, bad)
    assert not (Path(bad.dir) / META_FILE).exists()
    for name in configs:
        a, b = prepare(one[name], progress=False), DatasetMeta.load(two[name].dir)
        for key in META_KEYS:
            assert getattr(a, key) == getattr(b, key), (name, key)
        vocabs = sorted(p.name for p in (Path(a.dir) / "vocab").glob("*.parquet"))
        if name == "synth":
            assert len(b.parts["train"]) == 1  # one row group, one rank's
            assert (Path(a.dir) / "ground_truth.json").read_text() == (Path(b.dir) / "ground_truth.json").read_text()
            assert not (Path(b.dir) / "raw").exists() and len(vocabs) == 3
        else:
            assert any(p.startswith("train/rank00001-") for p, _ in b.parts["train"]), name  # rank 1 wrote parts
            assert vocabs == ["site.parquet", "tags.parquet", "uid.parquet"]
        assert b.skipped_lines == (1 if name.startswith("one_tsv") else 0)
        for v in vocabs:
            assert (Path(a.dir) / "vocab" / v).read_bytes() == (Path(b.dir) / "vocab" / v).read_bytes(), (name, v)
        for split in SPLITS:
            assert _split_rows(Path(a.dir), split).equals(_split_rows(Path(b.dir), split)), (name, split)
        assert not (Path(b.dir) / COUNTING_DIR).exists()
    assert DatasetMeta.load(one["tsv_sequential"].dir).num_embeddings["uid"] == 42  # max_vocab cut it
    assert DatasetMeta.load(one["parquet_sequential"].dir).rows["train"] == 2080  # max_rows, then 80%


def test_shares_are_contiguous_and_cover_the_input(tmp_path: Path) -> None:
    pqt = write_parquet(tmp_path / "one.parquet")
    groups = PARQUET_ROWS // ROW_GROUP
    for world in (1, 2, 3, 5, groups + 3):
        got: List[int] = []
        for s in assign_shares([pqt], text=False, world=world):
            if s.files:
                got.extend(s.row_groups.get(pqt, range(groups)))
        assert got == list(range(groups)), world  # every row group once, in order, ranks in input order
    tsv = [write_tsv(tmp_path / f"f{i}.tsv", n, i) for i, n in enumerate([300, 50, 900])]
    gz = tmp_path / "f3.tsv.gz"
    gz.write_bytes(gzip.compress(tsv[0].read_bytes()))
    everything = b"".join(p.read_bytes() for p in [*tsv, gz])
    for world in (2, 3, 7):
        shares = assign_shares([*tsv, gz], text=True, world=world, quoted=False)
        read = b""
        for s in shares:
            for p in s.files:
                start, end = s.byte_ranges.get(p, (0, p.stat().st_size))
                assert start == 0 or p.read_bytes()[start - 1:start] == b"\n"  # at a line start
                read += p.read_bytes()[start:end]
        assert read == everything, world  # every line once, in input order
        assert all(gz not in s.byte_ranges for s in shares) and any(s.byte_ranges for s in shares)
    quoted = assign_shares(tsv, text=True, world=3, quoted=True)  # a quoted value may hold a line break
    assert not any(s.byte_ranges for s in quoted) and sum(len(s.files) for s in quoted) == 3


def test_one_process_group_agrees_and_reraises() -> None:
    g = Group()
    assert g.agree(lambda: 3) == 3 and g.agree(lambda: 3, share=True) == [3]
    with pytest.raises(ValueError, match="boom"):
        g.agree(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_vocabularies_are_shared_out_by_kept_values() -> None:
    kept = [{"a": ("", 10), "b": ("", 60), "c": ("", 30), "d": ("", 20), "e": ("", 0)},
            {"a": ("", 0), "b": ("", 40), "c": ("", 20), "d": ("", 30), "e": ("", 0)}]  # per owner: (file, rows)
    # largest first, each to the least loaded rank (ties: the lowest): b 100 -> 0, c 50 -> 1, d 50 -> 1,
    # a 10 -> 0, e 0 -> 1
    assert _vocab_builders(list("abcde"), kept, 2) == {"b": 0, "c": 1, "d": 1, "a": 0, "e": 1}
    assert _vocab_builders(list("abcde"), kept, 1) == dict.fromkeys("abcde", 0)
    three = _vocab_builders(list("abcde"), kept, 3)
    assert three == {"b": 0, "c": 1, "d": 2, "a": 1, "e": 2}
    # the same shares as the 2-rank cases above: the largest field (uid) alone on rank 0, site and tags on rank 1
    assert _vocab_builders(["uid", "site", "tags"], [{"uid": ("", 900), "site": ("", 30), "tags": ("", 60)}], 2) \
        == {"uid": 0, "tags": 1, "site": 1}
