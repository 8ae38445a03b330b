"""The shipped configs: every one loads; the real-data ones parse small files of their public format
(prepare: feature counts, vocabulary thresholds, day-ordered splits) and build and train their model."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sharded_mde.config import RunConfig, load_config
from sharded_mde.data import DatasetMeta, Vocabulary, prepare
from sharded_mde.data.splits import assign_splits
from sharded_mde.data.vocab import MISSING_ID, NUM_RESERVED, OOV_ID, vocab_path
from sharded_mde.plan.cli import load_plan_config
from sharded_mde.plan.tables import load_table_preset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
AVAZU_HEADER = ("id,click,hour,C1,banner_pos,site_id,site_domain,site_category,app_id,app_domain,app_category,"
                "device_id,device_ip,device_model,device_type,device_conn_type,C14,C15,C16,C17,C18,C19,C20,C21")
TOPOLOGY = {"criteo_kaggle": "gpu_8x80gb", "criteo_kaggle_pme": "gpu_8x80gb", "avazu": "gpu_8x80gb",
            "criteo_terabyte": "gpu_2x8x80gb"}


def _plan_args(config: str | None, topology: str | None = None, tables: str | None = None) -> argparse.Namespace:
    """The arguments `sharded-mde plan` parses into, for `load_plan_config`."""
    return argparse.Namespace(config=config, topology=topology, tables=tables, set=[])


# --------------------------------------------------------------------------- every preset loads


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_run_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.run_dir.startswith("runs/")


@pytest.mark.parametrize("path", sorted((CONFIGS / "topologies").glob("*.yaml")), ids=lambda p: p.name)
def test_topology_preset_loads(path: Path) -> None:
    plan = load_plan_config(_plan_args(None, topology=str(path))).plan
    assert plan.world_size % (plan.local_world_size or plan.world_size) == 0


@pytest.mark.parametrize("path", sorted((CONFIGS / "tables").glob("*.yaml")), ids=lambda p: p.name)
def test_table_preset_loads(path: Path) -> None:
    tables = load_table_preset(str(path))
    assert [t.feature_names[0] for t in tables] == [f"C{i}" for i in range(1, 27)]


@pytest.mark.parametrize("name", sorted(TOPOLOGY))
def test_real_data_config_plans_on_its_topology_preset(name: str) -> None:
    path = str(CONFIGS / f"{name}.yaml")
    cfg = load_config(path)
    on_preset = load_plan_config(_plan_args(path, topology=str(CONFIGS / "topologies" / f"{TOPOLOGY[name]}.yaml")))
    assert cfg.plan == on_preset.plan
    assert cfg.train.batch_size == cfg.plan.batch_size


def test_pme_variant_shares_the_kaggle_data_model_and_training() -> None:
    ham, pme = load_config(CONFIGS / "criteo_kaggle.yaml"), load_config(CONFIGS / "criteo_kaggle_pme.yaml")
    assert (ham.search.method, pme.search.method) == ("ham", "pme")
    assert (pme.data, pme.model, pme.train, pme.plan) == (ham.data, ham.model, ham.train, ham.plan)
    assert pme.run_dir != ham.run_dir


# --------------------------------------------------------------------------- split cuts at full size


def _split_starts(total: int, fractions: Sequence[float]) -> Tuple[int, int]:
    """First row of valid and of test under the sequential split, by bisection on `assign_splits`."""
    def first(k: int) -> int:
        lo, hi = 0, total
        while lo < hi:
            mid = (lo + hi) // 2
            if assign_splits(np.array([mid]), total, fractions, "sequential")[0] >= k:
                hi = mid
            else:
                lo = mid + 1
        return lo
    return first(1), first(2)


def test_terabyte_split_cuts_exactly_at_day_23_and_halves_it() -> None:
    cfg = load_config(CONFIGS / "criteo_terabyte.yaml")
    train_rows, day_23 = 4_195_197_692, 178_274_637
    assert _split_starts(train_rows + day_23, cfg.data.split) == (train_rows, train_rows + 89_137_319)


def test_kaggle_split_is_six_days_then_the_seventh_halved() -> None:
    cfg = load_config(CONFIGS / "criteo_kaggle.yaml")
    total = 45_840_617
    valid, test = _split_starts(total, cfg.data.split)
    assert abs(valid - 6 * total / 7) <= 1
    assert abs((test - valid) - (total - test)) <= 1


# --------------------------------------------------------------------------- small files of the public formats


def _hex(rng: np.random.Generator, pool: int, salt: int) -> str:
    """An 8-hex-char categorical value (as Criteo and Avazu write them) from a skewed pool."""
    v = min(int(rng.zipf(1.6)), pool)
    return f"{(v * 2654435761 + salt * 40503) % (1 << 32):08x}"


def _criteo_lines(rng: np.random.Generator, rows: int, day: int) -> List[str]:
    """Criteo TSV lines: label, I1..I13, C1..C26; I1 carries the day (to check the split), some fields empty."""
    lines = []
    for _ in range(rows):
        dense = [str(day)] + ["" if rng.random() < 0.2 else str(int(rng.integers(-3, 500))) for _ in range(12)]
        sparse = ["" if rng.random() < 0.1 else _hex(rng, 60, f) for f in range(26)]
        lines.append("\t".join([str(int(rng.integers(0, 2))), *dense, *sparse]))
    return lines


def _avazu_lines(rng: np.random.Generator, rows: int, day: int) -> List[str]:
    """Avazu CSV rows in the header's column order; `hour` is YYMMDDHH of the day (to check the split)."""
    lines = []
    for _ in range(rows):
        fields = [str(10 * int(rng.integers(10**17, 10**18)) + 9),  # ids reach 1e19 (past int64)
                  str(int(rng.integers(0, 2))), f"1410{21 + day:02d}00",
                  str(rng.choice([1005, 1002, 1010])), str(int(rng.integers(0, 2))),
                  *(_hex(rng, 30, f) for f in range(6)),                                    # site_*, app_*
                  "a99f214a", f"{int(rng.integers(0, 1 << 32)):08x}", _hex(rng, 30, 7),    # device_id, _ip, _model
                  str(rng.choice([0, 1, 4])), str(rng.choice([0, 2, 3])),
                  *(str(int(min(rng.zipf(1.5), 50))) for _ in range(8))]                    # C14..C21
        lines.append(",".join(fields))
    return lines


def _write(path: Path, lines: List[str], header: str = "") -> None:
    path.write_text("".join(line + "\n" for line in ([header] if header else []) + lines))


def _prepared(config: str, tmp: Path, paths: List[str], overrides: Dict) -> Tuple[RunConfig, DatasetMeta]:
    """The shipped config pointed at `paths` in `tmp`, its data prepared there."""
    cfg = load_config(CONFIGS / config, {"run_dir": str(tmp / "run"), **overrides,
                                         "data": {"paths": paths, "dir": str(tmp / "data")}})
    return cfg, prepare(cfg.data, progress=False)


def _split(meta: DatasetMeta, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p, _ in meta.split_parts(split)])


def _days_of_criteo_split(meta: DatasetMeta, split: str) -> set:
    """The days (written into I1, stored as log(1 + I1)) of a processed split's rows."""
    return {int(round(math.expm1(x))) for x in _split(meta, split).column("I1").to_pylist()}


def _assert_vocab_threshold(meta: DatasetMeta, min_count: int) -> None:
    """Every kept value was seen at least min_count times, rarer ones and empties are in the train split."""
    for f in meta.sparse_features:
        counts = pq.read_table(vocab_path(meta.dir, f)).column("count").to_numpy()
        assert (counts >= min_count).all() and meta.num_embeddings[f] == len(counts) + NUM_RESERVED
    ids = np.concatenate([_split(meta, "train").column(f).to_numpy() for f in meta.sparse_features])
    assert (ids == OOV_ID).any()
    assert ids.max() < max(meta.num_embeddings.values())


SMALL_TRAINING = {"train": {"batch_size": 32, "epochs": 1, "checkpoint_every": 0, "progress": False}}


@pytest.fixture(scope="module")
def kaggle(tmp_path_factory: pytest.TempPathFactory) -> Tuple[RunConfig, DatasetMeta]:
    tmp = tmp_path_factory.mktemp("criteo_kaggle")
    rng = np.random.default_rng(0)
    _write(tmp / "train.txt", [line for day in range(7) for line in _criteo_lines(rng, 40, day)])
    return _prepared("criteo_kaggle.yaml", tmp, [str(tmp / "train.txt")], SMALL_TRAINING)


@pytest.fixture(scope="module")
def avazu(tmp_path_factory: pytest.TempPathFactory) -> Tuple[RunConfig, DatasetMeta]:
    tmp = tmp_path_factory.mktemp("avazu")
    rng = np.random.default_rng(1)
    _write(tmp / "train", [line for day in range(10) for line in _avazu_lines(rng, 30, day)], header=AVAZU_HEADER)
    return _prepared("avazu.yaml", tmp, [str(tmp / "train")], SMALL_TRAINING)


def test_criteo_kaggle_prepares_train_txt(kaggle: Tuple[RunConfig, DatasetMeta]) -> None:
    cfg, meta = kaggle
    assert (len(meta.dense_features), len(meta.sparse_features)) == (13, 26)
    assert meta.skipped_lines == 0  # empty fields and negative counts are valid lines
    assert meta.rows == {"train": 240, "valid": 20, "test": 20}
    assert _days_of_criteo_split(meta, "train") == set(range(6))
    assert _days_of_criteo_split(meta, "valid") == _days_of_criteo_split(meta, "test") == {6}
    _assert_vocab_threshold(meta, cfg.data.min_count)
    train = _split(meta, "train")
    assert any((train.column(f).to_numpy() == MISSING_ID).any() for f in meta.sparse_features)
    assert not np.isnan(train.column("I2").to_numpy()).any()  # empty dense -> 0 after log(1 + x)


def test_criteo_terabyte_prepares_the_24_day_files_in_day_order(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "criteo_terabyte.yaml")
    names = [Path(p).name for p in cfg.data.paths]
    assert names == [f"day_{d}" for d in range(24)]
    f_train = cfg.data.split[0]
    per_day = 20
    last = round(23 * per_day * (1 - f_train) / f_train)  # day 23's share of the rows, as in the real logs
    rng = np.random.default_rng(2)
    for d in range(24):
        _write(tmp_path / names[d], _criteo_lines(rng, last if d == 23 else per_day, d))
    cfg, meta = _prepared("criteo_terabyte.yaml", tmp_path, [str(tmp_path / n) for n in names], {})
    assert (len(meta.dense_features), len(meta.sparse_features)) == (13, 26)
    assert meta.rows["train"] == 23 * per_day and meta.rows["valid"] > 0 and meta.rows["test"] > 0
    assert abs(meta.rows["valid"] - meta.rows["test"]) <= 1
    assert _days_of_criteo_split(meta, "train") == set(range(23))
    assert _days_of_criteo_split(meta, "valid") == _days_of_criteo_split(meta, "test") == {23}
    assert max(meta.num_embeddings.values()) <= cfg.data.max_vocab + NUM_RESERVED


def test_avazu_prepares_the_train_csv(avazu: Tuple[RunConfig, DatasetMeta]) -> None:
    cfg, meta = avazu
    assert meta.dense_features == []
    assert meta.sparse_features == AVAZU_HEADER.split(",")[2:] and len(meta.sparse_features) == 22
    assert meta.skipped_lines == 0
    assert meta.rows == {"train": 240, "valid": 30, "test": 30}
    hours = Vocabulary.load(meta.dir, "hour").values.to_pylist()
    assert {int(h[4:6]) for h in hours} == set(range(21, 29))  # the vocabulary holds training hours only
    assert {int(hours[i - NUM_RESERVED][4:6]) for i in _split(meta, "train").column("hour").to_pylist()} \
        == set(range(21, 29))
    for s in ("valid", "test"):  # days 29 and 30: later than every training hour, so out of vocabulary
        assert set(_split(meta, s).column("hour").to_pylist()) == {OOV_ID}
    _assert_vocab_threshold(meta, cfg.data.min_count)  # device_ip: almost every value seen once


# --------------------------------------------------------------------------- the configs' models train


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # Avazu: a dense arch with no input
def test_real_data_models_build_and_train(kaggle: Tuple[RunConfig, DatasetMeta],
                                          avazu: Tuple[RunConfig, DatasetMeta]) -> None:
    from sharded_mde.train.distributed import init_distributed, shutdown_distributed
    from sharded_mde.train.run import train_stage

    env = init_distributed(prefer_cuda=False)
    try:
        for cfg, meta in (kaggle, avazu):
            _, metrics = train_stage(cfg, env, "baseline")
            assert metrics["steps"] == meta.rows["train"] // cfg.train.batch_size
            assert metrics["test"]["rows"] == meta.rows["test"] and 0 <= metrics["test"]["auc"] <= 1
            assert math.isfinite(metrics["test"]["logloss"])
            assert [t["dim"] for t in metrics["tables"]] == [cfg.model.embedding_dim] * len(meta.sparse_features)
            assert [t["rows"] for t in metrics["tables"]] == [meta.num_embeddings[f] for f in meta.sparse_features]
    finally:
        shutdown_distributed()
