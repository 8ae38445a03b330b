"""Warm start: right after it, the compact model equals the hard-masked supernet (2 ranks, different plans)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torchrec.datasets.utils import Batch

from dist_utils import random_batch, run_ranks, table_configs, train_step
from sharded_mde.config import ModelConfig, RunConfig, SearchConfig, TrainConfig
from sharded_mde.modules.masked_ebc import MaskedEmbeddingBagCollection, find_gate
from sharded_mde.modules.model import build_model
from sharded_mde.plan.sharding import manual_plan
from sharded_mde.search.budget import make_dims_file
from sharded_mde.search.retrain import compact_ham, read_supernet
from sharded_mde.train.checkpoint import MODEL, save_checkpoint
from sharded_mde.train.sharding import ebc_path, make_optimizer, wrap_model

FEATURES = ["C1", "C2", "C3", "C4", "C5"]
TABLES = [("C1", 60, 16), ("C2", 40, 8), ("C3", 50, 24), ("C4", 30, 8), ("C5", 45, 16)]
KEPT = {"t_C1": [0, 3, 5, 6, 9, 10, 11, 15], "t_C2": [], "t_C3": [1, 2, 4, 7, 8, 12, 20, 23], "t_C4": [4, 5, 6, 7],
        "t_C5": list(range(16))}
N_DENSE, B = 4, 12


def _batch(rank: int, step: int) -> Batch:
    return random_batch(TABLES, B, N_DENSE, seed=1000 * step + rank)


def _body(rank: int, world: int, head: str, super_kind: str, compact_kind: str, ckpt: str) -> None:
    torch.manual_seed(0)
    mcfg = ModelConfig(head=head, dense_arch=[8, 8], over_arch=[16, 1], dcn_rank=4)
    tcfg = TrainConfig(embedding_optimizer="adagrad", embedding_lr=0.1, dense_optimizer="adam", dense_lr=0.01)
    full = table_configs(TABLES)
    masked = MaskedEmbeddingBagCollection(full, device=torch.device("meta"), ortho_weight=0.01)
    supernet = build_model(mcfg, full, FEATURES, N_DENSE, sparse_arch=masked, device=torch.device("meta"))
    dmp = wrap_model(supernet, manual_plan(full, super_kind, world, module_fqn=ebc_path(supernet)), tcfg,
                     torch.device("cpu"))
    gate = find_gate(dmp)
    with torch.no_grad():  # some kept columns end masked (a <= 0): the warm start must fold them to zero
        gate.mask.copy_(torch.randn(gate.mask.shape, generator=torch.Generator().manual_seed(2)))
    opt = make_optimizer(dmp, tcfg)
    for step in range(3):  # move every weight away from its initial value
        train_step(dmp, opt, _batch(rank, step))
    save_checkpoint(ckpt, 3, {MODEL: dmp.state_dict()}, {})
    a = gate.table_values()
    final = {n: [c for c in cols if a[n][c] > 0] for n, cols in KEPT.items()}
    assert sum(map(len, final.values())) < sum(map(len, KEPT.values()))
    gate.set_kept(final)  # the supernet's mask restricted to the kept columns
    dmp.eval()
    with torch.no_grad():
        want = dmp(_batch(rank, 99))[1][1]

    dims = make_dims_file("ham", full, KEPT, 1.0, optimizer="adagrad", supernet_checkpoints=ckpt)
    cfg = RunConfig(model=mcfg, train=tcfg, search=SearchConfig(retrain_warm_start=True))
    meta = SimpleNamespace(sparse_features=FEATURES, dense_features=[f"I{i}" for i in range(N_DENSE)])
    model, tables, warm = compact_ham(cfg, dims, full, meta)
    assert [(t.name, t.embedding_dim) for t in tables] == [(n, len(c)) for n, c in KEPT.items() if c]
    compact = wrap_model(model, manual_plan(tables, compact_kind, world, module_fqn=ebc_path(model)), tcfg,
                         torch.device("cpu"))
    warm(compact)
    compact.eval()
    with torch.no_grad():
        got = compact(_batch(rank, 99))[1][1]
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("head,super_kind,compact_kind", [("dlrm", "column_wise", "table_wise"),
                                                          ("dcn", "row_wise", "column_wise")])
def test_warm_started_compact_model_equals_hard_masked_supernet(tmp_path, head, super_kind, compact_kind) -> None:
    run_ranks(_body, head, super_kind, compact_kind, str(tmp_path / "checkpoints"))


def test_read_supernet_names_a_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no finished supernet checkpoint"):
        read_supernet(tmp_path, {"t_C1": [0]})
