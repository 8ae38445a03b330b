"""2-rank gloo: MixedDimDLRM/DCN with mixed dims under DMP match an unsharded reference step by step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch
from torchrec.optim import RowWiseAdagrad

from dist_utils import run_ranks
from sharded_mde.config import ModelConfig, TrainConfig
from sharded_mde.modules.model import build_model
from sharded_mde.plan.sharding import manual_plan
from sharded_mde.train.checkpoint import copy_full_into
from sharded_mde.train.sharding import ebc_path, make_optimizer, wrap_model

FEATURES = ["C1", "C2", "C3", "C4", "C5"]
TABLES = [("C1", 60, 16), ("C2", 40, 8), ("C3", 50, 24), ("C4", 30, 8), ("C5", 45, 16)]
N_DENSE, B, STEPS = 4, 8, 3


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


def _body(rank: int, world: int, head: str, kind: str, optimizer: str) -> None:
    torch.manual_seed(0)
    tcfg = TrainConfig(embedding_optimizer=optimizer, embedding_lr=0.1, dense_optimizer="adam", dense_lr=0.01)
    model = build_model(ModelConfig(head=head, dense_arch=[8, 8], over_arch=[16, 1], dcn_rank=4), _tables(), FEATURES,
                        N_DENSE, device=torch.device("cpu"))
    ref = copy.deepcopy(model)
    plan = manual_plan(_tables(), kind, world, module_fqn=ebc_path(model), device_type="cpu")
    dmp = wrap_model(model, plan, tcfg, torch.device("cpu"))
    copy_full_into(dmp.state_dict(), ref.state_dict())
    opt = make_optimizer(dmp, tcfg)
    emb = [p for n, p in ref.named_parameters() if "embedding_bags" in n]
    dense = [p for n, p in ref.named_parameters() if "embedding_bags" not in n]
    table_opt = RowWiseAdagrad(emb, lr=0.1, eps=1e-8) if optimizer == "rowwise_adagrad" else torch.optim.Adagrad(emb, lr=0.1, eps=1e-8)
    ref_opts = [table_opt, torch.optim.Adam(dense, lr=0.01)]
    for step in range(STEPS):
        loss, _ = dmp(_batch(rank, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss /= world
        ref_loss = sum(ref(_batch(r, step))[0] for r in range(world)) / world
        for o in ref_opts:
            o.zero_grad()
        ref_loss.backward()
        for o in ref_opts:
            o.step()
        assert torch.allclose(mean_loss, ref_loss.detach(), rtol=1e-5, atol=1e-6), (step, mean_loss, ref_loss)
    full = ref.state_dict()
    checked = 0
    for k, t in dmp.state_dict().items():
        if isinstance(t, ShardedTensor):
            for s in t.local_shards():
                o, z = s.metadata.shard_offsets, s.tensor.shape
                torch.testing.assert_close(s.tensor, full[k][o[0]:o[0] + z[0], o[1]:o[1] + z[1]], rtol=1e-4, atol=1e-5)
                checked += 1
        else:
            torch.testing.assert_close(t, full[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
    assert checked > 0


# Row-wise Adagrad keeps one accumulator per row *of each column shard* (FBGEMM runs per shard),
# so under column-wise sharding it is not the unsharded optimizer; element-wise Adagrad is.
@pytest.mark.parametrize("kind,optimizer", [("table_wise", "rowwise_adagrad"), ("row_wise", "rowwise_adagrad"),
                                            ("column_wise", "adagrad")])
def test_mixed_dim_dlrm_matches_unsharded_reference(kind: str, optimizer: str) -> None:
    run_ranks(_body, "dlrm", kind, optimizer)


def test_mixed_dim_dcn_matches_unsharded_reference() -> None:
    run_ranks(_body, "dcn", "row_wise", "rowwise_adagrad")
