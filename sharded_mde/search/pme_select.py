"""PME budgeted selection: keep the most salient entries under a byte budget, size = kept count per token.

One global threshold tau keeps every entry with saliency > tau; a token's size is its kept count
rounded to the nearest legal size of its table (ties up; tokens never seen have no salient entry
and get the smallest size). A token's size only changes where its m-th largest saliency crosses
tau, m the midpoint between two legal sizes, so each row is reduced once to those few boundary
values and tau is found by bisection on the exact byte count (groups, their optimizer state and
the group projections), with one small all_reduce per step. When every salient entry fits, the
entries left are all ties at zero saliency, and the budget left is spread evenly: the smallest size
(that of tokens never seen) is raised to the largest legal floor that still fits. Rows split by
column-wise sharding are first assembled on one rank; no score matrix ever exceeds its table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig

from sharded_mde.plan.dims import table_bytes
from sharded_mde.search.pme_score import TokenScores

def default_sizes(dim: int, sizes: Sequence[int] = ()) -> List[int]:
    """Legal token sizes of a table of width `dim`: `sizes` capped at dim, or 0, 4, 8, 16, ... and dim."""
    if sizes:
        out = sorted(s for s in set(sizes) if s <= dim)
        if not any(out):
            raise ValueError(f"search.pme.sizes {list(sizes)}: no positive size fits a table of dim {dim}")
        return out
    out, s = [0], 4
    while s < dim:
        out.append(s)
        s *= 2
    return out + [dim]


@dataclass(frozen=True)
class ByteModel:
    """How bytes are counted: table weights and optimizer state per row, group projections with the dense optimizer."""

    weight_dtype: str = "fp32"
    optimizer: str = "rowwise_adagrad"
    dense_optimizer: str = "adam"
    combine: str = "project"

    def group(self, rows: int, size: int) -> int:
        """Bytes of a token group of `rows` tokens at `size` columns."""
        return table_bytes(rows, size, self.weight_dtype, self.optimizer).total

    def projection(self, size: int, out_dim: int) -> int:
        """Bytes of one group projection size -> out_dim (0 when padding or already out_dim wide)."""
        if self.combine == "pad" or size in (0, out_dim):
            return 0
        return table_bytes(out_dim, size, self.weight_dtype, self.dense_optimizer).total


def histogram_bytes(hist: Sequence[int], sizes: Sequence[int], features: int, model: ByteModel) -> int:
    """Bytes of one table whose tokens number hist[k] at sizes[k]: groups plus each feature's projections."""
    used = [s for s, n in zip(sizes, hist) if n and s]
    if not used:
        return 0
    out_dim = max(used)
    return sum(model.group(n, s) for s, n in zip(sizes, hist) if n) + features * sum(model.projection(s, out_dim) for s in used)


@dataclass
class Selection:
    """The selection result on rank 0: every token's size per table, the threshold and the bytes."""

    sizes: Dict[str, torch.Tensor]  # table -> size of each token (row), empty on other ranks
    legal: Dict[str, List[int]]
    tau: float
    bytes: int
    budget_bytes: int
    floor: int = 0  # the smallest size, raised above the smallest legal one when every salient entry fits


def _row_pieces(scores: TokenScores, rank: int, world: int) -> List[Tuple[str, int, torch.Tensor]]:
    """(table, first row, full-width saliency rows) held by this rank; column-split tables assembled on one rank."""
    dims = {t.name: t.embedding_dim for t in scores.tables}
    rows = {t.name: t.num_embeddings for t in scores.tables}
    pieces = []
    for name in dims:
        shards = [(i, s) for i, s in enumerate(scores.layout) if s.table == name]
        if all(s.cols == dims[name] for _, s in shards):
            pieces.extend((name, s.row0, scores.local[i]) for i, s in shards if s.rank == rank)
            continue
        home = min(s.rank for _, s in shards)  # column-wise: the table's first owner gets every shard
        full = torch.zeros(rows[name], dims[name]) if rank == home else None
        for i, s in shards:
            if s.rank == rank == home:
                full[s.row0:s.row0 + s.rows, s.col0:s.col0 + s.cols] = scores.local[i].cpu()
            elif s.rank == rank:
                dist.send(scores.local[i].cpu().contiguous(), dst=home)
            elif rank == home:
                buf = torch.empty(s.rows, s.cols)
                dist.recv(buf, src=s.rank)
                full[s.row0:s.row0 + s.rows, s.col0:s.col0 + s.cols] = buf
        if full is not None:
            pieces.append((name, 0, full))
    return pieces


@dataclass
class _Rows:
    """Rows [row0, row0 + rows) of a table held here; `v` holds the boundary saliencies of the rows in `seen`."""

    table: str
    row0: int
    rows: int
    seen: torch.Tensor
    v: torch.Tensor


def _boundaries(table: str, row0: int, scores: torch.Tensor, sizes: List[int]) -> _Rows:
    """Per row, the saliency a threshold must stay below for the row to reach each next legal size.

    Only rows with a salient entry are kept (tokens never seen have none: the smallest size).
    """
    scores = scores.float().cpu()
    need = [math.ceil((a + b) / 2) for a, b in zip(sizes, sizes[1:])]  # kept count that rounds up to the next size
    seen = (scores > 0).any(dim=1).nonzero().squeeze(1)
    ranked = torch.sort(scores[seen], dim=1, descending=True).values
    return _Rows(table, row0, scores.shape[0], seen, ranked[:, [max(n, 1) - 1 for n in need]])


def select_sizes(scores: TokenScores, budget_bytes: int, model: ByteModel, sizes: Sequence[int] = ()) -> Selection:
    """Global threshold under `budget_bytes`; every token's legal size gathered on rank 0."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    tables: List[EmbeddingBagConfig] = scores.tables
    legal = {t.name: default_sizes(t.embedding_dim, sizes) for t in tables}
    pieces = [_boundaries(name, row0, s, legal[name]) for name, row0, s in _row_pieces(scores, rank, world)]
    slot = {}  # table -> offset of its histogram in the packed vector
    for t in tables:
        slot[t.name] = sum(len(legal[u.name]) for u in tables[:tables.index(t)])
    width = sum(len(v) for v in legal.values())

    def floor_index(name: str, floor: int) -> int:
        return max(k for k, s in enumerate(legal[name]) if s <= floor or k == 0)

    def total_bytes(tau: float, floor: int = 0) -> int:
        hist = torch.zeros(width, dtype=torch.long)
        for p in pieces:
            k = len(legal[p.table])
            hist[slot[p.table]:slot[p.table] + k] += torch.bincount((p.v > tau).sum(1), minlength=k)
            hist[slot[p.table]] += p.rows - len(p.seen)
        if world > 1:
            dist.all_reduce(hist)
        total = 0
        for t in tables:
            h = hist[slot[t.name]:slot[t.name] + len(legal[t.name])].tolist()
            f = floor_index(t.name, floor)
            h = [0] * f + [sum(h[:f + 1])] + h[f + 1:]  # tokens below the floor size are raised to it
            total += histogram_bytes(h, legal[t.name], len(t.feature_names), model)
        return total

    top = torch.tensor([max([float(p.v.max()) for p in pieces if p.v.numel()] or [0.0])])
    positive = [p.v[p.v > 0] for p in pieces]
    low = torch.tensor([min([float(x.min()) for x in positive if x.numel()] or [math.inf])])
    if world > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
    floor_bytes = total_bytes(float(top))
    if floor_bytes > budget_bytes:
        raise ValueError(f"PME budget {budget_bytes:,} B is below the {floor_bytes:,} B of every token at its "
                         f"smallest legal size; raise search.budget or allow size 0 in search.pme.sizes")
    if total_bytes(0.0) <= budget_bytes:
        hi = 0.0
    else:  # below the smallest positive boundary every tau keeps the same entries as 0: infeasible
        lo, hi = float(low) / 2, float(top)
        # geometric bisection (saliencies span many orders of magnitude) until no two float32 values fit between
        while hi > lo * (1 + 1e-8):
            mid = math.sqrt(lo * hi)
            lo, hi = (lo, mid) if total_bytes(mid) <= budget_bytes else (mid, hi)
    tau = hi
    floor = 0  # every salient entry kept: the budget left goes evenly to the tokens without any
    if tau == 0.0:
        for f in sorted({x for v in legal.values() for x in v}):
            if total_bytes(0.0, f) <= budget_bytes:
                floor = f
    kept = total_bytes(tau, floor)
    out: Dict[str, torch.Tensor] = {}
    for t in tables:
        idx = torch.zeros(t.num_embeddings, dtype=torch.int32)
        for p in pieces:
            if p.table == t.name:
                idx[p.row0:p.row0 + p.rows] = 1  # 0 = not held here
                idx[p.row0 + p.seen] += (p.v > tau).sum(1).to(torch.int32)
                idx[p.row0:p.row0 + p.rows].clamp_(min=floor_index(t.name, floor) + 1)
        if world > 1:
            dist.reduce(idx, dst=0)
        if rank == 0:
            if bool((idx == 0).any()):
                raise RuntimeError(f"table {t.name}: some tokens were scored by no rank")
            out[t.name] = torch.tensor(legal[t.name], dtype=torch.int32)[(idx - 1).long()]
    return Selection(out, legal, tau, kept, budget_bytes, floor)
