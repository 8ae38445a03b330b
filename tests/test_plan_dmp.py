"""Acceptance: a saved compact plan trains under 2-rank gloo DMP, and each rank holds exactly the report's raw bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder

from dist_utils import run_ranks
from sharded_mde.config import PlanConfig
from sharded_mde.dims import load_dims
from sharded_mde.plan.report import memory_report
from sharded_mde.plan.sharding import load_plan, plan_sharding, save_plan
from sharded_mde.plan.tables import plan_tables
from test_plan_dims import tables, write_dims

WS = 2


class SparseArch(nn.Module):
    def __init__(self, tables):
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))


class Model(nn.Module):
    """Plain EBC at `sparse_arch.ebc` (where the trainer puts it) and a linear head over the pooled outputs."""

    def __init__(self, tables):
        super().__init__()
        self.sparse_arch = SparseArch(tables)
        self.features = [f for t in tables for f in t.feature_names]
        self.head = nn.Linear(sum(t.embedding_dim for t in tables), 1)

    def forward(self, kjt):
        d = self.sparse_arch.ebc(kjt).to_dict()
        return self.head(torch.cat([d[f] for f in self.features], 1)).squeeze(-1)


def local_bytes(obj) -> int:
    """Bytes of the tensors (or local shards of ShardedTensors) in a nested state."""
    if isinstance(obj, dict):
        return sum(local_bytes(v) for v in obj.values())
    if hasattr(obj, "local_shards"):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in obj.local_shards())
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    return 0


def body(rank: int, world: int, plan_path: str, tables, out_dir: str) -> None:
    """On each rank: load the saved plan, train 3 steps with fused row-wise Adagrad, record the bytes held."""
    torch.manual_seed(0)
    plan = load_plan(plan_path, tables, world_size=world)
    sharder = EmbeddingBagCollectionSharder(fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.1})
    dmp = DistributedModelParallel(Model(tables), device=torch.device("cpu"), plan=plan, sharders=[sharder])
    before = {k: [s.tensor.clone() for s in v.local_shards()] for k, v in dmp.state_dict().items() if hasattr(v, "local_shards")}
    dense = torch.optim.SGD([p for p in dmp.parameters() if not hasattr(p, "_in_backward_optimizers")], lr=0.1)
    g = torch.Generator().manual_seed(rank)
    losses = []
    for _ in range(3):
        lengths = torch.randint(1, 3, (len(tables) * 16,), generator=g)
        values = torch.cat([torch.randint(0, t.num_embeddings, (int(n),), generator=g)
                            for t in tables for n in lengths[tables.index(t) * 16:(tables.index(t) + 1) * 16]])
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f for t in tables for f in t.feature_names], values=values, lengths=lengths)
        loss = nn.functional.binary_cross_entropy_with_logits(dmp(kjt), torch.randint(0, 2, (16,), generator=g).float())
        dense.zero_grad()
        loss.backward()
        dense.step()
        losses.append(loss.item())
    sd = dmp.state_dict()
    moved = any(not torch.equal(a, s.tensor) for k, shards in before.items() for a, s in zip(shards, sd[k].local_shards()))
    weights = sum(local_bytes(v) for k, v in sd.items() if "embedding_bags" in k)
    optimizer = local_bytes(dmp.fused_optimizer.state_dict()["state"])
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"weight": weights, "optimizer": optimizer, "moved": moved, "losses": losses}))


@pytest.mark.slow
def test_saved_compact_plan_trains_and_rank_bytes_match_report(tmp_path):
    full = tables({"a": 3000, "b": 2500, "c": 400, "d": 300, "e": 200, "f": 150})
    dims_path = write_dims(tmp_path / "dims.json", full, {"t_a": 12, "t_b": 16, "t_c": 8, "t_d": 4, "t_e": 0, "t_f": 20})
    compact = plan_tables(load_dims(dims_path, full), full)
    # t_b column-wise in 4-column shards: each shard keeps its own row-wise optimizer state
    cfg = PlanConfig(world_size=WS, compute_device="cpu", ddr_cap_gb=1.0,
                     constraints={"t_b": {"sharding_types": ["column_wise"], "min_partition": 4}})
    planned = plan_sharding(compact, cfg)
    report = memory_report(full, compact, cfg, compact_plan=planned)
    save_plan(tmp_path / "plan.json", planned[0])
    kinds = {so.name: so.sharding_type for so in planned[1]}
    assert kinds["t_b"] == "column_wise" and len(next(so for so in planned[1] if so.name == "t_b").shards) > 1

    run_ranks(body, str(tmp_path / "plan.json"), compact, str(tmp_path), world_size=WS)
    for r in range(WS):
        held = json.loads((tmp_path / f"rank{r}.json").read_text())
        want = report["ranks"][r]["compact"]
        assert held["moved"] and all(l == l for l in held["losses"]), held
        assert (held["weight"], held["optimizer"]) == (want["weight"], want["optimizer"]), (r, held, want)
    assert sum(report["ranks"][r]["compact"]["weight"] for r in range(WS)) == sum(t.num_embeddings * t.embedding_dim * 4 for t in compact)
