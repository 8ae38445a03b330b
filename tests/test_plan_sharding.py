"""Planning on the meta device (GPU topologies on a CPU box), plan JSON round trips, bad plans and budgets."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sharded_mde.config import ConfigError, PlanConfig, from_dict
from sharded_mde.plan.sharding import (
    PlanningError,
    load_plan,
    manual_plan,
    plan_sharding,
    plan_to_json,
    planner_constraints,
    save_plan,
)
from test_plan_dims import tables

MIXED = [dataclasses.replace(t, embedding_dim=d) for t, d in zip(tables({"a": 200_000, "b": 50_000, "c": 900, "d": 30}), [64, 28, 12, 4])]
GPU8 = PlanConfig(world_size=8, compute_device="cuda", local_world_size=8, hbm_cap_gb=16, batch_size=512)


def test_plans_gpu_topology_without_gpu():
    plan, options = plan_sharding(MIXED, GPU8)
    assert list(plan.plan) == ["sparse_arch.ebc"] and set(plan.plan["sparse_arch.ebc"]) == {t.name for t in MIXED}
    assert {so.name for so in options} == {t.name for t in MIXED}
    for so in options:
        assert so.sharding_type != "data_parallel"  # DP is off unless allow_data_parallel
        assert all(0 <= sh.rank < 8 and sh.storage.hbm > 0 for sh in so.shards)
        assert all(sh.size[1] % 4 == 0 for sh in so.shards)
        t = next(t for t in MIXED if t.name == so.name)
        assert sum(sh.size[0] * sh.size[1] for sh in so.shards) == t.num_embeddings * t.embedding_dim


def test_optimizer_state_is_in_the_planner_estimate():
    def hbm(opt):
        _, options = plan_sharding(MIXED[:1], GPU8, optimizer=opt, constraints=None)
        return sum(sh.storage.hbm for so in options for sh in so.shards)
    weights = 200_000 * 64 * 4
    assert hbm("adam") - hbm("sgd") == pytest.approx(2 * weights, rel=1e-6)
    assert hbm("rowwise_adagrad") - hbm("sgd") == pytest.approx(200_000 * 4, rel=1e-6)


def test_constraints_force_column_wise_with_legal_shards():
    cfg = dataclasses.replace(GPU8, constraints={"t_a": {"sharding_types": ["column_wise"], "min_partition": 16},
                                                 "*": {"pooling_factor": 2.0}})
    _, options = plan_sharding(MIXED, cfg)
    a = next(so for so in options if so.name == "t_a")
    assert a.sharding_type == "column_wise" and [sh.size[1] for sh in a.shards] == [16, 16, 16, 16]
    assert planner_constraints(MIXED, cfg)["t_d"].pooling_factors == [2.0]


@pytest.mark.parametrize("constraints, message", [
    ({"t_a": {"sharding_types": ["diagonal"]}}, "plan.constraints.t_a.sharding_types"),
    ({"t_a": {"sharding_types": ["data_parallel"]}}, "data_parallel needs plan.allow_data_parallel"),
    ({"t_a": {"compute_kernels": ["warp"]}}, "plan.constraints.t_a.compute_kernels"),
])
def test_bad_constraints_name_the_key(constraints, message):
    with pytest.raises(ConfigError, match=message):
        planner_constraints(MIXED, dataclasses.replace(GPU8, constraints=constraints))


def test_config_rejects_illegal_min_partition():
    with pytest.raises(ConfigError, match="constraints.t_a.min_partition: a multiple of 4"):
        from_dict(PlanConfig, {"constraints": {"t_a": {"min_partition": 6}}})
    with pytest.raises(ConfigError, match="constraints.t_a.colour: unknown key"):
        from_dict(PlanConfig, {"constraints": {"t_a": {"colour": 1}}})


def test_budget_the_topology_cannot_hold_names_the_table():
    big = [dataclasses.replace(t, num_embeddings=n) for t, n in zip(MIXED, [4_000_000, 10, 10, 10])]  # t_a: ~1 GiB
    with pytest.raises(PlanningError, match=r"table t_a's \w+ shard of 4000000 x 64 needs [\d.]+ GiB of DDR but a rank holds at most 0.50 GiB"):
        plan_sharding(big, PlanConfig(world_size=2, compute_device="cpu", ddr_cap_gb=0.5,
                                      constraints={"t_a": {"sharding_types": ["table_wise"]}}))
    with pytest.raises(PlanningError, match=r"no plan fits: the tables need [\d.]+ GiB of DDR \(largest shards: t_a"):
        plan_sharding(big, PlanConfig(world_size=2, compute_device="cpu", ddr_cap_gb=0.3))


def test_plan_json_round_trip(tmp_path):
    plan, _ = plan_sharding(MIXED, GPU8)
    save_plan(tmp_path / "p.json", plan)
    again = load_plan(tmp_path / "p.json", MIXED, world_size=8)
    assert plan_to_json(again) == plan_to_json(plan)
    assert str(again.plan["sparse_arch.ebc"]["t_a"].sharding_spec.shards[0].placement).startswith("rank:")


@pytest.mark.parametrize("kind", ["table_wise", "row_wise", "column_wise"])
def test_manual_plans_are_legal_and_load(tmp_path, kind):
    plan = manual_plan(MIXED, kind, 4, module_fqn="ebc")
    save_plan(tmp_path / "p.json", plan)
    loaded = load_plan(tmp_path / "p.json", MIXED, world_size=4).plan["ebc"]
    assert {ps.sharding_type for ps in loaded.values()} == {kind}
    if kind == "column_wise":
        assert [len(loaded[t.name].ranks) for t in MIXED] == [4, 1, 3, 1]  # 64/4=16, 28 -> 28, 12/3=4, 4 -> 4


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["modules"]["sparse_arch.ebc"].pop("t_c"), "table t_c of the model is not in the plan"),
    (lambda p: p["modules"]["sparse_arch.ebc"].__setitem__("t_zz", p["modules"]["sparse_arch.ebc"]["t_a"]),
     "table t_zz is not a table of the model"),
    (lambda p: p["modules"]["sparse_arch.ebc"]["t_b"]["shards"][0]["sizes"].__setitem__(1, 32), "table t_b: shard .* does not lie inside"),
    (lambda p: p["modules"]["sparse_arch.ebc"]["t_d"]["ranks"].__setitem__(0, 9), "table t_d: ranks \\[9\\] are not ranks of a world of 8"),
    (lambda p: p.update(format_version=7), "not a sharding plan"),
])
def test_plan_that_does_not_match_the_tables(tmp_path, edit, message):
    plan, _ = plan_sharding(MIXED, GPU8)
    data = plan_to_json(plan)
    edit(data)
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(PlanningError, match=message):
        load_plan(tmp_path / "p.json", MIXED, world_size=8)


def test_plan_for_other_dims_is_rejected(tmp_path):
    save_plan(tmp_path / "p.json", manual_plan(MIXED, "table_wise", 2))
    wider = [dataclasses.replace(t, embedding_dim=t.embedding_dim + 4) for t in MIXED]
    with pytest.raises(PlanningError, match="table t_a: the shards do not tile the table's 200000 x 68"):
        load_plan(tmp_path / "p.json", wider)
