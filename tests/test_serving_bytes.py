"""The serving byte model (`dims.serving_*`) against FBGEMM's own rule, real TBE storage, and the export."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_inference import rounded_row_size_in_bytes
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.embedding_configs import DataType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from sharded_mde.cli import main
from sharded_mde.config import PlanConfig, load_config
from sharded_mde.data import DatasetMeta, prepare
from sharded_mde.dims import (SERVING_DTYPES, legal_serving_dim, serving_bytes_of, serving_dim_multiple,
                              serving_row_bytes, serving_table_bytes)
from sharded_mde.export import load_tables, read_manifest
from sharded_mde.export.tablefile import encode
from sharded_mde.modules.model import build_model
from sharded_mde.plan.report import memory_report, render_markdown
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.train.checkpoint import MODEL, save_checkpoint
from tiny_configs import write_run_config

SPARSE = {"fp32": SparseType.FP32, "fp16": SparseType.FP16, "int8": SparseType.INT8, "int4": SparseType.INT4}
DATA = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8, "int4": DataType.INT4}


def _configs(spec: List[Tuple[int, int]], dtype: str = "fp32") -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t{i}", num_embeddings=r, embedding_dim=d, feature_names=[f"f{i}"],
                               data_type=DATA[dtype]) for i, (r, d) in enumerate(spec)]


def _storage_bytes(module: nn.Module) -> int:
    """Bytes the tables of a served module really hold: TBE weight buffers, or a float EBC's parameters."""
    if isinstance(module, EmbeddingBagCollection):
        return sum(p.numel() * p.element_size() for p in module.parameters())
    return sum(t.weights_host.numel() + t.weights_dev.numel() + t.weights_uvm.numel() for t in module.tbes)


@pytest.mark.parametrize("row_alignment", [1, 16, 32])
def test_row_bytes_are_fbgemm_rounded_row_size(row_alignment: int) -> None:
    for dtype in SERVING_DTYPES:
        for dim in range(4, 257, 4):
            assert serving_row_bytes(dim, dtype, row_alignment) == \
                rounded_row_size_in_bytes(dim, SPARSE[dtype], row_alignment), (dtype, dim)
    assert serving_row_bytes(4, "int8", 16) == 16 == serving_row_bytes(4, "fp32", 16)  # alignment makes small dims dear


def test_legal_dims_are_what_fbgemm_quantises_and_serves() -> None:
    assert [serving_dim_multiple(d) for d in SERVING_DTYPES] == [1, 1, 2, 4]
    for dtype in SERVING_DTYPES:
        for dim in range(1, 13):
            try:
                encode(torch.randn(3, dim), dtype)  # FBGEMM's row-wise quantiser (the export's and TorchRec's)
                QuantEmbeddingBagCollection(_configs([(5, dim)], dtype), is_weighted=False, device=torch.device("cpu"),
                                            register_tbes=True, row_alignment=1)
                served = True
            except (RuntimeError, AssertionError):
                served = False
            assert legal_serving_dim(dim, dtype) == served, (dtype, dim)
    assert not legal_serving_dim(0, "fp32") and not legal_serving_dim(6, "int4") and legal_serving_dim(6, "int8")
    with pytest.raises(ValueError, match="serving dtype must be one of fp32, fp16, int8, int4, got 'int2'"):
        serving_row_bytes(8, "int2")


@pytest.mark.parametrize("row_alignment", [1, 16, 32])
def test_table_bytes_are_the_quantised_tbe_storage(row_alignment: int) -> None:
    """Mixed dims and row counts that leave partial 128-byte lines: the byte model equals the TBE's buffers."""
    spec = [(5000, 16), (4001, 12), (3000, 4), (1999, 8), (1000, 64), (7, 4)]
    for dtype in ("fp16", "int8", "int4"):
        qebc = QuantEmbeddingBagCollection(_configs(spec, dtype), is_weighted=False, device=torch.device("cpu"),
                                           register_tbes=True, row_alignment=row_alignment)
        assert _storage_bytes(qebc) == serving_bytes_of(_configs(spec), dtype, row_alignment)
        for tbe in qebc.tbes:
            for (name, rows, dim, _, _), (weight, scale_bias) in zip(tbe.embedding_specs, tbe.split_embedding_weights()):
                width = weight.shape[1] + (0 if scale_bias is None else scale_bias.shape[1])  # unpadded row
                assert weight.shape[0] == rows and width == serving_row_bytes(dim, dtype, 1), (dtype, name)
                assert weight.stride(0) == serving_row_bytes(dim, dtype, row_alignment), (dtype, name)  # padded pitch
    ebc = EmbeddingBagCollection(tables=_configs(spec), device=torch.device("meta"))
    assert _storage_bytes(ebc) == serving_bytes_of(_configs(spec), "fp32", row_alignment) == sum(r * d * 4 for r, d in spec)
    assert serving_table_bytes(7, 4, "int8", 1) == 128 and serving_table_bytes(100, 0, "int4", 16) == 0


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    """A small prepared data set, a config, and an export of a model with 12-dim tables."""
    d = tmp_path_factory.mktemp("serving_bytes")
    config = write_run_config(d, data={"synth_rows": 2000}, model={"embedding_dim": 12, "dense_arch": [8, 12]},
                              export={"serve_batch_size": 512})
    cfg = load_config(config)
    prepare(cfg.data, progress=False)
    meta = DatasetMeta.load(cfg.data.dir)
    torch.manual_seed(0)
    model = build_model(cfg.model, full_table_configs(cfg), meta.sparse_features, len(meta.dense_features),
                        device=torch.device("cpu"))
    save_checkpoint(d / "ckpt" / "checkpoints", 1, {MODEL: model.state_dict()}, {})
    assert main(["export", str(config), "--checkpoint", str(d / "ckpt"), "--out", str(d / "export")]) == 0
    return config, d / "export"


@pytest.mark.parametrize("row_alignment", [1, 16])
def test_serve_check_report_and_real_tbe_agree_to_the_byte(exported, row_alignment: int,
                                                            capsys: pytest.CaptureFixture) -> None:
    config, out = exported
    capsys.readouterr()
    align = ["--set", f"export.row_alignment={row_alignment}"]
    cfg = load_config(config, {"export": {"row_alignment": row_alignment, "serve_batch_size": 512}})
    tables = full_table_configs(cfg)
    rep = memory_report(tables, tables, PlanConfig(world_size=1), row_alignment=row_alignment)
    manifest = read_manifest(out)
    assert {t.name: (t.rows, t.dim) for t in manifest.tables} == {t.name: (t.num_embeddings, t.embedding_dim) for t in tables}
    for dtype in SERVING_DTYPES:
        assert main(["serve-check", str(config), "--export", str(out), "--dtype", dtype, "--eager"] + align) == 0
        check = json.loads(capsys.readouterr().out)
        model_bytes = sum(serving_table_bytes(t.num_embeddings, t.embedding_dim, dtype, row_alignment) for t in tables)
        real = _storage_bytes(load_tables(out, manifest, dtype, row_alignment))
        assert check["serving_table_bytes"] == model_bytes == real == rep["totals"]["serving"]["compact"][dtype], dtype
        assert check["serving_bytes_by_dtype"][dtype] == model_bytes
        assert sum(check["serving_bytes_by_table"].values()) == model_bytes
        assert f"| serving tables {dtype} (row alignment {row_alignment}) | {model_bytes:,} B |" in render_markdown(rep)
    # dim 12: rows of 48 / 24 / 16 / 10 B (fp32 / fp16 / int8 / int4); alignment 16 pads int4 to int8's 16 B
    by = rep["totals"]["serving"]["compact"]
    assert by["int8"] < by["fp16"] < by["fp32"]
    assert by["int4"] < by["int8"] if row_alignment == 1 else by["int4"] == by["int8"]
