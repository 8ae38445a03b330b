"""Mixed-precision export (#19): each table stored and served in the dims file's dtype (fp32/fp16/int8/int4).

Acceptance checks: serve-check's AUC equals the fp32 model's exactly when every table is fp32, and
equals the AUC of the same model with the quantised tables fake-quantised (`fake_quantize_table`,
FBGEMM's own quantise-dequantise) within 1e-4; the served tables' bytes equal the serving byte model
and the planner report to the byte; a row-wise sharded model (2 gloo ranks) exports the same files
and scores the same as its single-process export.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.inference.modules import quantize_embeddings
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from dist_utils import random_batch, run_ranks, table_configs, train_step
from sharded_mde.cli import main
from sharded_mde.config import ModelConfig, TrainConfig, load_config
from sharded_mde.data import DatasetMeta, prepare
from sharded_mde.data.batches import iterate_batches
from sharded_mde.dims import DimsFile, TableDims, save_dims, serving_table_bytes, table_bytes
from sharded_mde.export import export_compact, fake_quantize_table, load_export, load_tables, read_manifest
from sharded_mde.export.manifest import MANIFEST
from sharded_mde.export.mixed import MixedPrecisionEBC
from sharded_mde.export.serve import score
from sharded_mde.export.stage import load_requests, serving_bytes_by_dtype
from sharded_mde.export.tablefile import encode
from sharded_mde.modules.model import build_model
from sharded_mde.plan.report import render_markdown
from sharded_mde.plan.run import plan_and_report
from sharded_mde.plan.sharding import manual_plan
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.train.checkpoint import MODEL, CheckpointReader, save_checkpoint
from sharded_mde.train.metrics import classification_metrics
from sharded_mde.train.sharding import ebc_path, make_optimizer, wrap_model
from tiny_configs import write_run_config

TABLE_DIMS = {"t_C1": 16, "t_C2": 12, "t_C3": 8, "t_C4": 20}
DTYPES = {"t_C1": "fp32", "t_C2": "fp16", "t_C3": "int8", "t_C4": "int4"}
TORCH_DTYPE = {"fp32": torch.float, "fp16": torch.float16, "int8": torch.qint8, "int4": torch.quint4x2}
BATCH = 256
CPU = torch.device("cpu")


def _dims(tables: List[EmbeddingBagConfig], dtypes: Mapping[str, str],
          kept: Optional[Mapping[str, List[int]]] = None) -> DimsFile:
    """A dims file keeping `kept` columns (default all) of each table, with the per-table serving `dtypes`."""
    entries = []
    for t in tables:
        cols = list(kept[t.name]) if kept else list(range(t.embedding_dim))
        entries.append(TableDims(name=t.name, features=list(t.feature_names), num_embeddings=t.num_embeddings,
                                 full_dim=t.embedding_dim, dim=len(cols), kept_columns=cols,
                                 bytes=table_bytes(t.num_embeddings, len(cols)).total, dtype=dtypes.get(t.name, "")))
    full = sum(table_bytes(t.num_embeddings, t.embedding_dim).total for t in tables)
    k = sum(e.bytes for e in entries)
    return DimsFile(method="ham", budget_fraction=k / full, budget_bytes=k, full_bytes=full, kept_bytes=k, tables=entries)


def _fake_quantised(model: nn.Module, dtypes: Mapping[str, str],
                    kept: Optional[Mapping[str, List[int]]] = None) -> nn.Module:
    """A copy of `model` whose tables hold what the export serves: the kept columns (others zero), fake-quantised."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, bag in ref.model.sparse_arch.embedding_bags.items():
            w = bag.weight
            cols = torch.tensor(kept[name]) if kept else torch.arange(w.shape[1])
            served = torch.zeros_like(w)
            served[:, cols] = fake_quantize_table(w[:, cols], dtypes[name])
            w.copy_(served)
    ref.eval()
    return ref


def _storage_bytes(module: nn.Module) -> int:
    """Bytes the served tables really hold: float EBC parameters plus quantised TBE buffers."""
    parts = [module.float_ebc, module.quant_ebc] if isinstance(module, MixedPrecisionEBC) else [module]
    total = 0
    for m in parts:
        if isinstance(m, EmbeddingBagCollection):
            total += sum(p.numel() * p.element_size() for p in m.parameters())
        else:
            total += sum(t.weights_host.numel() + t.weights_dev.numel() + t.weights_uvm.numel() for t in m.tbes)
    return total


# --------------------------------------------------------------------------- the unit the search calls


def test_fake_quantize_table_is_what_the_export_stores_dequantised() -> None:
    torch.manual_seed(0)
    w = torch.randn(37, 12)
    assert torch.equal(fake_quantize_table(w, "fp32"), w)
    assert torch.equal(fake_quantize_table(w, "fp16"), w.half().float())
    for dtype, bits, err in (("int8", 8, 0.02), ("int4", 4, 0.4)):
        fq = fake_quantize_table(w, dtype)
        assert fq.shape == w.shape and fq.dtype == torch.float32
        assert 0 < float((fq - w).abs().max()) < err, dtype
        rows = encode(w, dtype)  # the stored rows: data, then fp16 scale and bias
        scale_bias = rows[:, -4:].contiguous().view(torch.float16).float()
        codes = rows[:, :-4] if bits == 8 else torch.stack([rows[:, :-4] & 15, rows[:, :-4] >> 4], 2).flatten(1)
        want = codes.float() * scale_bias[:, :1] + scale_bias[:, 1:]
        torch.testing.assert_close(fq, want, rtol=0, atol=1e-6)
    assert fake_quantize_table(torch.randn(5, 0), "int4").shape == (5, 0)
    with pytest.raises(ValueError, match=r"^fake_quantize_table: int4 needs a dim that is a multiple of 4, got 6$"):
        fake_quantize_table(torch.randn(3, 6), "int4")
    with pytest.raises(ValueError, match=r"^fake_quantize_table: dtype must be one of fp32, fp16, int8, int4, got 'int2'$"):
        fake_quantize_table(w, "int2")


# --------------------------------------------------------------------------- one process: a trained tiny model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path, nn.Module, List[EmbeddingBagConfig]]:
    """A tiny prepared data set, a model with tables of dims 16/12/8/20 trained one epoch, and its checkpoint."""
    d = tmp_path_factory.mktemp("mixed_precision")
    config = write_run_config(d, model={"embedding_dim": 16, "table_dims": TABLE_DIMS}, export={"serve_batch_size": BATCH})
    cfg = load_config(config)
    prepare(cfg.data, progress=False)
    meta = DatasetMeta.load(cfg.data.dir)
    tables = full_table_configs(cfg)
    assert {t.name: t.embedding_dim for t in tables} == TABLE_DIMS
    torch.manual_seed(0)
    model = build_model(cfg.model, tables, meta.sparse_features, len(meta.dense_features), device=CPU)
    opt = torch.optim.Adagrad(model.parameters(), lr=0.05)
    for batch in iterate_batches(cfg.data.dir, "train", 128):
        train_step(model, opt, batch)
    save_checkpoint(d / "ckpt" / "checkpoints", 1, {MODEL: model.state_dict()}, {})
    model.eval()
    return d, config, model, tables


def _evaluate(model: nn.Module, data_dir: str) -> Tuple[Dict[str, float], torch.Tensor]:
    """The model's test-split metrics, scored on serve-check's requests (the reference evaluation)."""
    requests = load_requests(data_dir, "test", BATCH, CPU)
    logits, labels, _ = score(lambda x, kjt: model.model(x, kjt).squeeze(-1), requests, CPU)
    return classification_metrics(logits, labels), logits


def _export_and_check(d: Path, config: Path, dims: DimsFile, name: str, capsys: pytest.CaptureFixture,
                      *extra: str) -> Dict[str, object]:
    save_dims(d / f"{name}.dims.json", dims)
    capsys.readouterr()
    assert main(["export", str(config), "--checkpoint", str(d / "ckpt"), "--out", str(d / name),
                 "--dims", str(d / f"{name}.dims.json"), "--force", *extra]) == 0
    capsys.readouterr()
    assert main(["serve-check", str(config), "--export", str(d / name), *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_all_fp32_export_scores_exactly_like_the_model(trained, capsys: pytest.CaptureFixture) -> None:
    d, config, model, tables = trained
    check = _export_and_check(d, config, _dims(tables, {}), "fp32", capsys)
    want, _ = _evaluate(model, str(d / "data"))
    assert check["auc"] == want["auc"] and check["logloss"] == want["logloss"] and check["rows"] == want["rows"]
    assert check["dtype"] == "fp32" and set(check["dtypes"].values()) == {"fp32"}
    assert check["serving_table_bytes"] == sum(t.num_embeddings * t.embedding_dim * 4 for t in tables)


@pytest.mark.parametrize("row_alignment", [1, 16])
def test_mixed_export_scores_like_the_fake_quantised_model_and_bytes_agree(
        trained, row_alignment: int, capsys: pytest.CaptureFixture) -> None:
    d, config, model, tables = trained
    dims = _dims(tables, DTYPES)
    check = _export_and_check(d, config, dims, f"mixed{row_alignment}", capsys,
                              "--set", f"export.row_alignment={row_alignment}")
    out = d / f"mixed{row_alignment}"
    manifest = read_manifest(out)
    assert manifest.format_version == 3 and {t.name: t.dtype for t in manifest.tables} == DTYPES
    assert check["dtype"] == "mixed" and check["dtypes"] == DTYPES and check["scripted"]
    assert check["examples_per_s"] > 0

    # AUC: the fake-quantised model's within 1e-4 (and the logits within float rounding of the TBE's sums)
    want, want_logits = _evaluate(_fake_quantised(model, DTYPES), str(d / "data"))
    fp32, fp32_logits = _evaluate(model, str(d / "data"))
    assert float((want_logits - fp32_logits).abs().max()) > 1e-3  # quantising the tables does move the scores
    assert abs(check["auc"] - want["auc"]) <= 1e-4, (check["auc"], want["auc"], fp32["auc"])
    requests = load_requests(d / "data", "test", BATCH, CPU)
    logits, labels, _ = score(load_export(out, row_alignment=row_alignment), requests, CPU)
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5)
    assert classification_metrics(logits, labels)["auc"] == check["auc"]  # eager == the scripted serve-check

    # bytes: serve-check == the byte model == the real storage == the planner report, to the byte
    model_bytes = {t.name: serving_table_bytes(t.num_embeddings, t.embedding_dim, DTYPES[t.name], row_alignment)
                   for t in tables}
    ebc = load_tables(out, manifest, row_alignment=row_alignment)
    assert isinstance(ebc, MixedPrecisionEBC)
    cfg = load_config(config, {"export": {"row_alignment": row_alignment, "serve_batch_size": BATCH}})
    rep = plan_and_report(cfg, dims, str(d / f"mixed{row_alignment}.dims.json"), d / f"plan{row_alignment}")
    total = sum(model_bytes.values())
    assert check["serving_bytes_by_table"] == model_bytes
    assert check["serving_bytes_by_dtype"] == {}  # int8 and int4 rows: no one dtype serves every table
    next(t for t in manifest.tables if t.name == "t_C4").dtype = "int8"  # t_C4: fp32, fp16 and int8 tables can all be served as int8 only
    assert serving_bytes_by_dtype(manifest, row_alignment) == {"int8": sum(
        serving_table_bytes(t.num_embeddings, t.embedding_dim, "int8", row_alignment) for t in tables)}
    assert check["serving_table_bytes"] == total == _storage_bytes(ebc) == rep["totals"]["serving"]["compact"]["per_table"]
    assert f"| serving tables, per-table dtypes (row alignment {row_alignment}) | - | {total:,} B |" in render_markdown(rep)
    assert total < rep["totals"]["serving"]["compact"]["fp16"] < rep["totals"]["serving"]["compact"]["fp32"]

    # per table: fp32 pooled exactly as the model's EBC, quantised ones as TorchRec's own quantize_embeddings
    kjt = requests[0][1]
    pooled = ebc(kjt).to_dict()
    ref = model.model.sparse_arch(kjt).to_dict()
    assert torch.equal(pooled["C1"], ref["C1"])
    float_ebc = copy.deepcopy(model.model.sparse_arch)
    quant_prep_customize_row_alignment(float_ebc, [EmbeddingBagCollection], row_alignment)
    torchrec_q = quantize_embeddings(nn.Sequential(float_ebc), dtype=torch.qint8, inplace=False,
                                     per_table_weight_dtype={n: TORCH_DTYPE[t] for n, t in DTYPES.items() if t != "fp32"})[0]
    theirs = torchrec_q(kjt).to_dict()
    for f in ("C2", "C3", "C4"):
        assert torch.equal(pooled[f], theirs[f]), f


def test_bad_dtype_in_the_manifest_is_one_line_naming_it_and_version_1_still_loads(
        trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    d, config, _, tables = trained
    out = tmp_path / "export"
    export_compact(d / "ckpt", out, load_config(config).model, ["C1", "C2", "C3", "C4"], 3, tables,
                   dims=_dims(tables, DTYPES), progress=False)
    raw = json.loads((out / MANIFEST).read_text())
    b = torch.randn(5, 3)
    kjt = load_requests(d / "data", "test", 5, CPU, max_batches=1)[0][1]
    want = load_export(out)(b, kjt)
    raw["format_version"] = 1  # a version-1 manifest has the same fields: it loads unchanged
    (out / MANIFEST).write_text(json.dumps(raw))
    assert torch.equal(load_export(out)(b, kjt), want)
    for dtype, msg in (("int2", "dtype must be one of fp32, fp16, int8, int4, got 'int2'"),
                       ("int8", None)):
        next(t for t in raw["tables"] if t["name"] == "t_C4")["dtype"] = dtype  # t_C4 (dim 20) as int2; then as int8 while its file holds int4 rows
        (out / MANIFEST).write_text(json.dumps(raw))
        if msg:
            with pytest.raises(ValueError) as e:
                load_export(out)
            assert str(e.value) == f"{out / MANIFEST}: table t_C4: {msg}"
            assert main(["serve-check", str(config), "--export", str(out)]) == 2
            err = capsys.readouterr().err.strip()
            assert f"{out / MANIFEST}: table t_C4: {msg}" in err and "\n" not in err
        else:
            with pytest.raises(ValueError, match=r"tables/t_C4\.arrow: rows are fixed_size_binary\[14\] but the manifest "
                                                 r"says 20 columns of int8"):
                load_export(out, verify=False)


# --------------------------------------------------------------------------- two ranks: a row-wise sharded model

SPEC = [("C1", 60, 16), ("C2", 40, 12), ("C3", 50, 8), ("C4", 30, 20)]
FEATURES = [f for f, _, _ in SPEC]
N_DENSE, B, STEPS = 4, 16, 3
KEPT = {"t_C1": [0, 2, 3, 5, 8, 9, 12, 15], "t_C2": list(range(12)), "t_C3": list(range(8)),
        "t_C4": [1, 2, 3, 4, 6, 7, 10, 11, 13, 16, 17, 19]}
MODEL_CFG = ModelConfig(head="dlrm", dense_arch=[8, 8], over_arch=[16, 1])


def _train_row_wise(rank: int, world: int, root: str) -> None:
    tcfg = TrainConfig(embedding_optimizer="rowwise_adagrad", embedding_lr=0.1, dense_optimizer="adam", dense_lr=0.01)
    torch.manual_seed(0)
    model = build_model(MODEL_CFG, table_configs(SPEC), FEATURES, N_DENSE, device=torch.device("meta"))
    plan = manual_plan(table_configs(SPEC), "row_wise", world, module_fqn=ebc_path(model), device_type="cpu")
    dmp = wrap_model(model, plan, tcfg, CPU)
    opt = make_optimizer(dmp, tcfg)
    for step in range(STEPS):
        train_step(dmp, opt, random_batch(SPEC, B, N_DENSE, 100 * step + rank, max_bag=3))
    save_checkpoint(Path(root) / "sharded" / "checkpoints", STEPS, {MODEL: dmp.state_dict()}, {})


def test_row_wise_sharded_mixed_export_is_the_single_process_export(tmp_path: Path) -> None:
    run_ranks(_train_row_wise, str(tmp_path))
    sharded = tmp_path / "sharded" / "checkpoints"
    reader = CheckpointReader(sharded)
    for key in reader.tables().keys():  # really row-wise on two ranks: two row ranges of full width
        offsets = sorted(o for o, _ in reader.pieces(key))
        assert len(offsets) == 2 and offsets[0] == [0, 0] and offsets[1][0] > 0 and offsets[1][1] == 0, key
    state = reader.tensors(reader.keys)
    single = build_model(MODEL_CFG, table_configs(SPEC), FEATURES, N_DENSE, device=CPU)
    single.load_state_dict(state)
    save_checkpoint(tmp_path / "single" / "checkpoints", STEPS, {MODEL: single.state_dict()}, {})

    dims = _dims(table_configs(SPEC), DTYPES, KEPT)
    manifests = {}
    for name in ("sharded", "single"):
        manifests[name] = export_compact(tmp_path / name / "checkpoints", tmp_path / f"export_{name}", MODEL_CFG,
                                         FEATURES, N_DENSE, table_configs(SPEC), dims=dims, progress=False)
    assert manifests["sharded"].files == manifests["single"].files  # the same bytes in every file (sha256)
    assert {t.name: (t.dtype, t.dim) for t in manifests["sharded"].tables} == \
        {n: (DTYPES[n], len(KEPT[n])) for n in DTYPES}

    b = random_batch(SPEC, 64, N_DENSE, 999, max_bag=3)
    with torch.no_grad():
        served = {name: load_export(tmp_path / f"export_{name}")(b.dense_features, b.sparse_features)
                  for name in ("sharded", "single")}
    assert torch.equal(served["sharded"], served["single"])
    m = {name: classification_metrics(v, b.labels) for name, v in served.items()}
    assert m["sharded"]["auc"] == m["single"]["auc"]
    ref = _fake_quantised(single, DTYPES, KEPT)  # the supernet with what the export serves in its tables
    with torch.no_grad():
        want = ref.model(b.dense_features, b.sparse_features).squeeze(-1)
    torch.testing.assert_close(served["sharded"], want, rtol=0, atol=1e-5)
