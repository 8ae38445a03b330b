"""`data fetch movielens-100k`: GroupLens MovieLens-100K as canonical Parquet.

The ratings come from the example data inside the `recbole==1.2.1` wheel, fetched with
`pip download --no-deps` into a cache (never installed). Its `ml-100k.{inter,user,item}` files
are tab-separated with typed headers (`user_id:token`, `class:token_seq`, ...). Output: one
Parquet file of 100,000 rows sorted by timestamp (stable): label = rating >= 4 (float32), and
the sparse fields user_id, item_id, age, gender, occupation, zip, release_year, genres
(list<string>, every genre of the item), hour and weekday (UTC, 0 = Monday). The data is
GroupLens's: research use only, no redistribution (docs/data.md).
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Dict, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from sharded_mde.data.readers import LABEL, split_values
from sharded_mde.io import atomic_path

PACKAGE, VERSION = "recbole", "1.2.1"
WHEEL_NAME = f"{PACKAGE}-{VERSION}-py3-none-any.whl"
MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{}"
OUT_NAME = "movielens_100k.parquet"
DEFAULT_CACHE = Path.home() / ".cache" / "sharded_mde"
DEFAULT_OUT = Path("data/raw/movielens_100k")
EXPECTED = {"rows": 100_000, "users": 943, "items": 1_682}
SPARSE = ("user_id", "item_id", "age", "gender", "occupation", "zip", "release_year", "genres", "hour", "weekday")
# columns read from each file (typed header name -> output name)
_COLUMNS = {
    "inter": {"user_id:token": "user_id", "item_id:token": "item_id", "rating:float": "rating",
              "timestamp:float": "timestamp"},
    "user": {"user_id:token": "user_id", "age:token": "age", "gender:token": "gender",
             "occupation:token": "occupation", "zip_code:token": "zip"},
    "item": {"item_id:token": "item_id", "release_year:token": "release_year", "class:token_seq": "genres"},
}


def cached_wheel(cache: Union[str, Path]) -> Path:
    """The recbole wheel in `cache`, downloaded with pip (no dependencies, not installed) unless already there."""
    wheel = Path(cache) / WHEEL_NAME
    if wheel.is_file():
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           f"{PACKAGE}=={VERSION}", "-d", str(wheel.parent)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not wheel.is_file():
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"{wheel}: pip download of {PACKAGE}=={VERSION} failed ({tail})")
    return wheel


def _read_member(wheel: zipfile.ZipFile, path: Path, kind: str) -> pa.Table:
    """One of the ml-100k files as strings, checked for its typed header columns, renamed."""
    name = MEMBER.format(kind)
    try:
        raw = wheel.read(name)
    except KeyError:
        raise ValueError(f"{path}: {name} not found in the wheel") from None
    wanted = _COLUMNS[kind]
    try:
        table = pacsv.read_csv(io.BytesIO(raw), parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
                               convert_options=pacsv.ConvertOptions(
                                   column_types={c: pa.string() for c in wanted}, include_columns=list(wanted),
                                   strings_can_be_null=True, null_values=[""]))
    except pa.ArrowInvalid as e:
        raise ValueError(f"{path}: {name}: cannot parse ({str(e).splitlines()[0]})") from None
    return table.rename_columns([wanted[c] for c in table.column_names])


def _unique(table: pa.Table, key: str, path: Path, kind: str) -> pa.Table:
    """`table` with every `key` present and distinct (one user or item per line)."""
    col = table.column(key)
    if col.null_count or pc.count_distinct(col).as_py() != table.num_rows:
        raise ValueError(f"{path}: {MEMBER.format(kind)}: {key} is missing or repeated")
    return table


def _time_fields(ts: np.ndarray) -> Dict[str, pa.Array]:
    """Hour of day and weekday (0 = Monday) in UTC of Unix timestamps, as strings."""
    secs = ts.astype(np.int64)
    days = secs // 86_400
    hour = (secs % 86_400) // 3_600
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday
    return {"hour": pa.array(hour).cast(pa.string()), "weekday": pa.array(weekday).cast(pa.string())}


def convert_wheel(wheel: Union[str, Path], out_file: Union[str, Path]) -> Dict[str, int]:
    """Joins ratings, users and items of the wheel's ml-100k into canonical Parquet at `out_file`;
    returns the row, user and item counts (a ValueError unless they are MovieLens-100K's)."""
    path = Path(wheel)
    try:
        with zipfile.ZipFile(path) as z:
            inter, users, items = (_read_member(z, path, k) for k in ("inter", "user", "item"))
    except (OSError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: cannot read the wheel ({e})") from None
    users, items = _unique(users, "user_id", path, "user"), _unique(items, "item_id", path, "item")
    try:
        ts = pc.cast(inter.column("timestamp"), pa.float64()).to_numpy()
        rating = pc.cast(inter.column("rating"), pa.float64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise ValueError(f"{path}: {MEMBER.format('inter')}: non-numeric rating or timestamp") from None
    if np.isnan(ts).any() or np.isnan(rating).any():
        raise ValueError(f"{path}: {MEMBER.format('inter')}: missing rating or timestamp")
    order = pa.array(np.argsort(ts, kind="stable"))
    u_idx = pc.index_in(inter.column("user_id"), value_set=users.column("user_id"))
    i_idx = pc.index_in(inter.column("item_id"), value_set=items.column("item_id"))
    if u_idx.null_count or i_idx.null_count:
        raise ValueError(f"{path}: {MEMBER.format('inter')}: a rating names a user or item not in the user/item file")
    year = items.column("release_year")  # "unkonwn" (sic) for one item: missing
    year = pc.if_else(pc.match_substring_regex(year, r"^\d{4}$"), year, pa.scalar(None, pa.string()))
    genres = split_values(items.column("genres"), " ")  # no genre: an empty bag
    cols = {LABEL: pa.array((rating >= 4).astype(np.float32)),
            "user_id": inter.column("user_id"), "item_id": inter.column("item_id")}
    for c in ("age", "gender", "occupation", "zip"):
        cols[c] = users.column(c).take(u_idx)
    cols["release_year"] = year.take(i_idx)
    cols["genres"] = genres.take(i_idx)
    cols.update(_time_fields(ts))
    table = pa.table({k: (v.combine_chunks() if isinstance(v, pa.ChunkedArray) else v) for k, v in cols.items()})
    table = table.take(order)
    counts = {"rows": table.num_rows, "users": users.num_rows, "items": items.num_rows}
    if counts != EXPECTED:
        raise ValueError(f"{path}: holds {counts}, expected MovieLens-100K's {EXPECTED}")
    with atomic_path(Path(out_file)) as tmp:
        pq.write_table(table, tmp)
    return counts


def fetch(cache: Union[str, Path] = DEFAULT_CACHE, out: Union[str, Path] = DEFAULT_OUT) -> Dict[str, object]:
    """MovieLens-100K as `<out>/movielens_100k.parquet`, from the wheel cached in `cache` (fetched if absent)."""
    wheel = cached_wheel(cache)
    out_file = Path(out) / OUT_NAME
    counts = convert_wheel(wheel, out_file)
    return {"out": str(out_file), "wheel": str(wheel), **counts}
