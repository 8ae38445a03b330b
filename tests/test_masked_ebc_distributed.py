"""2-rank gloo: the masked supernet under DMP (table-, row-, column-wise) matches an unsharded reference.

Mask gradients (averaged over ranks) and mask values after each of 3 HAM steps must agree with a
single-process model trained on the mean of the ranks' losses to a relative error below 1e-5.
"""

from __future__ import annotations

import torch
from torchrec.datasets.utils import Batch

from dist_utils import random_batch, run_ranks, shard_with_reference, table_configs, train_in_lockstep
from sharded_mde.config import ModelConfig, TrainConfig
from sharded_mde.modules.masked_ebc import MaskedEmbeddingBagCollection, find_gate
from sharded_mde.modules.model import build_model

FEATURES = ["C1", "C2", "C3", "C4", "C5"]
TABLES = [("C1", 60, 16), ("C2", 40, 8), ("C3", 50, 24), ("C4", 30, 8), ("C5", 45, 16)]
N_DENSE, B, STEPS = 4, 16, 3


def _batch(rank: int, step: int) -> Batch:
    return random_batch(TABLES, B, N_DENSE, seed=1000 * step + rank)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _one_plan(rank: int, world: int, kind: str, surrogate: str) -> None:
    torch.manual_seed(0)
    # Row-wise Adagrad keeps one accumulator per row of each column shard, so under column-wise
    # sharding it is not the unsharded optimizer; element-wise Adagrad is.
    optimizer = "adagrad" if kind == "column_wise" else "rowwise_adagrad"
    tcfg = TrainConfig(embedding_optimizer=optimizer, embedding_lr=0.1, dense_optimizer="adam", dense_lr=0.01)
    tables = table_configs(TABLES)
    masked = MaskedEmbeddingBagCollection(tables, device=torch.device("cpu"), surrogate=surrogate, mask_init=0.05,
                                          ortho_weight=0.05)
    model = build_model(ModelConfig(head="dlrm", dense_arch=[8, 8], over_arch=[16, 1]), tables, FEATURES, N_DENSE,
                        sparse_arch=masked, device=torch.device("cpu"))
    # a mixed start: some columns already pruned, values inside and outside the clipped range |a| <= 0.05
    a = torch.randn(masked.gate.mask.shape, generator=torch.Generator().manual_seed(1)) * 0.1
    a[::3] *= 0.01  # near zero: the first mask steps flip some of these
    masked.gate.mask.copy_(a)
    dmp, ref = shard_with_reference(model, tables, kind, world, tcfg)
    gate, ref_gate = find_gate(dmp), find_gate(ref)
    kept_before, changed = gate.kept_counts(), False
    for step in train_in_lockstep(dmp, ref, tcfg, _batch, rank, world, STEPS):  # asserts equal losses
        grad = gate.reduce_grad()  # all-reduced over the ranks
        gate.update(grad, lam=2.0, lr=0.01, batch_size=B * world)
        ref_grad = ref_gate.reduce_grad()  # the mean loss's gradient (the same on every rank)
        ref_gate.update(ref_grad, lam=2.0, lr=0.01, batch_size=B * world)
        assert ref_grad.abs().max() > 0
        g_err, v_err = _rel(grad, ref_grad), _rel(gate.values(), ref_gate.values())
        assert g_err < 1e-5 and v_err < 1e-5, f"{kind}/{surrogate} step {step}: grad rel err {g_err:.1e}, values {v_err:.1e}"
        assert torch.equal(gate.kept_counts(), ref_gate.kept_counts())
        changed = changed or not torch.equal(gate.kept_counts(), kept_before)
        if rank == 0:
            print(f"{kind}/{surrogate} step {step}: mask grad rel err {g_err:.1e}, mask values rel err {v_err:.1e}")
    assert changed, "no column flipped: the test would not see a wrong mask update"


def _body(rank: int, world: int, surrogate: str) -> None:
    for kind in ("table_wise", "row_wise", "column_wise"):
        _one_plan(rank, world, kind, surrogate)


def test_masked_supernet_matches_unsharded_reference_under_tw_rw_cw_plans() -> None:
    run_ranks(_body, "clipped")
