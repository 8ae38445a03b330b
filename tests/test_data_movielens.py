"""`data fetch movielens-100k` on a fake recbole wheel with the real layout (tests never download)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sharded_mde.cli import main
from sharded_mde.config import load_config
from sharded_mde.data import movielens, prepare

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "movielens_100k.yaml"
GENRES = ["Action", "Children's", "Film-Noir", "Sci-Fi", "unknown"]


def fake_wheel(path: Path, rows: int = 100_000, users: int = 943, items: int = 1_682, seed: int = 0) -> dict:
    """A zip laid out like the recbole 1.2.1 wheel's ml-100k files; returns what was written."""
    rng = np.random.default_rng(seed)
    u = rng.integers(1, users + 1, rows)
    i = rng.integers(1, items + 1, rows)
    rating = rng.integers(1, 6, rows)
    ts = rng.integers(874_724_710, 893_286_638, rows)
    ts[:3] = [0, 0, 874_724_710]  # two ties (file order kept) and a known Saturday 03:05 UTC
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    inter += [f"{a}\t{b}\t{c}\t{d}" for a, b, c, d in zip(u, i, rating, ts)]
    user = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
    user += [f"{k}\t{18 + k % 50}\t{'MF'[k % 2]}\tocc{k % 21}\tT{k:04d}" for k in range(1, users + 1)]
    classes = {k: " ".join(GENRES[j] for j in range(len(GENRES)) if (k >> j) & 1) for k in range(1, items + 1)}
    years = {k: ("unkonwn" if k == 7 else str(1920 + k % 78)) for k in range(1, items + 1)}
    item = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    item += [f"{k}\tMovie {k} (a, b)\t{years[k]}\t{classes[k]}" for k in range(1, items + 1)]
    with zipfile.ZipFile(path, "w") as z:
        for kind, lines in (("inter", inter), ("user", user), ("item", item)):
            z.writestr(movielens.MEMBER.format(kind), "\n".join(lines) + "\n")
        z.writestr("recbole/__init__.py", "")
    return {"u": u, "i": i, "rating": rating, "ts": ts, "classes": classes, "years": years}


def test_convert_joins_sorts_and_derives_fields(tmp_path):
    wheel = tmp_path / movielens.WHEEL_NAME
    src = fake_wheel(wheel)
    counts = movielens.convert_wheel(wheel, tmp_path / "out.parquet")
    assert counts == {"rows": 100_000, "users": 943, "items": 1_682}
    t = pq.read_table(tmp_path / "out.parquet")
    assert t.column_names == ["label", *movielens.SPARSE]
    assert t.schema.field("label").type == pa.float32() and t.schema.field("genres").type == pa.list_(pa.string())
    assert all(t.schema.field(c).type == pa.string() for c in movielens.SPARSE if c != "genres")
    order = np.argsort(src["ts"], kind="stable")
    rows = t.to_pylist()
    for r in (0, 1, 2, 17, 50_000, 99_999):
        j = order[r]
        row = rows[r]
        k = int(src["i"][j])
        assert row["user_id"] == str(src["u"][j]) and row["item_id"] == str(k)
        assert row["label"] == float(src["rating"][j] >= 4)
        assert row["genres"] == (src["classes"][k].split() if src["classes"][k] else [])
        assert row["release_year"] == (None if k == 7 else src["years"][k])
        assert row["zip"] == f"T{src['u'][j]:04d}" and row["gender"] == "MF"[src["u"][j] % 2]
    assert [r["user_id"] for r in rows[:2]] == [str(src["u"][0]), str(src["u"][1])]  # ties in file order
    assert (rows[0]["hour"], rows[0]["weekday"]) == ("0", "3")  # 1970-01-01 00:00 UTC, a Thursday
    assert (rows[2]["hour"], rows[2]["weekday"]) == ("3", "5")  # 1997-09-20 03:05 UTC, a Saturday
    assert [] in t.column("genres").to_pylist()  # items without a genre: an empty bag


def test_fetch_cli_uses_the_cached_wheel_without_downloading(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    fake_wheel(cache / movielens.WHEEL_NAME, seed=1)
    assert main(["data", "fetch", "movielens-100k", "--cache", str(cache), "--out", str(tmp_path / "ml")]) == 0
    assert '"rows": 100000' in capsys.readouterr().out
    assert pq.read_metadata(tmp_path / "ml" / movielens.OUT_NAME).num_rows == 100_000
    assert sorted(p.name for p in cache.iterdir()) == [movielens.WHEEL_NAME]


def test_wrong_counts_or_layout_is_a_one_line_error(tmp_path):
    wheel = tmp_path / "small.whl"
    fake_wheel(wheel, rows=500, users=20, items=30)
    with pytest.raises(ValueError, match=r"small\.whl: holds .*'rows': 500.* expected MovieLens-100K"):
        movielens.convert_wheel(wheel, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()
    with zipfile.ZipFile(tmp_path / "bare.whl", "w") as z:
        z.writestr("recbole/__init__.py", "")
    with pytest.raises(ValueError, match=r"bare\.whl: .*ml-100k\.inter not found"):
        movielens.convert_wheel(tmp_path / "bare.whl", tmp_path / "out.parquet")


def test_config_reads_the_fetched_file():
    cfg = load_config(CONFIG)
    assert cfg.data.format == "parquet" and cfg.data.split_by == "sequential" and cfg.data.split == [0.8, 0.1, 0.1]
    assert cfg.data.paths == [str(movielens.DEFAULT_OUT / movielens.OUT_NAME)]
    assert cfg.model.embedding_dim == 64 and cfg.run_dir == "runs/movielens_100k"


def test_config_prepares_the_fetched_file_with_genres_as_bags(tmp_path):
    wheel = tmp_path / movielens.WHEEL_NAME
    fake_wheel(wheel, seed=2)
    movielens.convert_wheel(wheel, tmp_path / movielens.OUT_NAME)
    cfg = load_config(CONFIG, {"data": {"paths": [str(tmp_path / movielens.OUT_NAME)], "dir": str(tmp_path / "d")}})
    meta = prepare(cfg.data, progress=False)
    assert meta.rows == {"train": 80_000, "valid": 10_000, "test": 10_000}
    assert meta.multi_valued == ["genres"] and meta.sparse_features == list(movielens.SPARSE)
    assert meta.num_embeddings["genres"] == len(GENRES) + 2 and 1 < meta.mean_bag_length["genres"] < len(GENRES)
