"""A multi-hot model end to end: prepare (a Parquet list<string> field), train, export, serve-check.

The data are built here: a mean-pooled genre bag of 0..4 values per row (empty bags included) that
carries the label's signal, beside single-valued user and item ids. `sharded-mde train` (one
process, TorchRec's planner with the data's mean bag length as the pooling factor) trains it; the
export must record the pooling, and `serve-check` (fp32, TorchScript) must reproduce exactly the
AUC of the trained model scored from its checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from sharded_mde.cli import main
from sharded_mde.config import load_config
from sharded_mde.data import DatasetMeta
from sharded_mde.export.manifest import read_manifest
from sharded_mde.export.serve import score
from sharded_mde.export.stage import load_requests
from sharded_mde.modules.model import build_model
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.retrain import load_dense, read_supernet
from sharded_mde.train.metrics import classification_metrics

ROWS, GENRES = 4000, 12


def write_multi_hot_parquet(path: Path, rows: int = ROWS, seed: int = 0) -> None:
    """Canonical Parquet: label, one dense column, user and item ids, and a genres bag (list<string>) of 0..4."""
    rng = np.random.default_rng(seed)
    genre_weight = rng.normal(0, 1.5, GENRES)
    user_bias = rng.normal(0, 0.5, 60)
    bags, users, logits = [], rng.integers(0, 60, rows), []
    for r in range(rows):
        bag = sorted(rng.choice(GENRES, size=int(rng.integers(0, 5)), replace=False).tolist())
        bags.append([f"g{g}" for g in bag])
        logits.append((genre_weight[bag].mean() if bag else 0.0) + user_bias[users[r]])
    label = (rng.random(rows) < 1 / (1 + np.exp(-np.array(logits)))).astype(np.float32)
    pq.write_table(pa.table({
        "label": pa.array(label, pa.float32()),
        "d0": pa.array(rng.normal(size=rows).astype(np.float32)),
        "user": pa.array([f"u{u}" for u in users]),
        "item": pa.array([f"i{i}" for i in rng.integers(0, 90, rows)]),
        "genres": pa.array(bags, pa.list_(pa.string())),
    }), path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("multihot_cli")
    (d / "raw").mkdir()
    write_multi_hot_parquet(d / "raw" / "part0.parquet")
    config = d / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(d / "run"),
        "data": {"format": "parquet", "paths": [str(d / "raw")], "dir": str(d / "data")},
        "model": {"embedding_dim": 8, "dense_arch": [8, 8], "over_arch": [8, 1], "pooling": {"genres": "mean"}},
        "train": {"batch_size": 256, "epochs": 2, "embedding_lr": 0.1, "dense_lr": 0.01, "progress": False},
        "export": {"serve_batch_size": 256},
    }))
    done = subprocess.run([sys.executable, "-m", "sharded_mde.cli", "train", str(config)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return d, config


def _reference_metrics(config: Path, ckpt: Path) -> dict:
    """The trained model rebuilt unsharded from its checkpoint, scored on the test split's serving requests."""
    cfg = load_config(config)
    meta = DatasetMeta.load(cfg.data.dir)
    tables = full_table_configs(cfg)
    weights, dense = read_supernet(ckpt, {t.name: range(t.embedding_dim) for t in tables})
    model = build_model(cfg.model, tables, meta.sparse_features, len(meta.dense_features), device=torch.device("cpu"))
    load_dense(model, dense)
    with torch.no_grad():
        for name, w in weights.items():
            model.model.sparse_arch.embedding_bags[name].weight.copy_(w)
    model.eval()
    requests = load_requests(cfg.data.dir, "test", cfg.export.serve_batch_size, torch.device("cpu"))
    logits, labels, _ = score(lambda x, kjt: model.model(x, kjt).squeeze(-1), requests, torch.device("cpu"))
    return classification_metrics(logits, labels)


def test_multi_hot_model_exports_and_serve_check_reproduces_its_auc(trained, capsys: pytest.CaptureFixture) -> None:
    d, config = trained
    meta = DatasetMeta.load(d / "data")
    assert meta.multi_valued == ["genres"] and 1.5 < meta.mean_bag_length["genres"] < 2.5
    ckpt = d / "run" / "baseline" / "checkpoints"
    expected = _reference_metrics(config, ckpt)
    assert expected["auc"] > 0.6  # the genre bags carry the label's signal and the model learnt it
    trained_test = json.loads((d / "run" / "baseline" / "metrics.json").read_text())["test"]
    assert trained_test["auc"] == pytest.approx(expected["auc"], abs=1e-6)

    out = d / "export"
    assert main(["export", str(config), "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    capsys.readouterr()
    pooling = {t.features[0]: t.pooling for t in read_manifest(out).tables}
    assert pooling == {"user": "SUM", "item": "SUM", "genres": "MEAN"}
    assert main(["serve-check", str(config), "--export", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scripted"] and result["dtype"] == "fp32" and result["rows"] == expected["rows"]
    assert result["auc"] == expected["auc"] and result["logloss"] == expected["logloss"]
    print(f"multi-hot model: trained AUC {expected['auc']:.6f}, served AUC {result['auc']:.6f} on {result['rows']} rows")


def test_plan_uses_the_mean_bag_length_as_pooling_factor(trained, capsys: pytest.CaptureFixture) -> None:
    d, config = trained
    meta = DatasetMeta.load(d / "data")
    out = d / "plan"
    assert main(["plan", str(config), "--rule", "uniform", "--budget", "0.75", "--out", str(out)]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    factors = {t["name"]: t["full"]["pooling_factors"] for t in report["tables"]}
    assert factors == {f"t_{f}": [pytest.approx(meta.mean_bag_length[f])] for f in meta.sparse_features}
    assert factors["t_genres"][0] == pytest.approx(meta.mean_bag_length["genres"]) and factors["t_user"] == [1.0]
