"""Export and serving of multi-hot fields: the manifest records each table's pooling and the served model
(float and quantised EBC, PME token groups, TorchScript) pools bags as the trained model did."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torchrec import EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType

from sharded_mde.config import ModelConfig
from sharded_mde.export import export_compact, load_export
from sharded_mde.export.manifest import read_manifest
from sharded_mde.export.serve import script
from sharded_mde.modules.masked_ebc import MaskedEmbeddingBagCollection
from sharded_mde.modules.model import build_model
from sharded_mde.modules.token_groups import build_token_group_ebc
from sharded_mde.dims import DimsFile, PmeRecord, TableDims, TokenGroup, table_bytes
from sharded_mde.train.checkpoint import MODEL as SAVED_MODEL, save_checkpoint
from test_multihot import multi_hot_kjt

N_DENSE, B = 3, 64
MODEL = ModelConfig(head="dlrm", dense_arch=[8, 8], over_arch=[8, 1])
FULL = [EmbeddingBagConfig(name="t_A", num_embeddings=30, embedding_dim=16, feature_names=["A"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t_B", num_embeddings=25, embedding_dim=8, feature_names=["B"], pooling=PoolingType.SUM)]
FEATURES = ["A", "B"]
VOCAB = {"A": 30, "B": 25}


def _save(model: torch.nn.Module, root: Path) -> Path:
    save_checkpoint(root / "checkpoints", 1, {SAVED_MODEL: model.state_dict()}, {})
    return root / "checkpoints"


def _inputs(seed: int):
    return torch.randn(B, N_DENSE, generator=torch.Generator().manual_seed(seed)), multi_hot_kjt(VOCAB, B, seed)


def _dims(method: str, tables, pme=None) -> DimsFile:
    full = sum(table_bytes(t.num_embeddings, t.embedding_dim).total for t in FULL)
    kept = sum(t.bytes for t in tables)
    return DimsFile(method, 0.5, kept, full, kept, tables, pme=pme)


def test_ham_supernet_with_mean_bags_exports_and_serves_like_the_masked_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    kept = {"t_A": [0, 2, 3, 5, 8, 9, 12, 15], "t_B": [1, 2, 4, 7]}
    sparse = MaskedEmbeddingBagCollection(FULL, device=torch.device("cpu"), mask_init=-1.0)
    sparse.gate.set_kept(kept)
    model = build_model(MODEL, FULL, FEATURES, N_DENSE, sparse_arch=sparse, device=torch.device("cpu")).eval()
    dims = _dims("ham", [TableDims(t.name, t.feature_names, t.num_embeddings, t.embedding_dim, len(kept[t.name]),
                                   kept[t.name], table_bytes(t.num_embeddings, len(kept[t.name])).total) for t in FULL])
    export_compact(_save(model, tmp_path), tmp_path / "out", MODEL, FEATURES, N_DENSE, FULL, dims=dims, progress=False)
    assert {t.name: t.pooling for t in read_manifest(tmp_path / "out").tables} == {"t_A": "MEAN", "t_B": "SUM"}
    served = load_export(tmp_path / "out")
    scripted = script(served)
    int8 = load_export(tmp_path / "out", dtype="int8")
    for seed in range(3):
        dense, kjt = _inputs(seed)
        with torch.no_grad():
            want = model.model(dense, kjt).squeeze(-1)
            got = served(dense, kjt)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
            assert torch.equal(scripted(dense, kjt), got)
            # the quantised EBC pools mean bags too: int8 rounding only (a sum would be off by the bag length)
            pooled, pooled_int8 = served.head.sparse_arch(kjt).to_dict(), int8.head.sparse_arch(kjt).to_dict()
            for f in FEATURES:
                torch.testing.assert_close(pooled_int8[f], pooled[f], rtol=0, atol=5e-3)


def test_pme_mean_field_exports_and_serves_exactly_like_the_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    groups_a = [TokenGroup(16, 8, table_bytes(8, 16).total), TokenGroup(8, 10, table_bytes(10, 8).total),
                TokenGroup(0, 12, 0)]
    groups_b = [TokenGroup(8, 25, table_bytes(25, 8).total)]
    dims = _dims("pme", [TableDims("t_A", ["A"], 30, 16, 16, [], sum(g.bytes for g in groups_a), groups_a),
                         TableDims("t_B", ["B"], 25, 8, 8, [], groups_b[0].bytes, groups_b)],
                 pme=PmeRecord(reserved_sizes={"t_A": [0, 8], "t_B": [8, 8]}))
    sparse = build_token_group_ebc(dims, FULL, "project", device=torch.device("cpu"))
    head_tables = [dataclasses.replace(t, embedding_dim=f.out_dim) for t, f in zip(FULL, sparse.fields)]
    model = build_model(MODEL, head_tables, FEATURES, N_DENSE, sparse_arch=sparse, device=torch.device("cpu")).eval()
    assert [f.pooling for f in sparse.fields] == ["mean", "sum"]
    export_compact(_save(model, tmp_path), tmp_path / "out", MODEL, FEATURES, N_DENSE, FULL, dims=dims, progress=False)
    manifest = read_manifest(tmp_path / "out")
    assert [f["pooling"] for f in manifest.token_groups.fields] == ["mean", "sum"]
    assert all(t.pooling == "SUM" for t in manifest.tables)  # group tables sum; the field's mean is the combiner's
    served = load_export(tmp_path / "out")
    scripted = script(served)
    for seed in range(3):
        dense, kjt = _inputs(seed)
        with torch.no_grad():
            want = model.model(dense, kjt).squeeze(-1)
            assert torch.equal(served(dense, kjt), want)
            assert torch.equal(scripted(dense, kjt), want)
