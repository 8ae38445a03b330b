"""PME budgeted selection: token sizes by evidence per byte, every byte (projections, routing) counted while choosing.

Each token's value is its standardised saliency: the squared norm of its entry saliencies E * sum_b g_b
over the noise of that sum (sum of (E * g_row)^2 over its bag entries), minus 1, floored at 0. A token that
says nothing about the label has ratio 1 in expectation whatever its field's size, init or head scale,
so values compare across fields; a token seen once has ratio exactly 1 (no evidence). A token of value V
at size d is worth V u(d), u(d) = 1 - 2^(-d/h) (concave: the first columns hold a first-order evidence,
each further h = `search.pme.half_life` columns half of what is left). For a price lambda every token takes the legal size maximising V u(d) - lambda
x row bytes(d); lambda is bisected so the exact bytes (groups with optimizer state, the group projections
when combine is project, the routing tables) fit the budget, then the budget left is filled by the steps
worth most per byte (ties by frequency: lower id first). Every field with a seen token keeps its best token
at the smallest positive size; tokens left at size 0 share the field's out-of-vocabulary row (id 1, given
the field's largest size), so a pruned token is read as the field's tail, not as nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torchrec import EmbeddingBagConfig

from sharded_mde.data.vocab import NUM_RESERVED, OOV_ID
from sharded_mde.modules.token_groups import FieldGroups, router_bytes
from sharded_mde.dims import table_bytes
from sharded_mde.search.pme_score import TokenScores


def default_sizes(dim: int, sizes: Sequence[int] = ()) -> List[int]:
    """Legal token sizes of a table of width `dim`: `sizes` capped at dim (0 always legal), or 0, 4, 8, 16, ... and dim."""
    if sizes:
        out = sorted({0} | {s for s in sizes if s <= dim})
        if len(out) < 2:
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
    combine: str = "pad"

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


def field_groups(feature: str, sizes: np.ndarray, legal: Sequence[int]) -> FieldGroups | None:
    """The token groups of one feature whose tokens (reserved ids first) have `sizes`; None when none is kept."""
    hist = [int((sizes == s).sum()) for s in legal]
    pos = [(s, n) for s, n in sorted(zip(legal, hist), reverse=True) if s and n]
    if not pos:
        return None
    index = {s: i for i, (s, _) in enumerate(pos)}
    reserved = tuple(index.get(int(s), -1) for s in sizes[:NUM_RESERVED])
    return FieldGroups(feature, len(sizes), pos[0][0], tuple(pos), reserved)


def table_selection_bytes(t: EmbeddingBagConfig, sizes: np.ndarray, legal: Sequence[int], model: ByteModel) -> int:
    """Exact bytes of one table's selection: groups with optimizer state, projections and each feature's routing."""
    hist = [int((sizes == s).sum()) for s in legal]
    nbytes = histogram_bytes(hist, legal, len(t.feature_names), model)
    field = field_groups(t.feature_names[0], sizes, legal)
    return nbytes + (len(t.feature_names) * router_bytes(field) if field is not None else 0)


@dataclass
class Selection:
    """The selection result on rank 0: every token's size per table, the price and the bytes."""

    sizes: Dict[str, torch.Tensor]  # table -> size of each token (row), empty on other ranks
    legal: Dict[str, List[int]]
    price: float  # the price lambda (value per byte) at which the bisection stopped
    bytes: int
    budget_bytes: int
    values: Dict[str, np.ndarray]  # table -> each token's value (standardised saliency - 1, >= 0), rank 0 only


def _row_pieces(scores: TokenScores, local: Dict[int, torch.Tensor], rank: int) -> List[Tuple[str, int, torch.Tensor]]:
    """(table, first row, full-width rows of `local`) held by this rank; column-split tables assembled on one rank."""
    dims = {t.name: t.embedding_dim for t in scores.tables}
    rows = {t.name: t.num_embeddings for t in scores.tables}
    pieces = []
    for name in dims:
        shards = [(i, s) for i, s in enumerate(scores.layout) if s.table == name]
        if all(s.cols == dims[name] for _, s in shards):
            pieces.extend((name, s.row0, local[i]) for i, s in shards if s.rank == rank)
            continue
        home = min(s.rank for _, s in shards)  # column-wise: the table's first owner gets every shard
        full = torch.zeros(rows[name], dims[name]) if rank == home else None
        for i, s in shards:
            if s.rank == rank == home:
                full[s.row0:s.row0 + s.rows, s.col0:s.col0 + s.cols] = local[i].cpu()
            elif s.rank == rank:
                dist.send(local[i].cpu().contiguous(), dst=home)
            elif rank == home:
                buf = torch.empty(s.rows, s.cols)
                dist.recv(buf, src=s.rank)
                full[s.row0:s.row0 + s.rows, s.col0:s.col0 + s.cols] = buf
        if full is not None:
            pieces.append((name, 0, full))
    return pieces


def token_values(scores: TokenScores) -> Dict[str, Tuple[np.ndarray, np.ndarray]] | None:
    """Rank 0: per table (value of each token, seen by scoring); other ranks None. One float per row is gathered.

    value = max(0, |s|^2 / noise - 1), s the token's saliency row: for a token whose n rows pull by mu
    with per-row spread sigma, |s|^2 is n^2 |mu|^2 + n sigma^2 in expectation and the noise n sigma^2,
    so the value estimates n |mu|^2 / sigma^2 (0 when the token says nothing; exactly 0 for a token
    seen once), free of the field's init and head scale.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    pieces = zip(*(_row_pieces(scores, part, rank) for part in (scores.local, scores.noise)))
    mine = []
    for (name, row0, s), (_, _, q) in pieces:
        q_row = q.double().sum(1)
        ratio = s.double().pow(2).sum(1) / q_row.clamp(min=1e-300)
        mine.append((name, row0, (ratio - 1).clamp(min=0).cpu().numpy(), (q_row > 0).cpu().numpy()))
    if world > 1:
        box = [None] * world if rank == 0 else None
        dist.gather_object(mine, box, dst=0)
        if rank != 0:
            return None
        mine = [p for part in box for p in part]
    out = {t.name: (np.zeros(t.num_embeddings), np.zeros(t.num_embeddings, bool)) for t in scores.tables}
    for name, row0, v, seen in mine:
        out[name][0][row0:row0 + len(v)] = v
        out[name][1][row0:row0 + len(v)] = seen
    return out


def size_loss(legal: Sequence[int], half_life: float = 0.25) -> np.ndarray:
    """r(d) = 2^(-d / half_life) for each legal size d: the share of a token's value a row of d columns misses.

    u(d) = 1 - r(d) is kept. The evidence is first-order (how a token's labels depart from its field's),
    which the first columns already hold; every further `half_life` columns keep half of what is left.
    Kept as r, not u: 1 - 2^-64 rounds to 1 in float64, r does not.
    """
    return np.exp2(-np.asarray(legal, float) / half_life)


class _Allocator:
    """Sizes of every token of every table for a price, plus the minimum and tail rules, with exact bytes."""

    def __init__(self, tables: Sequence[EmbeddingBagConfig], values: Dict[str, Tuple[np.ndarray, np.ndarray]],
                 legal: Dict[str, List[int]], model: ByteModel, half_life: float, tail_rows: Sequence[str] = ()) -> None:
        self.tables, self.legal, self.model, self.tail_rows = list(tables), legal, model, set(tail_rows)
        self.values = {t.name: values[t.name][0] for t in tables}
        self.miss = {t.name: size_loss(legal[t.name], half_life) for t in tables}
        self.row_cost = {t.name: np.array([model.group(1, s) for s in legal[t.name]], float) for t in tables}
        self.floor: Dict[str, int] = {}  # table -> the token kept at the smallest positive size (-1: none seen)
        for t in tables:
            v, seen = values[t.name]
            regular = np.flatnonzero(seen[NUM_RESERVED:]) + NUM_RESERVED
            if len(regular) == 0:
                self.floor[t.name] = -1
            else:  # the best value; ties (no evidence anywhere) to the most frequent (lowest id)
                self.floor[t.name] = int(regular[np.lexsort((regular, -v[regular]))[0]])

    def level(self, name: str, price: float) -> np.ndarray:
        """Index into the legal sizes of each token of one table at `price` (bytes priced in value per byte)."""
        gain = -self.values[name][:, None] * self.miss[name][None, :] - price * self.row_cost[name][None, :]
        return gain.argmax(1)  # ties to the smaller size

    def finish(self, name: str, level: np.ndarray) -> np.ndarray:
        """Sizes from levels: the floor token at least the smallest positive size; the tail row when tokens are pruned.

        A table of `tail_rows` with kept tokens has its tail row whatever is pruned (retraining sends a share of its
        rows there).
        """
        level = level.copy()
        f = self.floor[name]
        if f >= 0:
            level[f] = max(level[f], 1)
        sizes = np.asarray(self.legal[name])[level]
        kept = sizes[NUM_RESERVED:]
        if len(kept) and (kept > 0).any() and (name in self.tail_rows or (kept == 0).any()):
            sizes[OOV_ID] = max(sizes[OOV_ID], kept.max())  # pruned tokens read the out-of-vocabulary row
        return sizes

    def total(self, levels: Dict[str, np.ndarray]) -> Tuple[int, Dict[str, np.ndarray]]:
        """Exact bytes of per-table levels after the floor and tail rules, and the sizes."""
        sizes = {t.name: self.finish(t.name, levels[t.name]) for t in self.tables}
        return sum(table_selection_bytes(t, sizes[t.name], self.legal[t.name], self.model) for t in self.tables), sizes

    def at_price(self, price: float) -> Dict[str, np.ndarray]:
        """Every table's levels at `price`."""
        return {t.name: self.level(t.name, price) for t in self.tables}

    def fill(self, levels: Dict[str, np.ndarray], budget: int) -> Dict[str, np.ndarray]:
        """Raises tokens one legal step at a time, most value per byte first (ties: lower id), while the bytes fit."""
        for _ in range(max(len(v) for v in self.legal.values())):  # each pass raises a token by at most one step
            cand = []
            for i, t in enumerate(self.tables):
                lv = levels[t.name]
                up = np.flatnonzero(lv < len(self.legal[t.name]) - 1)
                r, c = self.miss[t.name], self.row_cost[t.name]
                gain = self.values[t.name][up] * (r[lv[up]] - r[lv[up] + 1]) / (c[lv[up] + 1] - c[lv[up]])
                cand.append(np.stack([gain, np.full(len(up), i), up]))
            cand = np.concatenate(cand, axis=1)
            if not cand.shape[1]:
                break
            cand = cand[:, np.lexsort((cand[2], -cand[0]))]

            def apply(base: Dict[str, np.ndarray], steps: np.ndarray) -> Dict[str, np.ndarray]:
                out = {name: lv.copy() for name, lv in base.items()}
                for i, t in enumerate(self.tables):
                    out[t.name][steps[2][steps[1] == i].astype(np.int64)] += 1
                return out

            raised = False
            for _ in range(64):  # the longest prefix of steps that fits, then skip the step that did not (a new group's
                lo, hi = 0, cand.shape[1]  # routing range or projection) and try the cheaper ones behind it
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    lo, hi = (mid, hi) if self.total(apply(levels, cand[:, :mid]))[0] <= budget else (lo, mid - 1)
                levels = apply(levels, cand[:, :lo])
                raised |= lo > 0
                cand = cand[:, lo + 1:]
                if not cand.shape[1]:
                    break
            if not raised:
                break
        return levels


def select_sizes(scores: TokenScores, budget_bytes: int, model: ByteModel, sizes: Sequence[int] = (),
                 half_life: float = 0.25, weights: Optional[Dict[str, np.ndarray]] = None,
                 added: Optional[Dict[str, np.ndarray]] = None, tail_rows: Sequence[str] = ()) -> Selection:
    """Every token's legal size under `budget_bytes` (exact bytes, routing included), gathered on rank 0.

    `added` (per table, per token) is added to each seen token's value before `weights` multiply it;
    `tail_rows`: tables that pay for their out-of-vocabulary row whenever a token is kept (`search.pme.tail_share`).
    """
    tables: List[EmbeddingBagConfig] = scores.tables
    legal = {t.name: default_sizes(t.embedding_dim, sizes) for t in tables}
    values = token_values(scores)
    if values is None:  # not rank 0: the result lives on rank 0
        return Selection({}, legal, 0.0, 0, budget_bytes, {})
    if added is not None:
        values = {n: (v + np.where(seen, added[n], 0.0), seen) for n, (v, seen) in values.items()}
    if weights is not None:
        values = {n: (v * weights[n], seen) for n, (v, seen) in values.items()}
    alloc = _Allocator(tables, values, legal, model, half_life, tail_rows)
    infinite = {t.name: np.zeros(t.num_embeddings, np.int64) for t in tables}
    floor_bytes, _ = alloc.total(infinite)
    if floor_bytes > budget_bytes:
        raise ValueError(f"PME budget {budget_bytes:,} B is below the {floor_bytes:,} B of every field's best token "
                         f"and its tail row at the smallest size; raise search.budget")
    top = max([float(v.max()) for v, _ in values.values()] + [1e-300])
    cheapest = min(float(c[1]) for c in alloc.row_cost.values())
    lo, hi = 1e-300, max(top / cheapest, 1e-300) * 2  # at hi no token is worth a row
    for _ in range(200):  # geometric bisection on the price: prices span many orders of magnitude
        if hi <= lo * (1 + 1e-9):
            break
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if alloc.total(alloc.at_price(mid))[0] > budget_bytes else (lo, mid)
    levels = alloc.at_price(hi)
    if alloc.total(levels)[0] > budget_bytes:  # even the priciest level is over: keep only the floor
        levels = infinite
    levels = alloc.fill(levels, budget_bytes)
    kept, out = alloc.total(levels)
    return Selection({k: torch.from_numpy(v.astype(np.int32)) for k, v in out.items()}, legal, hi, kept, budget_bytes,
                     alloc.values)
