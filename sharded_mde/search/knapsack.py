"""The exact multiple-choice knapsack: one option per table, most total worth within a byte budget.

Each table offers options (choice, bytes, worth), e.g. (dim, dtype) at its serving bytes and its
measured worth; `choose` picks exactly one per table maximising the summed worth with the summed
bytes <= budget. Exact by dynamic programming over tables with Pareto pruning: after each table
the partial allocations are kept only where no other one has fewer-or-equal bytes and at least
the same worth. The objective is a sum and the constraint a sum of non-negative bytes, so a
dominated partial allocation can never complete to something better than its dominator's same
completion: dropping it loses nothing, and the optimum survives. The frontier never has more
states than distinct byte totals <= budget, and in practice a few thousand (tables are tens,
options per table tens), so no rounding of bytes (which would make it approximate) is needed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

from sharded_mde.dims import InfeasibleBudget

Option = Tuple[Any, int, float]  # (choice, bytes, worth)


def pareto(options: Sequence[Option]) -> List[Option]:
    """The options no other one beats (fewer-or-equal bytes and at least the same worth), cheapest first;
    of equal ones the first listed stays."""
    out: List[Option] = []
    for o in sorted(options, key=lambda o: (o[1], -o[2])):  # stable: equal options keep their order
        if not out or o[2] > out[-1][2]:
            out.append(o)
    return out


def choose(options: Mapping[str, Sequence[Option]], budget: int) -> Tuple[Dict[str, Any], int, float]:
    """(choice per table, total bytes, total worth) of the most worth within `budget` bytes, one option per
    table; of equally worthy allocations the cheapest. InfeasibleBudget when even the cheapest options exceed it.

    Example::

        choose({"a": [(4, 100, -0.5), (8, 200, -0.4)], "b": [(4, 50, -0.6)]}, 260)  # ({"a": 8, "b": 4}, 250, -1.0)
    """
    names = list(options)
    fronts = {n: pareto(options[n]) for n in names}
    for n in names:
        if not fronts[n]:
            raise ValueError(f"knapsack: table {n} has no option")
    least = sum(fronts[n][0][1] for n in names)
    if least > budget:
        raise InfeasibleBudget(f"knapsack: the cheapest option of every table needs {least:,} B, over the budget of "
                               f"{budget:,} B")
    # states: (bytes, worth, back pointer (previous level's state index, option index))
    levels: List[List[Tuple[int, float, int, int]]] = []
    states: List[Tuple[int, float, int, int]] = [(0, 0.0, -1, -1)]
    for n in names:
        nxt = [(b + ob, w + ow, i, j) for i, (b, w, _, _) in enumerate(states)
               for j, (_, ob, ow) in enumerate(fronts[n]) if b + ob <= budget]
        nxt.sort(key=lambda s: (s[0], -s[1]))
        kept: List[Tuple[int, float, int, int]] = []
        for s in nxt:
            if not kept or s[1] > kept[-1][1]:
                kept.append(s)
        levels.append(kept)
        states = kept
    best = len(states) - 1  # worth rises strictly along the frontier: the last state is the best, and the cheapest such
    total_bytes, total_worth = states[best][0], states[best][1]
    out: Dict[str, Any] = {}
    for level in range(len(names) - 1, -1, -1):
        _, _, prev, j = levels[level][best]
        out[names[level]] = fronts[names[level]][j][0]
        best = prev
    return {n: out[n] for n in names}, total_bytes, total_worth
