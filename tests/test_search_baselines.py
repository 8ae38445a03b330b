"""The baselines power_law, magnitude and saliency: budgets met exactly, the right columns, sharded = unsharded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import List

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.datasets.utils import Batch

from ckpt_utils import cut, write_pieces
from dist_utils import run_ranks
from sharded_mde.config import ModelConfig, TrainConfig, load_config
from sharded_mde.modules.model import build_model
from sharded_mde.dims import (DimsFile, InfeasibleBudget, dim_cap, floor_bytes, legal_dim, load_dims,
                                   smallest_feasible_fraction, table_bytes)
from sharded_mde.plan.sharding import manual_plan
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.search.budget import budget_bytes, select_dims
from sharded_mde.search.magnitude import column_norms
from sharded_mde.search.pme_score import PooledCapture
from sharded_mde.search.power_law import power_law_dims
from sharded_mde.search.saliency import column_saliency
from sharded_mde.search.uniform import uniform_dims
from sharded_mde.train.state import copy_full_into
from sharded_mde.train.distributed import init_distributed, shutdown_distributed
from sharded_mde.train.sharding import ebc_path, wrap_model
from tiny_configs import tiny_planted_config

FEATURES = ["C1", "C2", "C3"]
SMALL = [("C1", 60, 8), ("C2", 40, 8), ("C3", 50, 12)]
N_DENSE, B = 4, 8
MODEL = ModelConfig(head="dlrm", dense_arch=[8, 8], over_arch=[16, 1])


def _tables(spec=SMALL) -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t_{f}", num_embeddings=r, embedding_dim=d, feature_names=[f]) for f, r, d in spec]


def assert_meets_budget(dims: DimsFile) -> None:
    """Legal dims, kept bytes <= budget, and no 4-column step of any table below its row cap still fits."""
    slack = dims.budget_bytes - dims.kept_bytes
    assert slack >= 0, (dims.kept_bytes, dims.budget_bytes)
    for t in dims.tables:
        assert t.dim == 0 or legal_dim(t.dim), (t.name, t.dim)
        assert len(t.kept_columns) == t.dim
        if t.dim < dim_cap(t.num_embeddings, t.full_dim):
            step = (table_bytes(t.num_embeddings, t.dim + 4, dims.weight_dtype, dims.optimizer).total
                    - table_bytes(t.num_embeddings, t.dim, dims.weight_dtype, dims.optimizer).total)
            assert step > slack, (t.name, t.dim, step, slack)


# --------------------------------------------------------------------------- power_law


@pytest.mark.parametrize("fraction", [0.08, 0.1, 0.3, 0.9])
@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "adam"])
def test_power_law_meets_the_budget_with_first_columns(fraction: float, optimizer: str) -> None:
    rows = [10, 100, 1000, 10_000, 100_000, 3]
    tables = [EmbeddingBagConfig(name=f"t{i}", num_embeddings=r, embedding_dim=64, feature_names=[f"f{i}"])
              for i, r in enumerate(rows)]
    dims = power_law_dims(tables, fraction, 0.3, optimizer)
    assert dims.method == "power_law"
    assert_meets_budget(dims)
    by_rows = sorted(dims.tables, key=lambda t: t.num_embeddings)[2:]  # 3 and 10 rows: capped at 4 and 8 columns
    assert [t.dim for t in sorted(dims.tables, key=lambda t: t.num_embeddings)[:2]] <= [4, 8]
    assert all(a.dim >= b.dim for a, b in zip(by_rows, by_rows[1:]))  # more rows, fewer columns
    assert all(t.dim >= 4 and t.kept_columns == list(range(t.dim)) for t in dims.tables)
    assert by_rows[0].dim > by_rows[-1].dim or fraction == 0.9


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.integers(1, 10**7), min_size=1, max_size=8), dims=st.lists(st.sampled_from([4, 8, 16, 64, 128]),
       min_size=8, max_size=8), fraction=st.floats(0.01, 1.0), alpha=st.floats(0.0, 1.0),
       optimizer=st.sampled_from(["rowwise_adagrad", "adagrad", "sgd"]))
def test_power_law_meets_any_feasible_budget(rows, dims, fraction, alpha, optimizer) -> None:
    tables = [EmbeddingBagConfig(name=f"t{i}", num_embeddings=r, embedding_dim=d, feature_names=[f"f{i}"])
              for i, (r, d) in enumerate(zip(rows, dims))]
    try:
        result = power_law_dims(tables, fraction, alpha, optimizer)
    except InfeasibleBudget as e:  # only when every table at 4 columns is already over the budget
        assert "smallest feasible budget" in str(e)
        assert sum(table_bytes(t.num_embeddings, 4, "fp32", optimizer).total for t in tables) > \
            budget_bytes(tables, fraction, "fp32", optimizer)
        return
    assert_meets_budget(result)
    assert all(t.dim >= 4 and t.kept_columns == list(range(t.dim)) for t in result.tables)


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.integers(1, 10**6), min_size=1, max_size=6), fraction=st.floats(0.01, 0.4))
def test_every_field_wise_method_agrees_on_feasibility(rows, fraction) -> None:
    tables = [EmbeddingBagConfig(name=f"t{i}", num_embeddings=r, embedding_dim=64, feature_names=[f"f{i}"])
              for i, r in enumerate(rows)]
    values = {t.name: torch.ones(64) for t in tables}
    methods = {"uniform": lambda: uniform_dims(tables, fraction), "power_law": lambda: power_law_dims(tables, fraction),
               "select_dims (ham, magnitude, saliency)": lambda: select_dims(values, tables, fraction)}
    feasible = {}
    for name, run in methods.items():
        try:
            run()
            feasible[name] = True
        except InfeasibleBudget as e:
            assert f"smallest feasible budget is {smallest_feasible_fraction(tables):.4f}" in str(e)
            feasible[name] = False
    want = budget_bytes(tables, fraction, "fp32", "rowwise_adagrad") >= floor_bytes(tables)
    assert set(feasible.values()) == {want}, feasible


def test_power_law_with_alpha_zero_is_one_dim_for_all() -> None:
    dims = power_law_dims(_tables([("a", 100, 32), ("b", 100, 32), ("c", 100, 32)]), 0.5, 0.0, "sgd")
    assert [t.dim for t in dims.tables] == [16, 16, 16]


# --------------------------------------------------------------------------- magnitude


def test_magnitude_keeps_the_columns_with_the_largest_norms_from_sharded_files(tmp_path: Path) -> None:
    norms = {"t_a": [9, 1, 8, 1, 7, 1, 6, 1], "t_b": [1, 5, 1, 5, 1, 5, 5, 1]}
    g = torch.Generator().manual_seed(0)
    full = {}
    for name, n in norms.items():
        w = torch.randn(10, 8, generator=g)
        full[name] = w / w.norm(dim=0) * torch.tensor(n, dtype=torch.float32)
    key = "model.sparse_arch.embedding_bags.{}.weight".format
    # t_a row-wise (rows 0-4, 5-9), t_b column-wise (columns 0-3, 4-7)
    write_pieces(tmp_path, 7, {key(n): w for n, w in full.items()},
                 {key("t_a"): cut(full["t_a"], "rw", [5]), key("t_b"): cut(full["t_b"], "cw", [4])})
    tables = _tables([("a", 10, 8), ("b", 10, 8)])
    got = column_norms(tmp_path, tables)
    for name, n in norms.items():
        torch.testing.assert_close(got[name], torch.tensor(n, dtype=torch.float64))
    kept = select_dims(got, tables, 0.5, optimizer="sgd")
    assert kept == {"t_a": [0, 2, 4, 6], "t_b": [1, 3, 5, 6]}
    with pytest.raises(ValueError, match="table t_b"):
        column_norms(tmp_path, _tables([("a", 10, 8), ("b", 10, 12)]))


# --------------------------------------------------------------------------- saliency


def _batch(samples: range, step: int) -> Batch:
    """Deterministic per sample: the same rows whichever rank or batch they land in."""
    lengths, values, dense, labels = [], [], [], []
    for f, (_, rows, _) in enumerate(SMALL):
        for i in samples:
            g = torch.Generator().manual_seed(10_000 * step + 100 * i + f)
            n = int(torch.randint(0, 4, (1,), generator=g))
            lengths.append(n)
            values.append(torch.randint(0, rows, (n,), generator=g))
    for i in samples:
        g = torch.Generator().manual_seed(10_000 * step + 100 * i + 99)
        dense.append(torch.randn(N_DENSE, generator=g))
        labels.append(float(torch.randint(0, 2, (1,), generator=g)))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=torch.cat(values),
                                              lengths=torch.tensor(lengths, dtype=torch.int32))
    return Batch(dense_features=torch.stack(dense), sparse_features=kjt, labels=torch.tensor(labels))


def _scorer(device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    ebc = EmbeddingBagCollection(tables=_tables(), device=device)
    return build_model(MODEL, _tables(), FEATURES, N_DENSE, sparse_arch=PooledCapture(ebc), device=device)


def test_saliency_equals_autograd_on_the_tables() -> None:
    model = _scorer(torch.device("cpu"))
    batches = [_batch(range(2 * B), s) for s in range(3)]
    got = column_saliency(model, _tables(), batches, len(batches), torch.device("cpu"), progress=False)
    want = {t.name: torch.zeros(t.embedding_dim, dtype=torch.float64) for t in _tables()}
    bags = model.model.sparse_arch.ebc.embedding_bags
    for batch in batches:  # brute force: |sum_i E[i, c] * dL/dE[i, c]| from the tables' own gradients
        model.zero_grad()
        model(batch)[0].backward()
        for name, acc in want.items():
            w = bags[name].weight
            acc += (w.detach().double() * w.grad.double()).sum(0).abs()
    for name in want:
        assert want[name].abs().max() > 0
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-9)


def _saliency_two_ranks(rank: int, world: int, state_path: str, want_path: str) -> None:
    model = _scorer(torch.device("meta"))
    plan = manual_plan(_tables(), "row_wise", world, module_fqn=ebc_path(model))
    dmp = wrap_model(model, plan, TrainConfig(), torch.device("cpu"))
    copy_full_into(dmp.state_dict(), torch.load(state_path))
    batches = [_batch(range(rank * B, (rank + 1) * B), s) for s in range(3)]  # this rank's half of each batch
    got = column_saliency(dmp, _tables(), batches, len(batches), torch.device("cpu"), progress=False)
    want = torch.load(want_path)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-9)
    assert select_dims(got, _tables(), 0.5) == select_dims(want, _tables(), 0.5)


def test_saliency_on_two_ranks_row_wise_equals_one_process(tmp_path: Path) -> None:
    model = _scorer(torch.device("cpu"))
    want = column_saliency(model, _tables(), [_batch(range(2 * B), s) for s in range(3)], 3, torch.device("cpu"),
                           progress=False)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    torch.save(want, tmp_path / "want.pt")
    run_ranks(_saliency_two_ranks, str(tmp_path / "state.pt"), str(tmp_path / "want.pt"))


# --------------------------------------------------------------------------- end to end on planted data


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_planted_config(tmp_path_factory.mktemp("baselines"), "row_wise", {"method": "power_law", "budget": 0.4, "saliency_batches": 4})


def test_baselines_end_to_end_under_budget_and_retrain_warm(config: Path) -> None:
    from sharded_mde.search.run import run_search
    from sharded_mde.search.retrain import run_retrain

    cfg = load_config(config)
    run = Path(cfg.run_dir)
    env = init_distributed(prefer_cuda=False)
    try:
        found = {}
        for method in ("power_law", "magnitude", "saliency"):
            m_cfg = dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, method=method))
            run_search(m_cfg, env)
            dims = load_dims(run / method / "dims.json", full_table_configs(cfg))
            assert dims.method == method
            assert_meets_budget(dims)
            assert dims.planted is not None and dims.planted.fields == len(full_table_configs(cfg))
            found[method] = dims
            if method == "magnitude":
                baseline_mtime = (run / "baseline" / "metrics.json").stat().st_mtime
        assert (run / "baseline" / "metrics.json").stat().st_mtime == baseline_mtime  # saliency reused the baseline
        assert found["saliency"].extra["saliency_batches"] == 4
        assert found["power_law"].supernet_checkpoints is None and found["power_law"].rule.alpha == cfg.search.power_law_alpha
        assert found["magnitude"].supernet_checkpoints == found["saliency"].supernet_checkpoints  # the same baseline
        short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=0.3),
                                    search=dataclasses.replace(cfg.search, retrain_warm_start=True))
        summary = run_retrain(short, env, run / "magnitude" / "dims.json")
        assert summary["init"] == "warm" and 0.5 < summary["test"]["auc"] <= 1
        assert json.loads((run / "retrain_magnitude" / "retrain.json").read_text())["method"] == "magnitude"
    finally:
        shutdown_distributed()
