"""2-rank gloo: multi-hot fields (bags of 0..6 ids, sum and mean pooling) sharded table-wise and row-wise.

The HAM supernet (masked EBC under the DLRM head) and the PME token-group model (a mean field
split into size groups) are trained for a few steps under DMP beside an unsharded reference trained
on the mean of the ranks' losses: every step's loss, the HAM mask gradient, and afterwards the
pooled outputs of multi-hot bags and of every row alone (the updated weights) must agree.
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import torch
from torch import nn
from torchrec import KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import PoolingType

from dist_utils import run_ranks, shard_with_reference, table_configs, train_in_lockstep
from sharded_mde.config import ModelConfig, TrainConfig
from sharded_mde.modules.masked_ebc import MaskedEmbeddingBagCollection, find_gate
from sharded_mde.modules.model import build_model
from sharded_mde.modules.token_groups import TokenGroupEBC
from sharded_mde.train.sharding import unwrap
from test_multihot import FIELDS, _group_tables, multi_hot_kjt

SPEC = [("A", 40, 8), ("B", 30, 12), ("C", 50, 16)]
POOLING = {"A": PoolingType.SUM, "B": PoolingType.MEAN, "C": PoolingType.MEAN}
N_DENSE, B, STEPS = 3, 12, 3
TCFG = TrainConfig(embedding_optimizer="rowwise_adagrad", embedding_lr=0.1, dense_optimizer="adam", dense_lr=0.01)
HEAD = ModelConfig(head="dlrm", dense_arch=[8, 8], over_arch=[16, 1])


def _batcher(vocab: Dict[str, int]):
    def batch(rank: int, step: int) -> Batch:
        g = torch.Generator().manual_seed(7000 + 100 * step + rank)
        return Batch(dense_features=torch.randn(B, N_DENSE, generator=g),
                     sparse_features=multi_hot_kjt(vocab, B, seed=100 * step + rank),
                     labels=torch.randint(0, 2, (B,), generator=g).float())
    return batch


def every_row(vocab: Dict[str, int]) -> KeyedJaggedTensor:
    """Each id of each feature in a bag of its own (so every updated row is read alone)."""
    n = max(vocab.values())
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(vocab), values=torch.cat([torch.arange(r) for r in vocab.values()]),
        lengths=torch.cat([(torch.arange(n) < r).long() for r in vocab.values()]))


def _same_pooled(sharded: nn.Module, ref: nn.Module, kjts, what: str) -> None:
    for i, kjt in enumerate(kjts):
        got, want = sharded(kjt).to_dict(), ref(kjt).to_dict()
        assert sorted(got) == sorted(want)
        for f in want:
            torch.testing.assert_close(got[f].detach(), want[f].detach(), rtol=1e-4, atol=1e-5,
                                       msg=lambda m: f"{what}, input {i}, feature {f}: {m}")


def _ham(rank: int, world: int, kind: str) -> None:
    torch.manual_seed(0)
    tables = [dataclasses.replace(t, pooling=POOLING[t.feature_names[0]]) for t in table_configs(SPEC)]
    masked = MaskedEmbeddingBagCollection(tables, device=torch.device("cpu"), mask_init=0.05)
    masked.gate.mask.copy_(torch.randn(masked.gate.mask.shape, generator=torch.Generator().manual_seed(1)))
    model = build_model(HEAD, tables, list(POOLING), N_DENSE, sparse_arch=masked, device=torch.device("cpu"))
    dmp, ref = shard_with_reference(model, tables, kind, world, TCFG)
    gate, ref_gate = find_gate(dmp), find_gate(ref)
    vocab = {f: r for f, r, _ in SPEC}
    for step in train_in_lockstep(dmp, ref, TCFG, _batcher(vocab), rank, world, STEPS):  # asserts equal losses
        grad, ref_grad = gate.reduce_grad(), ref_gate.reduce_grad()
        assert ref_grad.abs().max() > 0
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{kind} step {step}: {m}")
    kjts = [multi_hot_kjt(vocab, B, seed=500 + rank), every_row(vocab)]
    _same_pooled(unwrap(dmp).model.sparse_arch, ref.model.sparse_arch, kjts, f"HAM {kind}")
    if rank == 0:
        print(f"HAM {kind}: {STEPS} steps, losses, mask gradients and pooled bags match the reference")


def _pme(rank: int, world: int, kind: str) -> None:
    torch.manual_seed(0)
    tables = _group_tables(FIELDS)
    sparse = TokenGroupEBC(FIELDS, tables, "project", device=torch.device("cpu"))
    head_tables = [dataclasses.replace(tables[0], name=f"t_{f.feature}", embedding_dim=f.out_dim,
                                       feature_names=[f.feature]) for f in FIELDS]
    model = build_model(HEAD, head_tables, [f.feature for f in FIELDS], N_DENSE, sparse_arch=sparse,
                        device=torch.device("cpu"))
    dmp, ref = shard_with_reference(model, tables, kind, world, TCFG)
    vocab = {f.feature: f.num_embeddings for f in FIELDS}
    for _ in train_in_lockstep(dmp, ref, TCFG, _batcher(vocab), rank, world, STEPS):  # asserts equal losses
        pass
    kjts = [multi_hot_kjt(vocab, B, seed=600 + rank), every_row(vocab)]
    _same_pooled(unwrap(dmp).model.sparse_arch, ref.model.sparse_arch, kjts, f"PME {kind}")
    if rank == 0:
        print(f"PME {kind}: {STEPS} steps, losses and pooled bags match the reference")


def _body(rank: int, world: int) -> None:
    for kind in ("table_wise", "row_wise"):
        _ham(rank, world, kind)
        _pme(rank, world, kind)


def test_multi_hot_sum_and_mean_match_unsharded_reference_tw_rw() -> None:
    run_ranks(_body)
