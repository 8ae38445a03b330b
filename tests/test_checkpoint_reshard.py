"""DCP checkpoints reshard: saved on one world size and plan, resumed on another, weights and optimizer state equal.

A masked DLRM trains a few steps under DMP (fused row-wise Adagrad tables, Adam dense part) on
real gloo ranks and is checkpointed; rank 0 also gathers every full tensor of the saved model and
optimizer (ShardedTensor.gather, independent of DCP). A fresh model on another world size and
plan, initialised with other weights, loads the checkpoint the way the trainer resumes; its
gathered tensors must equal the saved ones exactly: tables, row-wise Adagrad momentum, dense
weights, the HAM mask and Adam's state, and the trainer state of the saving rank 0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor

from dist_utils import random_batch, run_ranks, table_configs, train_step
from sharded_mde.config import ModelConfig, TrainConfig
from sharded_mde.modules.masked_ebc import MaskedEmbeddingBagCollection, find_gate
from sharded_mde.modules.model import build_model
from sharded_mde.plan.sharding import manual_plan
from sharded_mde.train.checkpoint import MODEL, OPTIMIZER, latest_checkpoint, load_checkpoint, save_checkpoint
from sharded_mde.train.sharding import ebc_path, make_optimizer, wrap_model

FEATURES = ["C1", "C2", "C3"]
TABLES = [("C1", 61, 16), ("C2", 40, 8), ("C3", 33, 12)]
N_DENSE = 4
MCFG = ModelConfig(head="dlrm", dense_arch=[8, 8], over_arch=[8, 1])
TCFG = TrainConfig(embedding_optimizer="rowwise_adagrad", embedding_lr=0.1, dense_optimizer="adam", dense_lr=0.01)


def _gathered(dmp: Any, opt: Any) -> Dict[str, torch.Tensor]:
    """Every full tensor of the model and optimizer state, assembled from all ranks' local shards.

    Gathered as objects, not with ShardedTensor.gather: under a table-wise plan the fused
    optimizer holds a table's state on its owner rank only, so the ranks' key sets differ.
    """
    entries = {f"model/{k}": v for k, v in dmp.state_dict().items()}
    for p, state in opt.state_dict()["state"].items():
        entries.update({f"optimizer/{p}/{n}": v for n, v in state.items()})
    local = []  # (name, global size, offsets, tensor)
    for name, v in entries.items():
        if isinstance(v, ShardedTensor):
            local += [(name, tuple(v.size()), list(s.metadata.shard_offsets), s.tensor.detach().clone())
                      for s in v.local_shards()]
        elif dist.get_rank() == 0:  # replicated: rank 0's copy
            local.append((name, tuple(v.shape), [0] * v.dim(), v.detach().clone()))
    parts: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    full: Dict[str, torch.Tensor] = {}
    filled: Dict[str, int] = {}
    for name, size, offsets, t in (x for part in parts for x in part):
        out = full.setdefault(name, torch.zeros(size, dtype=t.dtype))
        out[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))] = t
        filled[name] = filled.get(name, 0) + t.numel()
    assert all(filled[n] == full[n].numel() for n in full), "a tensor is not covered by its shards"
    return full


def _model(rank: int, world: int, kind: str, seed: int) -> tuple:
    torch.manual_seed(seed)
    full = table_configs(TABLES)
    masked = MaskedEmbeddingBagCollection(full, device=torch.device("meta"))
    model = build_model(MCFG, full, FEATURES, N_DENSE, sparse_arch=masked, device=torch.device("meta"))
    dmp = wrap_model(model, manual_plan(full, kind, world, module_fqn=ebc_path(model)), TCFG, torch.device("cpu"))
    return dmp, make_optimizer(dmp, TCFG)


def _save(rank: int, world: int, kind: str, root: str) -> None:
    dmp, opt = _model(rank, world, kind, seed=0)
    with torch.no_grad():
        find_gate(dmp).mask.copy_(torch.randn(36, generator=torch.Generator().manual_seed(5)))
    for step in range(3):
        train_step(dmp, opt, random_batch(TABLES, 8, N_DENSE, seed=100 * step + rank))
    save_checkpoint(root, 3, {MODEL: dmp.state_dict(), OPTIMIZER: opt.state_dict()}, {},
                    local={"step": 3, "rank": rank, "rng": torch.get_rng_state()})
    want = _gathered(dmp, opt)
    if rank == 0:
        torch.save(want, Path(root) / "want.pt")


def _resume(rank: int, world: int, kind: str, root: str) -> None:
    dmp, opt = _model(rank, world, kind, seed=1)  # other initial weights than the saved model's
    opt.init_state()
    model, optimizer = dmp.state_dict(), opt.state_dict()
    d = latest_checkpoint(root)
    local = load_checkpoint(d, model, optimizer)
    dmp.load_state_dict(model)
    opt.load_state_dict(optimizer)
    got = _gathered(dmp, opt)
    if rank != 0:
        return
    assert local["step"] == 3 and local["rank"] == 0
    want = torch.load(Path(root) / "want.pt")
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    momentum = [k for k in want if k.endswith("momentum1")]
    assert len(momentum) == len(TABLES) and all(want[k].abs().max() > 0 for k in momentum)
    assert any(k.endswith("gate.mask") for k in want) and any(k.endswith("exp_avg_sq") for k in want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("save_world,save_kind,load_world,load_kind", [
    (2, "row_wise", 1, "table_wise"),
    (1, "table_wise", 2, "row_wise"),
    (2, "table_wise", 2, "row_wise"),
    (2, "row_wise", 2, "table_wise"),
])
def test_resume_on_another_world_size_and_plan_restores_weights_and_optimizer_state(
        tmp_path: Path, save_world: int, save_kind: str, load_world: int, load_kind: str) -> None:
    root = str(tmp_path / "checkpoints")
    run_ranks(_save, save_kind, root, world_size=save_world)
    run_ranks(_resume, load_kind, root, world_size=load_world)
