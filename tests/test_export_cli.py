"""`sharded-mde export` and `serve-check` on a prepared data directory, and tools/bench_serving.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from sharded_mde.cli import main
from sharded_mde.config import load_config
from sharded_mde.data import DatasetMeta, prepare
from sharded_mde.export import read_manifest
from sharded_mde.export.serve import score
from sharded_mde.export.stage import load_requests
from sharded_mde.modules.model import build_model
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.train.checkpoint import MODEL, save_checkpoint
from sharded_mde.train.metrics import classification_metrics
from tiny_configs import write_run_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """A small prepared data set, a config, and a one-rank checkpoint of the full model and of a wider one."""
    d = tmp_path_factory.mktemp("export_cli")
    config = write_run_config(d, model={"embedding_dim": 8}, export={"serve_batch_size": 256})
    cfg = load_config(config)
    prepare(cfg.data, progress=False)
    meta = DatasetMeta.load(cfg.data.dir)
    for name, dim in (("small", 8), ("wide", 16)):
        torch.manual_seed(0)
        model_cfg = yaml.safe_load(config.read_text())["model"]
        cfg_dim = load_config(config, {"model": {**model_cfg, "embedding_dim": dim}})
        model = build_model(cfg_dim.model, full_table_configs(cfg_dim), meta.sparse_features, len(meta.dense_features),
                            device=torch.device("cpu"))
        save_checkpoint(d / name / "checkpoints", 5, {MODEL: model.state_dict()}, {})
        if name == "small":
            model.eval()
            requests = load_requests(cfg.data.dir, "test", 256, torch.device("cpu"))
            logits, labels, _ = score(lambda x, kjt: model.model(x, kjt).squeeze(-1), requests, torch.device("cpu"))
            expected = classification_metrics(logits, labels)
    return d, config, expected


def test_export_then_serve_check_reproduces_the_model(run, capsys: pytest.CaptureFixture) -> None:
    d, config, expected = run
    out = d / "export"
    assert main(["export", str(config), "--checkpoint", str(d / "small"), "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dropped_tables"] == [] and report["bytes"]["vocab"] > 0
    assert sorted(p.name for p in (out / "vocab").iterdir()) == sorted(f"{f}.parquet" for f in DatasetMeta.load(d / "data").sparse_features)
    assert main(["serve-check", str(config), "--export", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["auc"] == expected["auc"] and result["logloss"] == expected["logloss"]
    assert result["rows"] == expected["rows"] and result["examples_per_s"] > 0 and result["scripted"]
    assert main(["serve-check", str(config), "--export", str(out), "--dtype", "int8", "--eager"]) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert abs(int8["auc"] - expected["auc"]) < 5e-3 and int8["serving_table_bytes"] < result["serving_table_bytes"]
    # bad input is one line naming the file, exit status 2
    assert main(["export", str(config), "--checkpoint", str(d / "small"), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    (out / "head.arrow").write_bytes(b"changed")
    assert main(["serve-check", str(config), "--export", str(out)]) == 2
    assert "head.arrow: checksum mismatch" in capsys.readouterr().err


def test_bench_serving_compares_two_exports(run, tmp_path: Path) -> None:
    d, config, _ = run
    for name in ("small", "wide"):
        assert main(["export", str(config), "--checkpoint", str(d / name), "--out", str(tmp_path / name)]) == 0
    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "tools" / "bench_serving.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main([str(config), "--compact", str(tmp_path / "small"), "--full", str(tmp_path / "wide"),
                       "--dtypes", "fp32,int8", "--repeats", "2", "--max-batches", "2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["machine"]["cores"] and doc["results"]["device"]
    for dtype in ("fp32", "int8"):
        r = doc["results"]["dtypes"][dtype]
        assert len(r["compact"]["examples_per_s"]) == 2 and r["ratio_median"] > 0
        # rows x dim x 4 for fp32; int8 rows are dim + 4 bytes (fp16 scale and bias), alignment 1, each table
        # padded to FBGEMM's 128-byte line
        rows = [t.rows for t in read_manifest(tmp_path / "small").tables]
        line = {"fp32": 1, "int8": 128}[dtype]
        small, wide = ({"fp32": 4 * dim, "int8": dim + 4}[dtype] for dim in (8, 16))
        padded = [sum(-(-n * width // line) * line for n in rows) for width in (small, wide)]
        assert r["bytes_ratio"] == pytest.approx(padded[0] / padded[1])
