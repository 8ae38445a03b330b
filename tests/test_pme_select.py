"""PME selection: exact budgeted threshold, nearest legal size per token, same answer under any sharding."""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig

from dist_utils import run_ranks
from sharded_mde.search.pme_score import ShardInfo, TokenScores
from sharded_mde.search.pme_select import ByteModel, default_sizes, histogram_bytes, select_sizes

TABLES = [EmbeddingBagConfig(name="t_A", num_embeddings=40, embedding_dim=16, feature_names=["A"]),
          EmbeddingBagConfig(name="t_B", num_embeddings=30, embedding_dim=8, feature_names=["B"])]
MODEL = ByteModel(combine="project")


def _full_scores() -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    out = {}
    for t in TABLES:
        s = torch.rand(t.num_embeddings, t.embedding_dim, generator=g) ** 4
        s[: t.num_embeddings // 4] *= 50  # a salient head
        s[-5:] = 0  # tokens never seen
        out[t.name] = s
    return out


def _scores(layout: List[ShardInfo], rank: int) -> TokenScores:
    full = _full_scores()
    local = {i: full[s.table][s.row0:s.row0 + s.rows, s.col0:s.col0 + s.cols].clone()
             for i, s in enumerate(layout) if s.rank == rank}
    return TokenScores(TABLES, layout, local, 1, 0.0)


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


def _bytes_of(sizes: Dict[str, torch.Tensor], legal: Dict[str, List[int]], model: ByteModel = MODEL) -> int:
    return sum(histogram_bytes([int((sizes[t.name] == s).sum()) for s in legal[t.name]], legal[t.name], 1, model)
               for t in TABLES)


def test_default_sizes() -> None:
    assert default_sizes(16) == [0, 4, 8, 16]
    assert default_sizes(24) == [0, 4, 8, 16, 24]
    assert default_sizes(16, [4, 12, 32]) == [4, 12]
    with pytest.raises(ValueError, match="no positive size"):
        default_sizes(16, [0, 32])


@pytest.mark.parametrize("budget", [0.1, 0.3, 0.6])
def test_threshold_fits_budget_and_sizes_are_nearest_legal(budget: float) -> None:
    full_bytes = sum(MODEL.group(t.num_embeddings, t.embedding_dim) for t in TABLES)
    sel = select_sizes(_scores(_layout("table_wise", 1), 0), int(budget * full_bytes), MODEL)
    assert sel.bytes == _bytes_of(sel.sizes, sel.legal) <= sel.budget_bytes
    full = _full_scores()

    def brute(tau: float) -> Dict[str, torch.Tensor]:
        out = {}
        for t in TABLES:
            legal = torch.tensor(sel.legal[t.name], dtype=torch.float)
            count = (full[t.name] > tau).sum(1).float()
            out[t.name] = legal[torch.argmin((count[:, None] - legal[None, :]).abs() - 1e-3 * legal[None, :], dim=1)]
        return out

    want = brute(sel.tau)
    for t in TABLES:
        assert torch.equal(sel.sizes[t.name].float(), want[t.name])
    # tight: the first lower threshold that changes any size no longer fits the budget
    below = sorted({float(v) for v in torch.cat([f.flatten() for f in full.values()]) if 0 < v <= sel.tau}, reverse=True)
    for v in below:
        nxt = brute(v * (1 - 1e-6))
        if any(not torch.equal(nxt[t.name], want[t.name]) for t in TABLES):
            assert _bytes_of({k: x.int() for k, x in nxt.items()}, sel.legal) > sel.budget_bytes
            break
    else:
        raise AssertionError("no lower threshold changes the sizes")
    for t in TABLES:
        assert int(sel.sizes[t.name][-5:].max()) == 0  # never seen: the smallest size
        head, tail = sel.sizes[t.name][:10].float().mean(), sel.sizes[t.name][10:].float().mean()
        assert head > tail


def test_budget_left_after_every_salient_entry_raises_the_smallest_size() -> None:
    scores = _scores(_layout("table_wise", 1), 0)
    for acc in scores.local.values():
        acc[10:] = 0  # only the first 10 tokens of each table were seen
    full_bytes = sum(MODEL.group(t.num_embeddings, t.embedding_dim) for t in TABLES)
    pad = ByteModel(combine="pad")
    sel = select_sizes(scores, int(0.6 * full_bytes), pad)
    assert sel.tau == 0.0 and sel.floor == 4
    assert sel.bytes == _bytes_of(sel.sizes, sel.legal, pad) <= sel.budget_bytes
    for t in TABLES:
        assert int(sel.sizes[t.name][10:].max()) == int(sel.sizes[t.name][10:].min()) == 4
        assert int(sel.sizes[t.name][:10].min()) == t.embedding_dim  # every entry of a seen token is salient
    raised = {t.name: torch.where(sel.sizes[t.name] == 4, 8, sel.sizes[t.name]) for t in TABLES}
    assert _bytes_of(raised, sel.legal, pad) > sel.budget_bytes  # the next floor would not fit


def test_infeasible_budget_names_the_floor() -> None:
    with pytest.raises(ValueError, match="smallest legal size"):
        select_sizes(_scores(_layout("table_wise", 1), 0), 1000, MODEL, sizes=[4, 8])


def _budget() -> int:
    return int(0.3 * sum(MODEL.group(t.num_embeddings, t.embedding_dim) for t in TABLES))


def _dist_body(rank: int, world: int, want) -> None:
    for kind in ("table_wise", "row_wise", "column_wise"):
        sel = select_sizes(_scores(_layout(kind, world), rank), _budget(), MODEL)
        if rank == 0:
            assert sel.tau == want.tau and sel.bytes == want.bytes, kind
            for t in TABLES:
                assert torch.equal(sel.sizes[t.name], want.sizes[t.name]), (kind, t.name)
        else:
            assert sel.sizes == {}
    dist.barrier()


def test_two_ranks_select_the_same_sizes_under_tw_rw_cw() -> None:
    run_ranks(_dist_body, select_sizes(_scores(_layout("table_wise", 1), 0), _budget(), MODEL))
