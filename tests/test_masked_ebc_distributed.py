"""2-rank gloo: the masked supernet under DMP (table-, row-, column-wise) matches an unsharded reference.

Mask gradients (averaged over ranks) and mask values after each of 3 HAM steps must agree with a
single-process model trained on the mean of the ranks' losses to a relative error below 1e-5.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.optim import RowWiseAdagrad

from dist_utils import run_ranks
from sharded_mde.config import ModelConfig, TrainConfig
from sharded_mde.modules.masked_ebc import MaskedEmbeddingBagCollection, find_gate
from sharded_mde.modules.model import build_model
from sharded_mde.plan.sharding import manual_plan
from sharded_mde.train.checkpoint import copy_full_into
from sharded_mde.train.sharding import ebc_path, make_optimizer, wrap_model

FEATURES = ["C1", "C2", "C3", "C4", "C5"]
TABLES = [("C1", 60, 16), ("C2", 40, 8), ("C3", 50, 24), ("C4", 30, 8), ("C5", 45, 16)]
N_DENSE, B, STEPS = 4, 16, 3


def _tables():
    return [EmbeddingBagConfig(name=f"t_{f}", num_embeddings=r, embedding_dim=d, feature_names=[f]) for f, r, d in TABLES]


def _batch(rank: int, step: int) -> Batch:
    g = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(0, 3, (len(TABLES) * B,), generator=g, dtype=torch.int32)
    values = torch.cat([torch.randint(0, r, (int(lengths[i * B:(i + 1) * B].sum()),), generator=g)
                        for i, (_, r, _) in enumerate(TABLES)])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths)
    return Batch(dense_features=torch.randn(B, N_DENSE, generator=g), sparse_features=kjt,
                 labels=torch.randint(0, 2, (B,), generator=g).float())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _one_plan(rank: int, world: int, kind: str, surrogate: str) -> None:
    torch.manual_seed(0)
    # Row-wise Adagrad keeps one accumulator per row of each column shard, so under column-wise
    # sharding it is not the unsharded optimizer; element-wise Adagrad is.
    optimizer = "adagrad" if kind == "column_wise" else "rowwise_adagrad"
    tcfg = TrainConfig(embedding_optimizer=optimizer, embedding_lr=0.1, dense_optimizer="adam", dense_lr=0.01)
    masked = MaskedEmbeddingBagCollection(_tables(), device=torch.device("cpu"), surrogate=surrogate, mask_init=0.05,
                                          ortho_weight=0.05)
    model = build_model(ModelConfig(head="dlrm", dense_arch=[8, 8], over_arch=[16, 1]), _tables(), FEATURES, N_DENSE,
                        sparse_arch=masked, device=torch.device("cpu"))
    # a mixed start: some columns already pruned, values inside and outside the clipped range |a| <= 0.05
    a = torch.randn(masked.gate.weight.shape, generator=torch.Generator().manual_seed(1)) * 0.1
    a[::3] *= 0.01  # near zero: the first mask steps flip some of these
    masked.gate.weight.copy_(a)
    ref = copy.deepcopy(model)
    plan = manual_plan(_tables(), kind, world, module_fqn=ebc_path(model), device_type="cpu")
    dmp = wrap_model(model, plan, tcfg, torch.device("cpu"))
    copy_full_into(dmp.state_dict(), ref.state_dict())
    opt = make_optimizer(dmp, tcfg)
    emb = [p for n, p in ref.named_parameters() if "embedding_bags" in n]
    dense = [p for n, p in ref.named_parameters() if "embedding_bags" not in n]
    table_opt = RowWiseAdagrad(emb, lr=0.1, eps=1e-8) if optimizer == "rowwise_adagrad" else torch.optim.Adagrad(emb, lr=0.1, eps=1e-8)
    ref_opts = [table_opt, torch.optim.Adam(dense, lr=0.01)]
    gate, ref_gate = find_gate(dmp), find_gate(ref)
    kept_before, changed = gate.kept_counts(), False
    for step in range(STEPS):
        loss, _ = dmp(_batch(rank, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        grad = gate.reduce_grad()  # all-reduced over the ranks
        gate.update(grad, lam=2.0, lr=0.01, batch_size=B * world)
        ref_loss = sum(ref(_batch(r, step))[0] for r in range(world)) / world
        for o in ref_opts:
            o.zero_grad()
        ref_loss.backward()
        for o in ref_opts:
            o.step()
        ref_grad = ref_gate.reduce_grad()  # the mean loss's gradient (the same on every rank)
        ref_gate.update(ref_grad, lam=2.0, lr=0.01, batch_size=B * world)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        assert torch.allclose(mean_loss / world, ref_loss.detach(), rtol=1e-5, atol=1e-6), (kind, step)
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
