"""Test helper: a DCP checkpoint whose tables are saved as chosen pieces (uneven row and column shards)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
import torch.distributed as dist
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

from sharded_mde.train.checkpoint import MODEL, save_checkpoint

Pieces = Sequence[Tuple[Sequence[int], torch.Tensor]]  # (global offsets, tensor) of each piece


def write_pieces(root: Path, step: int, state: Mapping[str, torch.Tensor], pieces: Dict[str, Pieces]) -> Path:
    """Saves `state` as a model checkpoint in which each key of `pieces` is stored as exactly those shards.

    Written by this one process (a one-rank gloo group over an in-memory store, set up here when
    none is), so a test needs no ranks to make a checkpoint with any shard layout.
    """
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model: Dict[str, object] = dict(state)
        for key, parts in pieces.items():
            shards: List[Shard] = [Shard(t.contiguous().clone(), ShardMetadata(list(o), list(t.shape), "rank:0/cpu"))
                                   for o, t in parts]
            model[key] = init_from_local_shards(shards, *state[key].shape)
        return save_checkpoint(root, step, {MODEL: model}, {})
    finally:
        if own:
            dist.destroy_process_group()


def cut(value: torch.Tensor, how: str, at: List[int]) -> List[Tuple[List[int], torch.Tensor]]:
    """`value` cut at rows ("rw") or columns ("cw") `at` into (offsets, piece) pairs."""
    bounds = [0] + at + [value.shape[0 if how == "rw" else 1]]
    return [([lo, 0], value[lo:hi]) if how == "rw" else ([0, lo], value[:, lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
