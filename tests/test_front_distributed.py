"""The front's walking budget on 2 real gloo ranks: the masks at every point equal an unsharded copy's.

Stock TorchRec DLRM over the masked EBC under DistributedModelParallel (table-wise and row-wise),
trained in lockstep with an unsharded reference (`dist_utils.train_in_lockstep`), each with its own
`BudgetedSearch` walking [0.8, 0.6, 0.4]. Both take each point at the same step (`due_point`: the
kept bytes settled on the budget from above, or the segment's end); there the hard masks are equal, the mask
values agree to float drift (summed over ranks in another order: up to about 1e-3 of the largest
value after 60 steps), and the selection at that point's budget is equal and within it.
"""

from __future__ import annotations

import torch

from dist_utils import run_ranks, shard_with_reference, table_configs, train_in_lockstep
from sharded_mde import BudgetedSearch
from sharded_mde.dims import dims_bytes
from sharded_mde.modules.masked_ebc import find_gate
from sharded_mde.search.budget import select_dims
from test_budgeted_search_dlrm import SPEC, TCFG, B, _batch, _model

STEPS, WALK = 60, [0.8, 0.6, 0.4]
SETTINGS = dict(budget=WALK[-1], walk=WALK, total_steps=STEPS, warmup=0.2, prune=0.5, mask_lr=0.05, lambda_init=0.5)


def _walk(rank: int, world: int, kind: str) -> None:
    torch.manual_seed(0)
    tables = table_configs(SPEC)
    dmp, ref = shard_with_reference(_model(tables, "dlrm"), tables, kind, world, TCFG)
    search = BudgetedSearch(dmp, batch_size=B * world, **SETTINGS)
    ref_search = BudgetedSearch(ref, batch_size=B * world, **SETTINGS)
    ends = search.point_steps()
    assert ends == ref_search.point_steps() and len(ends) == 3 and ends[-1] == STEPS
    gate, ref_gate = find_gate(dmp), find_gate(ref)
    for step, _ in enumerate(train_in_lockstep(dmp, ref, TCFG, _batch, rank, world, STEPS), start=1):
        search.step()
        ref_search.step()
        i = search.due_point()
        assert i == ref_search.due_point()
        if i is None:
            continue
        assert step <= ends[i] and (i == 0 or step > ends[i - 1])
        kept, budget = search.steps[-1]["kept_bytes"], search.walk[i]
        assert step == ends[i] or budget <= kept <= budget + search.tol * search.full  # settled, or the segment's end
        assert torch.equal(gate.values() > 0, ref_gate.values() > 0), f"{kind} step {step}: hard masks differ"
        diff = float((gate.values() - ref_gate.values()).abs().max() / ref_gate.values().abs().max())
        assert diff < 1e-2, f"{kind} step {step}: mask values differ by {diff:.2e} of the largest"  # float drift
        dims = select_dims(gate.table_values(), tables, WALK[i])
        assert dims == select_dims(ref_gate.table_values(), tables, WALK[i])
        search.points[i] = ref_search.points[i] = {"step": step, "kept_bytes": kept,
                                                    "selected": dims_bytes(tables, {n: len(c) for n, c in dims.items()})}
        assert search.points[i]["selected"] <= budget
    assert sorted(search.points) == [0, 1, 2] and search.steps == ref_search.steps
    assert search.steps[-1]["kept_bytes"] < search.walk[0], "the mask never walked: the test would see nothing"
    if rank == 0:
        print(f"{kind}: points {search.points}")


def _body(rank: int, world: int) -> None:
    for kind in ("table_wise", "row_wise"):
        _walk(rank, world, kind)


def test_front_walk_on_2_ranks_matches_unsharded() -> None:
    run_ranks(_body)


def _front_search(rank: int, world: int, config: str, out: str) -> None:
    from sharded_mde.config import load_config
    from sharded_mde.search.run import run_search
    from sharded_mde.train.distributed import init_distributed

    cfg = load_config(config)
    env = init_distributed(prefer_cuda=False)
    dims = run_search(cfg, env)
    torch.save({"dims": {t.name: t.kept_columns for t in dims.tables}}, f"{out}.rank{rank}")


def test_front_search_on_2_ranks_takes_the_same_points_on_each(tmp_path) -> None:
    """The trainer's front on 2 row-wise ranks: each point is taken mid-pipeline (evaluation with batches in
    flight) on both ranks alike, and the run completes with a dims file per budget."""
    import json

    from sharded_mde.dims import load_dims
    from sharded_mde.search.ham_front import FRONT_FILE
    from tiny_configs import tiny_planted_config

    config = tiny_planted_config(tmp_path, "row_wise", {"method": "ham", "budget": 0.4, "front": [0.8, 0.6, 0.4],
                                                        "epochs": 2, "mask_lr": 0.02, "front_check": []})
    run_ranks(_front_search, str(config), str(tmp_path / "dims"))
    got = [torch.load(tmp_path / f"dims.rank{r}") for r in range(2)]
    assert got[0] == got[1]
    front = json.loads((tmp_path / "run" / "ham" / FRONT_FILE).read_text())
    assert [p["budget"] for p in front["points"]] == [0.8, 0.6, 0.4] and all(p["feasible"] for p in front["points"])
    for p in front["points"]:
        dims = load_dims(p["dims_file"])
        assert dims.kept_bytes <= dims.budget_bytes and dims.extra["front"]["step"] == p["step"]
    assert got[0]["dims"] == {t.name: t.kept_columns for t in load_dims(front["points"][-1]["dims_file"]).tables}
