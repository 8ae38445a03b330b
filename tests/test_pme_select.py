"""PME selection: exact bytes (projections, routing) within the budget and close to it, legal sizes, fields compared
by a scale-free value (no field with evidence left without rows), pruned tokens on the OOV row, same answer under
any sharding on 2 gloo ranks."""

from __future__ import annotations

from typing import Dict, List

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig

from dist_utils import run_ranks
from sharded_mde.search.pme_score import ShardInfo, TokenScores
from sharded_mde.search.pme_select import (ByteModel, default_sizes, select_sizes, size_loss,
                                           table_selection_bytes)

# a big id field, a mid one, a tiny context field (3 rows: gender-like) and one with no evidence
TABLES = [EmbeddingBagConfig(name="t_A", num_embeddings=400, embedding_dim=16, feature_names=["A"]),
          EmbeddingBagConfig(name="t_B", num_embeddings=60, embedding_dim=8, feature_names=["B"]),
          EmbeddingBagConfig(name="t_G", num_embeddings=5, embedding_dim=16, feature_names=["G"]),
          EmbeddingBagConfig(name="t_N", num_embeddings=50, embedding_dim=16, feature_names=["N"])]
PAD, PROJECT = ByteModel(combine="pad"), ByteModel(combine="project")
SCALE = {"t_A": 1.0, "t_B": 1.0, "t_G": 1.0, "t_N": 1.0}


def _full(scale: Dict[str, float] = SCALE) -> Dict[str, List[torch.Tensor]]:
    """Per table (saliency, noise): head tokens pull consistently (mu), the tail and field N are only noise.

    `scale` multiplies a table's saliencies (as its init or head scale would): the noise scales by its square.
    """
    g = torch.Generator().manual_seed(3)
    out = {}
    for t in TABLES:
        n, d = t.num_embeddings, t.embedding_dim
        count = torch.tensor([0.0, 0.0] + [400.0 / (k + 1) for k in range(n - 2)])  # Zipf-like rows per token
        mu = torch.randn(n, d, generator=g) * (0.0 if t.name == "t_N" else 0.3)
        sal = mu * count[:, None] + torch.randn(n, d, generator=g) * count[:, None].sqrt()
        noise = count[:, None].expand(n, d).clone()
        s = scale[t.name]
        out[t.name] = [sal * s, noise * s * s]
    return out


def _scores(layout: List[ShardInfo], rank: int, scale: Dict[str, float] = SCALE) -> TokenScores:
    full = _full(scale)
    parts = [{i: full[s.table][k][s.row0:s.row0 + s.rows, s.col0:s.col0 + s.cols].clone()
              for i, s in enumerate(layout) if s.rank == rank} for k in range(2)]
    return TokenScores(TABLES, layout, *parts, 1, 0.0)


def _layout(kind: str, world: int) -> List[ShardInfo]:
    out = []
    for i, t in enumerate(TABLES):
        n, d = t.num_embeddings, t.embedding_dim
        if kind == "table_wise":
            out.append(ShardInfo(t.name, 0, 0, n, d, i % world))
        elif kind == "row_wise":
            out += [ShardInfo(t.name, 0, 0, n // 2, d, 0), ShardInfo(t.name, n // 2, 0, n - n // 2, d, 1)]
        else:
            out += [ShardInfo(t.name, 0, 0, n, d // 2, 1), ShardInfo(t.name, 0, d // 2, n, d - d // 2, 0)]
    return out


def _full_bytes(model: ByteModel = PAD) -> int:
    return sum(model.group(t.num_embeddings, t.embedding_dim) for t in TABLES)


def _bytes_of(sizes: Dict[str, torch.Tensor], legal: Dict[str, List[int]], model: ByteModel) -> int:
    return sum(table_selection_bytes(t, sizes[t.name].numpy(), legal[t.name], model) for t in TABLES)


def test_default_sizes() -> None:
    assert default_sizes(16) == [0, 4, 8, 16]
    assert default_sizes(24) == [0, 4, 8, 16, 24]
    assert default_sizes(16, [4, 12, 32]) == [0, 4, 12]  # 0 is always legal: the token reads the OOV row
    with pytest.raises(ValueError, match="no positive size"):
        default_sizes(16, [0, 32])
    r = size_loss([0, 4, 8, 16, 32, 64], 0.25)  # the share of value missed: 1 at size 0, falling, never rounded to 0
    assert r[0] == 1 and np.all(np.diff(r) < 0) and np.all(r > 0) and np.all(np.diff(np.diff(r)) > 0)  # u concave


@pytest.mark.parametrize("combine", ["pad", "project"])
@pytest.mark.parametrize("fraction", [0.03, 0.05, 0.2])
def test_bytes_with_projections_fit_the_budget_closely_and_sizes_are_legal(combine: str, fraction: float) -> None:
    model = ByteModel(combine=combine)
    budget = int(fraction * _full_bytes())
    sel = select_sizes(_scores(_layout("table_wise", 1), 0), budget, model)
    assert sel.bytes == _bytes_of(sel.sizes, sel.legal, model) <= budget
    # the whole budget is used: what is left buys less than one more row at the largest size plus a routing range
    assert budget - sel.bytes <= model.group(1, 16) + 32, (budget, sel.bytes)
    for t in TABLES:
        sizes = sel.sizes[t.name]
        assert set(sizes.tolist()) <= set(sel.legal[t.name]) and all(s % 4 == 0 for s in sizes.tolist())
    if combine == "pad":  # no projection matrix at all: the bytes are the groups' and the routing's alone
        assert sel.bytes == sum(table_selection_bytes(t, sel.sizes[t.name].numpy(), sel.legal[t.name], PAD)
                                for t in TABLES)


@pytest.mark.parametrize("fraction", [0.03, 0.05])
def test_below_dim_4_everywhere_every_field_with_evidence_keeps_rows(fraction: float) -> None:
    budget = int(fraction * _full_bytes())
    assert budget < sum(PAD.group(t.num_embeddings, 4) for t in TABLES)  # uniform dim 4 cannot go here
    sel = select_sizes(_scores(_layout("table_wise", 1), 0), budget, PAD)
    for t in TABLES:
        sizes = sel.sizes[t.name]
        assert int((sizes[2:] > 0).sum()) >= 1, t.name  # no field ends all-zero
        if bool((sizes[2:] == 0).any()):
            assert int(sizes[1]) == int(sizes.max()) > 0  # pruned tokens read the out-of-vocabulary row
    for name in ("t_A", "t_B", "t_G"):  # head tokens keep rows, the tail is pruned first
        kept = (sel.sizes[name][2:] > 0).float()
        assert kept[:len(kept) // 4].mean() > kept[len(kept) // 2:].mean() or kept.mean() == 1
    assert int((sel.sizes["t_G"][2:] > 0).sum()) == 3  # the tiny field's rows are cheap and all informative
    assert int((sel.sizes["t_N"][2:] > 0).sum()) == 1  # the field without evidence: its one floor token only


def test_values_compare_across_fields_whatever_their_scale() -> None:
    """Multiplying a field's saliencies (its init or head scale) changes nothing."""
    budget = int(0.05 * _full_bytes())
    base = select_sizes(_scores(_layout("table_wise", 1), 0), budget, PAD)
    scaled = select_sizes(_scores(_layout("table_wise", 1), 0, {"t_A": 1e-4, "t_B": 30.0, "t_G": 1e3, "t_N": 1.0}),
                          budget, PAD)
    for t in TABLES:
        assert torch.equal(base.sizes[t.name], scaled.sizes[t.name]), t.name


def test_row_value_moves_rows_to_the_most_served_tokens() -> None:
    """A value per row added to every seen token: at a large value per row the kept tokens are the most frequent."""
    budget = int(0.05 * _full_bytes())
    base = select_sizes(_scores(_layout("table_wise", 1), 0), budget, PAD)
    count = {t.name: np.array([0.0, 0.0] + [400.0 / (k + 1) for k in range(t.num_embeddings - 2)]) for t in TABLES}
    added = {n: 1e6 * c for n, c in count.items()}
    sel = select_sizes(_scores(_layout("table_wise", 1), 0), budget, PAD, added=added)
    assert sel.bytes <= budget
    for name in ("t_A", "t_N"):  # ids are in frequency order: a prefix of them is kept
        kept = sel.sizes[name][2:] > 0
        assert int(kept.sum()) >= 1 and bool(kept[:int(kept.sum())].all()), name
    # field N (no first-order evidence) gets rows for its frequent tokens, as it did not without the row value
    assert int((sel.sizes["t_N"][2:] > 0).sum()) > int((base.sizes["t_N"][2:] > 0).sum()) == 1


def test_tail_rows_give_their_tables_the_oov_row_within_the_budget() -> None:
    """`tail_rows` (search.pme.tail_share > 0): their OOV row is paid for even where no token is pruned."""
    scores = _scores(_layout("table_wise", 1), 0)
    tight = int(0.03 * _full_bytes())
    plain = select_sizes(scores, tight, PAD)
    assert int((plain.sizes["t_G"][2:] > 0).sum()) == 3 and int(plain.sizes["t_G"][1]) == 0  # none pruned: no tail row
    for budget in (tight, _full_bytes()):
        sel = select_sizes(scores, budget, PAD, tail_rows=["t_G", "t_N"])
        assert sel.bytes == _bytes_of(sel.sizes, sel.legal, PAD) <= budget
        for t in TABLES:
            sizes = sel.sizes[t.name]
            assert int(sizes[1]) == int(sizes[2:].max()) > 0 or t.name not in ("t_G", "t_N"), t.name
    assert int(select_sizes(scores, tight, PAD, tail_rows=["t_N"]).sizes["t_G"][1]) == 0  # only the tables named


def test_uniform_allocation_is_reachable_every_token_and_reserved_id_at_size_4() -> None:
    """sizes [4] with exactly the bytes of every row at 4 (routing included): every token takes size 4, those
    without evidence (field N, tokens never scored, the reserved ids) too, one group per field, as uniform dim 4
    has them. The diagnosis in docs/pme.md (PME's pipeline at this allocation gives uniform dim 4's AUC) rests on
    it. No slack is needed: pruned ids have no routing range, so raising a field's last pruned token costs its row
    alone.
    """
    scores = _scores(_layout("table_wise", 1), 0)
    legal = {t.name: [0, 4] for t in TABLES}
    all4 = {t.name: torch.full((t.num_embeddings,), 4, dtype=torch.int32) for t in TABLES}
    need = _bytes_of(all4, legal, PAD)
    sel = select_sizes(scores, need, PAD, sizes=[4])
    assert sel.bytes == need
    for t in TABLES:
        assert torch.equal(sel.sizes[t.name], all4[t.name]), t.name
    assert int((select_sizes(scores, need - 1, PAD, sizes=[4]).sizes["t_A"] == 0).sum()) > 0  # a byte less: not all


def test_infeasible_budget_is_an_error() -> None:
    with pytest.raises(ValueError, match="best token"):
        select_sizes(_scores(_layout("table_wise", 1), 0), 100, PAD)


def _budget() -> int:
    return int(0.05 * _full_bytes())


def _dist_body(rank: int, world: int, want) -> None:
    for kind in ("table_wise", "row_wise", "column_wise"):
        sel = select_sizes(_scores(_layout(kind, world), rank), _budget(), PROJECT)
        if rank == 0:
            assert sel.bytes == want.bytes, kind
            for t in TABLES:
                assert torch.equal(sel.sizes[t.name], want.sizes[t.name]), (kind, t.name)
        else:
            assert sel.sizes == {}
    dist.barrier()


def test_two_ranks_select_the_same_sizes_under_tw_rw_cw() -> None:
    run_ranks(_dist_body, select_sizes(_scores(_layout("table_wise", 1), 0), _budget(), PROJECT))
