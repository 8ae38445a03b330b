"""The joint search's exact multiple-choice knapsack against brute force, and its serving-byte selection."""

import itertools
import random

import pytest
from torchrec import EmbeddingBagConfig

from sharded_mde.dims import InfeasibleBudget, serving_table_bytes
from sharded_mde.search.knapsack import choose, pareto
from sharded_mde.search.precision import allocation_bytes, select, uniform_serving_fit


def brute_force(options, budget):
    """Best (worth, -bytes) over every combination within the budget."""
    names = list(options)
    best = None
    for combo in itertools.product(*(options[n] for n in names)):
        b = sum(o[1] for o in combo)
        if b > budget:
            continue
        w = sum(o[2] for o in combo)
        if best is None or (w, -b) > (best[0], -best[1]):
            best = (w, b)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_choose_matches_brute_force(seed):
    rng = random.Random(seed)
    options = {f"t{i}": [((i, j), rng.randrange(0, 60), round(rng.uniform(-1, 1), 3)) for j in range(rng.randrange(1, 6))]
               for i in range(rng.randrange(1, 6))}
    least = sum(min(o[1] for o in opts) for opts in options.values())
    budget = least + rng.randrange(0, 120)
    alloc, total, worth = choose(options, budget)
    best = brute_force(options, budget)
    assert worth == pytest.approx(best[0]) and total == best[1]
    chosen = {n: next(o for o in options[n] if o[0] == alloc[n]) for n in options}
    assert sum(o[1] for o in chosen.values()) == total <= budget
    assert sum(o[2] for o in chosen.values()) == pytest.approx(worth)


def test_choose_infeasible_and_pareto():
    with pytest.raises(InfeasibleBudget, match="cheapest option"):
        choose({"a": [(4, 10, 0.0)], "b": [(4, 10, 0.0)]}, 19)
    assert pareto([("x", 5, 1.0), ("y", 3, 1.0), ("z", 4, 2.0)]) == [("y", 3, 1.0), ("z", 4, 2.0)]


def _signal(tables, dtype_penalty):
    """A hand-made signal: loss falls with width up to 16 columns; each dtype adds its penalty."""
    entries = {}
    for t in tables:
        loss = {q: {str(d): 0.5 - 0.01 * min(d, 16) / 4 + (pen if d else 0.0) for d in (0, 4, 8, 16)}
                for q, pen in dtype_penalty.items()}
        entries[t.name] = {"order": list(range(t.embedding_dim)), "cap": 16, "loss": loss}
    return {"tables": entries, "droppable": []}


def test_select_fits_the_serving_bytes_and_prefers_cheap_precision():
    tables = [EmbeddingBagConfig(name=f"t_{i}", embedding_dim=16, num_embeddings=n, feature_names=[f"f{i}"])
              for i, n in enumerate((300, 50, 1000))]
    full = sum(n * 16 * 4 for n in (300, 50, 1000))
    sig = _signal(tables, {"fp32": 0.0, "fp16": 0.0001, "int8": 0.0005, "int4": 0.002})
    for frac in (0.5, 0.25, 0.125):
        budget = int(frac * full)
        alloc = select(tables, sig, ["fp32", "fp16", "int8", "int4"], budget, 1, "joint", frac, full)
        assert allocation_bytes(tables, alloc, 1) <= budget
        if frac < 0.25:  # below every table at fp32 dim 4: only smaller dtypes meet it
            assert any(q in ("int8", "int4") for _, q in alloc.values())
            continue
        fp32 = select(tables, sig, ["fp32"], budget, 1, "dims", frac, full)
        # joint's options include every fp32 one: its worth can only be at least dims alone's
        w = lambda a: sum(-sig["tables"][n]["loss"][q][str(d)] for n, (d, q) in a.items())
        assert w(alloc) >= w(fp32) - 1e-12
    with pytest.raises(InfeasibleBudget, match="smallest feasible budget"):
        select(tables, sig, ["fp32"], 1000, 1, "dims", 1000 / full, full)


def test_uniform_serving_fit_is_the_largest_that_fits():
    tables = [EmbeddingBagConfig(name=f"t_{i}", embedding_dim=64, num_embeddings=n, feature_names=[f"f{i}"])
              for i, n in enumerate((240, 1000, 10))]
    for q in ("fp32", "fp16", "int8", "int4"):
        for budget in (5000, 20000, 80000):
            d = uniform_serving_fit(tables, budget, q, 16)
            size = lambda d: sum(serving_table_bytes(t.num_embeddings, d, q, 16) for t in tables)
            assert d == 0 or size(d) <= budget
            assert d == 64 or size(d + 4) > budget
