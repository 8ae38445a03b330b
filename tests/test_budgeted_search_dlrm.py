"""BudgetedSearch in the user's own loop with stock TorchRec DLRM / DLRM_DCN over the masked EBC.

2 real gloo ranks: the model under DistributedModelParallel (table-wise and row-wise plans; one run
also under TrainPipelineSparseDist) and an unsharded copy trained on the mean of the ranks'
losses, each with its own `BudgetedSearch`. The masks must agree, the dims files must be equal,
and the dims must be on budget: kept bytes <= budget with less than one 4-column step unspent.
"""

from __future__ import annotations

from typing import List

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

from dist_utils import (random_batch, reference_optimizers, reference_step, run_ranks, shard_with_reference,
                        table_configs, train_in_lockstep)
from sharded_mde import BudgetedSearch, DimsFile, MaskedEmbeddingBagCollection, MixedDimDLRM, plan_tables
from sharded_mde.config import TrainConfig
from sharded_mde.modules.masked_ebc import find_gate
from sharded_mde.dims import DIM_MULTIPLE, dim_cap, table_bytes
from sharded_mde.train.sharding import make_optimizer

SPEC = [("C1", 60, 16), ("C2", 40, 16), ("C3", 50, 16), ("C4", 30, 16)]
N_DENSE, B, STEPS, BUDGET = 4, 16, 24, 0.4
TCFG = TrainConfig(embedding_optimizer="rowwise_adagrad", embedding_lr=0.1, dense_optimizer="adam", dense_lr=0.01)
SETTINGS = dict(budget=BUDGET, total_steps=STEPS, warmup=0.2, prune=0.5, mask_lr=0.05, lambda_init=0.5)


def _batch(rank: int, step: int):
    return random_batch(SPEC, B, N_DENSE, seed=1000 * step + rank)


def _model(tables: List[EmbeddingBagConfig], arch: str) -> DLRMTrain:
    """Stock TorchRec DLRM (or DLRM_DCN) with the masked EBC as its `embedding_bag_collection`."""
    masked = MaskedEmbeddingBagCollection(tables, device=torch.device("cpu"), mask_init=0.05)
    if arch == "dlrm":
        return DLRMTrain(DLRM(embedding_bag_collection=masked, dense_in_features=N_DENSE,
                              dense_arch_layer_sizes=[8, 16], over_arch_layer_sizes=[16, 1]))
    return DLRMTrain(DLRM_DCN(embedding_bag_collection=masked, dense_in_features=N_DENSE,
                              dense_arch_layer_sizes=[8, 16], over_arch_layer_sizes=[16, 1], dcn_num_layers=2,
                              dcn_low_rank_dim=4))


def assert_on_budget(dims: DimsFile, tables: List[EmbeddingBagConfig]) -> None:
    """Kept bytes <= budget, and no table below its cap could take 4 more columns within the budget."""
    assert dims.kept_bytes <= dims.budget_bytes
    steps = [table_bytes(t.num_embeddings, dims.table(t.name).dim + DIM_MULTIPLE).total
             - table_bytes(t.num_embeddings, dims.table(t.name).dim).total
             for t in tables if dims.table(t.name).dim < dim_cap(t.num_embeddings, t.embedding_dim)]
    assert dims.budget_bytes - dims.kept_bytes < min(steps), (dims.budget_bytes, dims.kept_bytes, steps)


def _search(rank: int, world: int, kind: str, arch: str) -> None:
    torch.manual_seed(0)
    tables = table_configs(SPEC)
    dmp, ref = shard_with_reference(_model(tables, arch), tables, kind, world, TCFG)
    search = BudgetedSearch(dmp, batch_size=B * world, **SETTINGS)
    ref_search = BudgetedSearch(ref, batch_size=B * world, **SETTINGS)
    for _ in train_in_lockstep(dmp, ref, TCFG, _batch, rank, world, STEPS):  # asserts equal losses
        search.step()
        ref_search.step()
    gate, ref_gate = find_gate(dmp), find_gate(ref)
    assert torch.equal(gate.values() > 0, ref_gate.values() > 0), f"{arch}/{kind}: hard masks differ"
    assert torch.allclose(gate.values(), ref_gate.values(), rtol=1e-4, atol=1e-7)
    assert search.steps == ref_search.steps and search.lam == ref_search.lam
    assert search.steps[-1]["kept_bytes"] < search.full, "the mask never moved: the test would see nothing"
    dims, ref_dims = search.dims_file(), ref_search.dims_file()
    assert dims == ref_dims
    assert_on_budget(dims, tables)
    compact = search.compact_tables(dims)
    assert [t.embedding_dim for t in compact] == [dims.table(t.name).dim for t in compact]
    if rank == 0:
        print(f"{arch}/{kind}: kept {dims.kept_bytes:,} B of budget {dims.budget_bytes:,} B, "
              f"dims {[dims.table(t.name).dim for t in tables]}, lambda {search.lam:.3g}")


def _pipelined(rank: int, world: int) -> None:
    """The same search through TrainPipelineSparseDist: the masks equal the unsharded run's."""
    torch.manual_seed(0)
    tables = table_configs(SPEC)
    dmp, ref = shard_with_reference(_model(tables, "dlrm"), tables, "row_wise", world, TCFG)
    search = BudgetedSearch(dmp, batch_size=B * world, **SETTINGS)
    ref_search = BudgetedSearch(ref, batch_size=B * world, **SETTINGS)
    pipeline = TrainPipelineSparseDist(dmp, make_optimizer(dmp, TCFG), torch.device("cpu"))
    batches = iter([_batch(rank, s) for s in range(STEPS)])
    ref_opts = reference_optimizers(ref, TCFG)
    for step in range(STEPS):
        pipeline.progress(batches)
        search.step()
        reference_step(ref, ref_opts, _batch, step, world)
        ref_search.step()
    assert torch.equal(find_gate(dmp).values() > 0, find_gate(ref).values() > 0)
    assert search.dims_file() == ref_search.dims_file()
    assert_on_budget(search.dims_file(), tables)


def _body(rank: int, world: int) -> None:
    for kind in ("table_wise", "row_wise"):
        for arch in ("dlrm", "dcn"):
            _search(rank, world, kind, arch)
    _pipelined(rank, world)


def test_stock_dlrm_budgeted_search_on_2_ranks_matches_unsharded() -> None:
    run_ranks(_body)


def test_plain_loop_bytes_budget_and_compact_mixed_dim_dlrm() -> None:
    """On one process, no DMP: a budget in bytes; the compact model after the search is MixedDimDLRM."""
    torch.manual_seed(0)
    tables = table_configs(SPEC)
    model = _model(tables, "dlrm")
    full = sum(table_bytes(t.num_embeddings, t.embedding_dim).total for t in tables)
    search = BudgetedSearch(model, **{**SETTINGS, "budget": full // 3}, batch_size=B)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(STEPS):
        loss, _ = model(_batch(0, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        search.step()
    assert [s["step"] for s in search.steps] == list(range(1, STEPS + 1))  # counted by the hook itself
    resumed = BudgetedSearch(model, **{**SETTINGS, "budget": full // 3}, batch_size=B)
    resumed.load_state_dict(search.state_dict())
    assert resumed.state_dict() == search.state_dict() and resumed.step_count == STEPS
    dims = search.dims_file()
    assert dims.budget_bytes == full // 3
    assert_on_budget(dims, tables)
    compact = plan_tables(dims, tables)
    widths = {f: 0 for f, _, _ in SPEC} | {t.feature_names[0]: t.embedding_dim for t in compact}
    small = MixedDimDLRM(EmbeddingBagCollection(tables=compact), widths, N_DENSE, [8, 16], [16, 1])
    batch = _batch(0, 0)
    assert small(batch.dense_features, batch.sparse_features).shape == (B, 1)
    assert sum(p.numel() for n, p in small.named_parameters() if "embedding_bags" in n) == sum(
        t.num_embeddings * dims.table(t.name).dim for t in tables)  # the compact tables hold only the kept dims
    with pytest.raises(ValueError, match="budget must be"):
        BudgetedSearch(model, budget=1.5, total_steps=10)
