"""The byte budget: exact legal final selection (property tests) and the dual-ascent controller."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchrec import EmbeddingBagConfig

from sharded_mde.modules.masked_ebc import ColumnGate
from sharded_mde.dims import (InfeasibleBudget, check_feasible, dim_cap, floor_bytes, load_dims, save_dims,
                                   smallest_feasible_fraction, table_bytes)
from sharded_mde.search.budget import (BudgetController, budget_bytes, full_bytes, make_dims_file, select_dims,
                                       target_bytes)


def _tables(spec):
    return [EmbeddingBagConfig(name=f"t_{i}", num_embeddings=r, embedding_dim=d, feature_names=[f"f{i}"])
            for i, (r, d) in enumerate(spec)]


table_specs = st.lists(st.tuples(st.integers(1, 5000), st.sampled_from([4, 8, 16, 32])), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(spec=table_specs, fraction=st.floats(0.02, 1.0), drop=st.booleans(), optimizer=st.sampled_from(
    ["rowwise_adagrad", "adagrad", "sgd"]), seed=st.integers(0, 10_000))
def test_selection_is_legal_fits_the_budget_and_is_within_one_step(spec, fraction, drop, optimizer, seed) -> None:
    tables = _tables(spec)
    g = torch.Generator().manual_seed(seed)
    values = {t.name: torch.randn(t.embedding_dim, generator=g) for t in tables}
    droppable = {tables[0].name} if drop else set()
    budget = budget_bytes(tables, fraction, optimizer=optimizer)
    try:
        kept = select_dims(values, tables, fraction, droppable, optimizer=optimizer)
    except InfeasibleBudget as e:  # only when every field outside `droppable` at dim 4 is over the budget
        assert "smallest feasible budget" in str(e)
        assert floor_bytes(tables, optimizer=optimizer, dropped=droppable) > budget
        return
    dims = {t.name: len(kept[t.name]) for t in tables}
    total = sum(table_bytes(t.num_embeddings, dims[t.name], optimizer=optimizer).total for t in tables)
    assert total <= budget
    for t in tables:
        d = dims[t.name]
        cap = dim_cap(t.num_embeddings, t.embedding_dim)
        assert d % 4 == 0 and d <= cap and (d >= 4 or t.name in droppable)
        assert len(set(kept[t.name])) == d and all(0 <= c < t.embedding_dim for c in kept[t.name])
        top = torch.sort(values[t.name].clamp_min(0), descending=True).values
        if d + 4 <= cap and top[d:d + 4].sum() > 0:  # no further step that gains fits
            step = table_bytes(t.num_embeddings, d + 4, optimizer=optimizer).total - \
                table_bytes(t.num_embeddings, d, optimizer=optimizer).total
            assert budget - total < step
        assert d <= 4 or top[d - 4:d].sum() > 0  # nothing past the floor is bought without worth
    dims_file = make_dims_file("ham", tables, kept, fraction, optimizer=optimizer)
    assert dims_file.kept_bytes == total and dims_file.budget_bytes == budget


def test_selection_keeps_the_largest_mask_values() -> None:
    tables = _tables([(100, 8), (100, 8)])
    values = {"t_0": torch.tensor([0.9, -0.5, 0.8, 0.7, 0.6, -0.1, -0.2, 0.5]), "t_1": -torch.ones(8)}
    # budget for exactly one 4-column table: the four largest values of t_0 (t_1 may be dropped)
    fraction = table_bytes(100, 4).total / full_bytes(tables)
    kept = select_dims(values, tables, fraction, droppable={"t_0", "t_1"})
    assert kept == {"t_0": [0, 2, 3, 4], "t_1": []}


def test_selection_rounds_dims_and_prefers_value_per_byte() -> None:
    tables = _tables([(1000, 16), (10, 16)])
    values = {"t_0": torch.linspace(1, -1, 16), "t_1": torch.linspace(1, -1, 16)}  # 8 positive columns each
    fraction = 0.31
    kept = select_dims(values, tables, fraction)
    assert len(kept["t_0"]) == 4  # 8 kept columns of the big table do not fit 31%; 4 do
    assert len(kept["t_1"]) == 8  # the small table is cheap, but 10 used rows hold at most 8 columns


def test_fill_order_does_not_starve_a_cheap_pruned_table() -> None:
    # The Frappe case: the mask pruned every column of the cheap tables (negative values).
    # Ranked by value / bytes, the cheapest tables came last and ended at 0 columns; now every
    # field keeps 4, and the rest goes by value per byte with pruned columns worth 0.
    tables = _tables([(5000, 16), (50, 16), (60, 16)])
    values = {"t_0": torch.linspace(1, 0.1, 16), "t_1": torch.full((16,), -0.5),
              "t_2": torch.tensor([0.2] * 6 + [-0.01] * 10)}
    budget = table_bytes(5000, 8).total + table_bytes(50, 16).total + table_bytes(60, 8).total
    fraction = (budget + 0.5) / full_bytes(tables)
    kept = select_dims(values, tables, fraction)
    # t_2's 5th and 6th columns are worth 0.2 each on 60 rows: bought before t_0's next 4 (on 5000 rows);
    # t_1's pruned columns are worth nothing and the leftover bytes are not spent on them
    assert [len(kept[n]) for n in ("t_0", "t_1", "t_2")] == [8, 4, 8]


def test_row_cap_limits_a_small_table() -> None:
    tables = _tables([(4, 32), (7, 32), (13, 32), (1000, 8)])  # rows count the reserved ids 0 and 1
    assert [dim_cap(t.num_embeddings, t.embedding_dim) for t in tables] == [4, 4, 12, 8]
    values = {t.name: torch.ones(t.embedding_dim) for t in tables}
    kept = select_dims(values, tables, 1.0)  # the whole budget: caps are the only limit
    assert [len(kept[t.name]) for t in tables] == [4, 4, 12, 8]
    kept = select_dims(values, tables, 1.0, used_rows={"t_2": 9})
    assert len(kept["t_2"]) == 8


def test_illegal_width_becomes_legal_by_loss_not_by_rounding_down() -> None:
    # The mask kept 2 columns of t_0 (illegal): rounding down gave 0. With a measured loss curve
    # that says 4 columns are worth their bytes, the table gets 4; a flat curve lets a cheaper table win.
    tables = _tables([(1000, 8), (10, 8)])
    values = {"t_0": torch.tensor([0.5, 0.4, -0.1, -0.2, -0.3, -0.4, -0.5, -0.6]), "t_1": torch.ones(8)}
    budget = table_bytes(1000, 4).total + table_bytes(10, 8).total
    fraction = (budget + 0.5) / full_bytes(tables)
    worth = {"t_0": [-0.70, -0.60, -0.60], "t_1": [-0.70, -0.69, -0.68]}  # t_0 at 8 would gain nothing
    kept = select_dims(values, tables, fraction, droppable={"t_0", "t_1"}, worth=worth)
    assert kept["t_0"] == [0, 1, 2, 3] and len(kept["t_1"]) == 8
    # worth that only shows two steps up is not starved by a cheap step worth nothing (look-ahead)
    tables = _tables([(1000, 12), (10, 12)])
    values = {t.name: torch.ones(12) for t in tables}
    worth = {"t_0": [-0.7, -0.7, -0.7, -0.5], "t_1": [-0.7, -0.7, -0.7]}
    budget = table_bytes(1000, 12).total + table_bytes(10, 4).total
    kept = select_dims(values, tables, (budget + 0.5) / full_bytes(tables), worth=worth)
    assert len(kept["t_0"]) == 12 and len(kept["t_1"]) == 4


def test_infeasible_budget_names_the_smallest_feasible_budget() -> None:
    tables = _tables([(1000, 64), (50, 64)])
    need = table_bytes(1000, 4).total + table_bytes(50, 4).total
    with pytest.raises(InfeasibleBudget) as e:
        select_dims({t.name: torch.ones(64) for t in tables}, tables, 0.05)
    f = smallest_feasible_fraction(tables)
    assert f"smallest feasible budget is {f:.4f} ({need:,} B" in str(e.value)
    assert budget_bytes(tables, f) >= need > budget_bytes(tables, f - 1e-4)
    check_feasible(tables, f)  # the named budget is feasible
    check_feasible(tables, 0.05, dropped={"t_0"})  # and dropping the big field would make 5% feasible


def test_dims_file_round_trip(tmp_path) -> None:
    tables = _tables([(50, 8), (70, 16)])
    d = make_dims_file("ham", tables, {"t_0": [1, 2, 5, 7]}, 0.5, extra={"mask_values": {"t_0": [0.1] * 8}})
    save_dims(tmp_path / "dims.json", d)
    back = load_dims(tmp_path / "dims.json", tables)
    assert back.table("t_1").dim == 0 and back.table("t_0").kept_columns == [1, 2, 5, 7]
    assert back.kept_bytes == table_bytes(50, 4).total and back.extra["mask_values"]["t_0"][0] == 0.1


def test_controller_dual_ascent_mask_steps_and_state_round_trip() -> None:
    tables = _tables([(100, 8), (300, 8)])
    gate = ColumnGate(tables, mask_init=0.05)
    budget = budget_bytes(tables, 0.5)
    ctl = BudgetController(gate, tables, budget, dual_lr=0.1, warmup=0.2, prune=0.5, lambda_init=1e-3, tol=0.02,
                           mask_lr=0.01, batch_size=8)
    trainer = SimpleNamespace(total_steps=100)
    assert ctl.kept_bytes() == full_bytes(tables)
    for s in range(1, 20):  # warm-up: no penalty, the mask does not move (its statistics do)
        gate.grad_sum.fill_(0.5)
        ctl.on_step_end(trainer, s)
        assert ctl.lam == 0.0 and torch.equal(gate.mask, torch.full((16,), 0.05))
    assert int(gate.updates) == 19 and gate.grad_sum.abs().max() == 0
    ctl.on_step_end(trainer, 20)  # pruning starts: the target is still the full bytes, kept == target
    assert ctl.lam == pytest.approx(1e-3) and ctl.steps[-1]["target"] == full_bytes(tables)
    assert (gate.mask != 0.05).all()  # the mask moves once pruning starts
    ctl.on_step_end(trainer, 45)  # target halfway down: kept is far above it, lambda grows by exp(dual_lr)
    assert ctl.lam == pytest.approx(1e-3 * math.exp(0.1))
    assert ctl.steps[-1]["target"] == pytest.approx(target_bytes(0.45, full_bytes(tables), budget, 0.2, 0.5), abs=1)
    gate.set_kept({"t_0": [0, 1, 2, 3]}, magnitude=5.0)  # far below the budget: lambda falls, stays positive
    for s in range(46, 90):
        ctl.on_step_end(trainer, s)
    assert 0 < ctl.lam < 1e-3 * math.exp(-0.1 * 40) and ctl.steps[-1]["kept_bytes"] == table_bytes(100, 4).total
    assert ctl.steps[-1]["target"] == budget
    ctl.on_eval(trainer, 89, {"auc": 0.7, "logloss": 0.5})
    other = BudgetController(ColumnGate(tables), tables, budget, dual_lr=0.1)
    other.load_state_dict(ctl.state_dict())
    assert other.state_dict() == ctl.state_dict() and other.trace()["evals"][0]["auc"] == 0.7
