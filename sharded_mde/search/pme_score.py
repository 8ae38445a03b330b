"""PME saliency at initialisation: the entry saliencies E_ij * dL/dE_ij summed over the scored batches, with their noise.

Fused TBE kernels apply the optimizer inside backward and never expose a table's gradient, so the
entry gradients are derived from the gradient of the pooled output: with sum pooling,
dL/dE[i, :] = sum of dL/dpooled over the bags that contain token i. Each rank computes that for
its own batch (only the head is back-propagated; the tables are never touched), sends each
token's gradient piece to the rank that holds the token's shard (all_to_all over the shard layout
of the ShardedTensors, so any sharding works), and the owner adds the global batch's gradient
(mean of the ranks' losses, as DMP trains) to an accumulator of its shard's size, scored E * sum
at the end. Beside it the owner accumulates the noise, sum over bag entries of (E * g_row)^2: for a
token that says nothing about the label E||E * sum g||^2 equals it, so their ratio is a scale-free
evidence that selection compares across fields (pme_select).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagConfig
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from tqdm import tqdm

from sharded_mde.train.sharding import unwrap
from sharded_mde.train.state import table_key, table_prefix



class PooledCapture(nn.Module):
    """Wraps the sparse module and keeps its last pooled output, so scoring can take dL/dpooled."""

    def __init__(self, ebc: nn.Module) -> None:
        super().__init__()
        self.ebc = ebc
        self.last: Optional[KeyedTensor] = None

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        kt = self.ebc(features)
        self.last = KeyedTensor(keys=kt.keys(), length_per_key=kt.length_per_key(), values=kt.values())
        return self.last

    @staticmethod
    def find(model: nn.Module, scorer: str) -> "PooledCapture":
        """The one PooledCapture inside `model`; `scorer` names who needs it in the error."""
        captures = [m for m in model.modules() if isinstance(m, PooledCapture)]
        if len(captures) != 1:
            raise ValueError(f"{scorer} needs the model's sparse arch wrapped in exactly one PooledCapture")
        return captures[0]


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a table: its rows [row0, row0 + rows), columns [col0, col0 + cols) and owner rank."""

    table: str
    row0: int
    col0: int
    rows: int
    cols: int
    rank: int


@dataclass
class TokenScores:
    """This rank's saliency accumulators, one per shard it owns, plus every table's global layout."""

    tables: List[EmbeddingBagConfig]
    layout: List[ShardInfo]  # every shard of every table, the same order on every rank
    local: Dict[int, torch.Tensor]  # index into layout -> E * sum of dL/dE over the scored batches (a shard this rank owns)
    noise: Dict[int, torch.Tensor]  # same keys and shapes: sum over bag entries of (E * per-row gradient)^2
    batches: int
    seconds: float


def shard_layout(state: Dict[str, object], tables: Sequence[EmbeddingBagConfig], prefix: str) -> List[ShardInfo]:
    """Every table's shards from the DMP state dict (a replicated, data-parallel table counts as rank 0's)."""
    out = []
    for t in tables:
        w = state[table_key(prefix, t.name)]
        if isinstance(w, ShardedTensor):
            for m in sorted(w.metadata().shards_metadata, key=lambda m: (m.shard_offsets, m.placement.rank())):
                out.append(ShardInfo(t.name, m.shard_offsets[0], m.shard_offsets[1], m.shard_sizes[0], m.shard_sizes[1],
                                     m.placement.rank()))
        else:
            out.append(ShardInfo(t.name, 0, 0, t.num_embeddings, t.embedding_dim, 0))
    return out


def local_weights(state: Dict[str, object], layout: List[ShardInfo], prefix: str, rank: int) -> Dict[int, torch.Tensor]:
    """This rank's weight tensor of each shard it owns, keyed by the shard's index in `layout`."""
    out = {}
    for i, s in enumerate(layout):
        if s.rank != rank:
            continue
        w = state[table_key(prefix, s.table)]
        if isinstance(w, ShardedTensor):
            found = [ls.tensor for ls in w.local_shards() if list(ls.metadata.shard_offsets) == [s.row0, s.col0]]
            if len(found) != 1:
                raise RuntimeError(f"table {s.table}: no local shard at offsets {[s.row0, s.col0]} on rank {rank}")
            out[i] = found[0]
        else:
            out[i] = w
    return out


def _token_gradients(kjt: KeyedJaggedTensor, grads: Dict[str, torch.Tensor], tables: Sequence[EmbeddingBagConfig]
                     ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per table: (unique token ids, dL/dE of each, sum of squared per-entry gradients) of this rank's batch.

    The third term sums g^2 over the bag entries holding the token (one per row for single-valued fields).

    Vectorised over tables of one width: every id gets a global row number (its table's offset plus
    the id), so one `unique` and one `index_add_` serve all those tables (not one pair per table).
    """
    jts = kjt.to_dict()
    table_of = {f: t for t in tables for f in t.feature_names}
    out: Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    for dim in sorted({t.embedding_dim for t in tables}):
        group = [t for t in tables if t.embedding_dim == dim]
        starts = torch.tensor([0] + [t.num_embeddings for t in group]).cumsum(0).tolist()  # len(group) + 1
        offset = dict(zip((t.name for t in group), starts))
        ids, rows = [], []
        for f, jt in jts.items():
            t = table_of.get(f)
            if t is None or t.embedding_dim != dim or f not in grads:
                continue
            bag = torch.repeat_interleave(torch.arange(jt.lengths().numel(), device=jt.values().device), jt.lengths().long())
            g = grads[f][bag]
            if t.pooling == PoolingType.MEAN:  # a mean bag hands each of its ids 1 / length of its gradient
                g = g / jt.lengths()[bag].unsqueeze(1).to(g.dtype)
            w = jt.weights_or_none()
            rows.append(g * w.unsqueeze(1) if w is not None else g)
            ids.append(jt.values().long() + offset[t.name])
        if not ids:
            continue
        u, inv = torch.unique(torch.cat(ids), return_inverse=True)
        rows_t = torch.cat(rows)
        total = torch.zeros(len(u), dim, device=u.device).index_add_(0, inv, rows_t)
        squares = torch.zeros(len(u), dim, device=u.device).index_add_(0, inv, rows_t * rows_t)
        bounds = torch.searchsorted(u, torch.tensor(starts, device=u.device)).tolist()
        for i, t in enumerate(group):
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                out[t.name] = (u[lo:hi] - offset[t.name], total[lo:hi], squares[lo:hi])
    return out


def _exchange(pieces: List[Tuple[torch.Tensor, torch.Tensor]], layout: List[ShardInfo], rank: int,
              world: int, blocks: int = 1) -> Dict[int, Tuple[torch.Tensor, torch.Tensor]]:
    """Sends piece s (local row ids, `blocks` x the shard's columns per row) to shard s's owner; returns what this rank owns."""
    dev = pieces[0][0].device
    counts = torch.tensor([len(p[0]) for p in pieces], dtype=torch.long, device=dev)
    if world == 1:
        return {i: p for i, p in enumerate(pieces)}
    every = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(every, counts)
    owner = [s.rank for s in layout]
    mine = [i for i, s in enumerate(layout) if s.rank == rank]
    send_ids = [torch.cat([pieces[i][0] for i in range(len(layout)) if owner[i] == d] or [counts[:0]]) for d in range(world)]
    send_g = [torch.cat([pieces[i][1].reshape(-1) for i in range(len(layout)) if owner[i] == d]
                        or [torch.zeros(0, device=dev)]) for d in range(world)]
    recv_n = [sum(int(every[r][i]) for i in mine) for r in range(world)]
    recv_e = [sum(int(every[r][i]) * layout[i].cols * blocks for i in mine) for r in range(world)]
    ids = torch.empty(sum(recv_n), dtype=torch.long, device=dev)
    g = torch.empty(sum(recv_e), device=dev)
    dist.all_to_all_single(ids, torch.cat(send_ids), recv_n, [len(x) for x in send_ids])
    dist.all_to_all_single(g, torch.cat(send_g), recv_e, [len(x) for x in send_g])
    parts: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in mine}
    pos_n = pos_e = 0
    for r in range(world):
        for i in mine:
            n = int(every[r][i])
            w = layout[i].cols * blocks
            parts[i].append((ids[pos_n:pos_n + n], g[pos_e:pos_e + n * w].view(n, w)))
            pos_n += n
            pos_e += n * w
    return {i: (torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps])) for i, ps in parts.items()}


@torch.no_grad()
def calibrate_output_bias(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Sets the logit layer's bias so that the mean logit is the click rate's over `batches` (all ranks alike).

    At initialisation the prediction is off the click rate by the same amount for every row, which
    gives every token, informative or not, a gradient in proportion to its count; with the bias
    calibrated on the whole scored window, a token's gradient measures how its rows' labels depart
    from the rest (a first batch alone is off the window's rate on time-ordered data).
    """
    last = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == 1]
    if not last or last[-1].bias is None:
        raise ValueError("PME bias calibration: the model has no logit layer (a Linear with one output and a bias)")
    stats = torch.zeros(3)
    for batch in batches:
        _, (_, logits, labels) = model(batch)
        stats += torch.stack([logits.float().sum(), labels.float().sum(), torch.tensor(float(labels.numel()))]).cpu()
    if dist.is_initialized():
        dist.all_reduce(stats)
    mean_logit, ctr = float(stats[0] / stats[2]), float(stats[1] / stats[2])
    ctr = min(max(ctr, 1e-4), 1 - 1e-4)
    shift = math.log(ctr / (1 - ctr)) - mean_logit
    last[-1].bias.add_(shift)
    return shift


def score_tokens(
    dmp: nn.Module,
    tables: List[EmbeddingBagConfig],
    batches: Iterable[Batch],
    num_batches: int,
    device: torch.device,
    progress: bool = True,
    calibrate: bool = True,
) -> TokenScores:
    """Accumulates the entry saliencies E * dL/dE over `batches` and their noise, for the EBC inside `dmp`.

    The model's sparse arch is wrapped in a PooledCapture. With `calibrate`, the output bias is first
    set to the click rate of the scored batches (read once before).
    """
    capture = PooledCapture.find(dmp, "PME scoring")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    state = dmp.state_dict()
    prefix = table_prefix(state, tables[0].name)
    layout = shard_layout(state, tables, prefix)
    weights = local_weights(state, layout, prefix, rank)
    acc = {i: torch.zeros(w.shape, device=w.device) for i, w in weights.items()}
    noise = {i: torch.zeros(w.shape, device=w.device) for i, w in weights.items()}
    t0 = time.perf_counter()
    bar = tqdm(total=num_batches, desc="pme score", unit="batch", disable=not (progress and rank == 0), dynamic_ncols=True)
    model = unwrap(dmp)  # DDP would wait for parameter gradients that scoring never computes
    batches = [b.to(device) for b in itertools.islice(batches, num_batches)]
    if calibrate and batches:
        calibrate_output_bias(model, batches)
    for batch in batches:
        loss, _ = model(batch)
        pooled = capture.last
        (g,) = torch.autograd.grad(loss, pooled.values())
        grads = dict(zip(pooled.keys(), torch.split(g, pooled.length_per_key(), dim=1)))
        per_table = _token_gradients(batch.sparse_features, grads, tables)
        pieces = []
        for s in layout:
            empty = torch.zeros(0, s.cols + s.col0, device=device)
            u, gu, sq = per_table.get(s.table, (torch.zeros(0, dtype=torch.long, device=device), empty, empty))
            sel = (u >= s.row0) & (u < s.row0 + s.rows)
            cols = slice(s.col0, s.col0 + s.cols)
            pieces.append((u[sel] - s.row0, torch.cat([gu[sel, cols], sq[sel, cols]], dim=1)))
        for i, (ids, both) in _exchange(pieces, layout, rank, world, blocks=2).items():
            if len(ids):  # sums over batches: ids repeated across ranks just add up (the loss is the ranks' mean)
                acc[i].index_add_(0, ids, both[:, :layout[i].cols], alpha=1 / world)
                noise[i].index_add_(0, ids, both[:, layout[i].cols:], alpha=1 / world ** 2)
        capture.last = None
        bar.update(1)
    bar.close()
    for i, w in weights.items():
        e = w.detach().to(noise[i].dtype)
        acc[i].mul_(e)
        noise[i].mul_(e * e)
    return TokenScores(tables, layout, acc, noise, len(batches), time.perf_counter() - t0)
