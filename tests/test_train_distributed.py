"""2-rank gloo: MixedDimDLRM/DCN with mixed dims under DMP match an unsharded reference step by step."""

from __future__ import annotations

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.datasets.utils import Batch

from dist_utils import random_batch, run_ranks, shard_with_reference, table_configs, train_in_lockstep
from sharded_mde.config import ModelConfig, TrainConfig
from sharded_mde.modules.model import build_model

FEATURES = ["C1", "C2", "C3", "C4", "C5"]
TABLES = [("C1", 60, 16), ("C2", 40, 8), ("C3", 50, 24), ("C4", 30, 8), ("C5", 45, 16)]
N_DENSE, B, STEPS = 4, 8, 3


def _batch(rank: int, step: int) -> Batch:
    return random_batch(TABLES, B, N_DENSE, seed=1000 * step + rank)


def _body(rank: int, world: int, head: str, kind: str, optimizer: str) -> None:
    torch.manual_seed(0)
    tcfg = TrainConfig(embedding_optimizer=optimizer, embedding_lr=0.1, dense_optimizer="adam", dense_lr=0.01)
    tables = table_configs(TABLES)
    model = build_model(ModelConfig(head=head, dense_arch=[8, 8], over_arch=[16, 1], dcn_rank=4), tables, FEATURES,
                        N_DENSE, device=torch.device("cpu"))
    dmp, ref = shard_with_reference(model, tables, kind, world, tcfg)
    assert isinstance(dmp._dmp_wrapped_module, DistributedDataParallel) == (world > 1)  # DDP only where it reduces
    for _ in train_in_lockstep(dmp, ref, tcfg, _batch, rank, world, STEPS):
        pass
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


def test_one_cpu_rank_without_ddp_matches_unsharded_reference() -> None:
    """On one CPU rank `wrap_model` leaves the dense part out of DDP (its all-reduce would be the identity)."""
    run_ranks(_body, "dlrm", "table_wise", "rowwise_adagrad", world_size=1)
