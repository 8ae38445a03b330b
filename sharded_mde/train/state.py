"""What the keys of a model's state dict mean: embedding tables, the HAM mask, dense tensors.

The one place that parses `<prefix>embedding_bags.<table>.weight` (a table of an
EmbeddingBagCollection, sharded or not) and the keys of MaskedEmbeddingBagCollection's `gate.`
child (the mask and its statistics). Checkpoint readers, the export, warm starts and scorers ask
these functions instead of matching keys themselves.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import torch
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingBagConfig

from sharded_mde.modules.masked_ebc import ColumnGate

_TABLE = re.compile(r"^(?P<prefix>(?:.*\.)?)embedding_bags\.(?P<table>[^.]+)\.weight$")
SPARSE_ARCH = "sparse_arch."  # RecTrain's model child holding the embedding tables (plain, masked or token groups)
GATE = "gate."  # MaskedEmbeddingBagCollection's child holding the mask (and its statistics)


def table_of(key: str) -> Optional[str]:
    """The table name of a `...embedding_bags.<table>.weight` key; None for any other key."""
    m = _TABLE.match(key)
    return m.group("table") if m else None


def table_key(prefix: str, table: str) -> str:
    """The state key of `table`'s weight under `prefix` (the EBC's own prefix, ending in a dot or empty)."""
    return f"{prefix}embedding_bags.{table}.weight"


def table_prefix(keys: Iterable[str], table: str) -> str:
    """The prefix of `table`'s weight key among `keys` (the path of the EBC holding it)."""
    for key in keys:
        m = _TABLE.match(key)
        if m and m.group("table") == table:
            return m.group("prefix")
    raise ValueError(f"the state holds no weight of table {table} (no '...embedding_bags.{table}.weight')")


def sparse_arch_prefix(keys: Iterable[str]) -> str:
    """The key prefix of the model's sparse arch (e.g. `model.sparse_arch.`), from its first table."""
    for key in keys:
        m = _TABLE.match(key)
        if m and f".{SPARSE_ARCH}" in f".{m.group('prefix')}":
            prefix = m.group("prefix")
            return prefix[: prefix.rindex(SPARSE_ARCH) + len(SPARSE_ARCH)]
    raise ValueError("the checkpoint holds no embedding tables (no '...sparse_arch...embedding_bags.<table>.weight')")


def gate_state(state: Mapping[str, Any]) -> Dict[str, Any]:
    """The entries of the HAM gate in `state`, keyed relative to the gate (`mask`, `momentum`, ...)."""
    return {f".{key}".split(f".{GATE}", 1)[1]: value for key, value in state.items() if is_gate_key(key)}


def is_gate_key(key: str) -> bool:
    """Whether `key` is an entry of a HAM gate (its mask or statistics)."""
    return f".{GATE}" in f".{key}"


def hard_gates(state: Mapping[str, Any], tables: Sequence[EmbeddingBagConfig]) -> Optional[Dict[str, torch.Tensor]]:
    """The HAM supernet's 0/1 column mask per table from a saved state (None: no mask saved)."""
    saved = gate_state(state)
    if not saved:
        return None
    gate = ColumnGate(tables)
    try:
        gate.load_state_dict(saved)
    except RuntimeError as e:
        raise ValueError(f"the checkpoint's column mask does not fit the config's tables "
                         f"({str(e).splitlines()[-1].strip()})") from None
    return {name: (a > 0).float() for name, a in gate.table_values().items()}


def copy_full_into(live: Dict[str, Any], full: Mapping[str, torch.Tensor]) -> None:
    """Copies unsharded tensors `full[k]` into the live (possibly sharded) state dict, slice by slice.

    Used to warm-start a sharded model from gathered weights and to start sharded tests from the
    same weights as their unsharded reference.
    """
    for k, t in live.items():
        if k not in full:
            raise ValueError(f"state entry {k}: no source tensor")
        src = full[k]
        if isinstance(t, ShardedTensor):
            for s in t.local_shards():
                o, z = s.metadata.shard_offsets, s.tensor.shape
                s.tensor.detach().copy_(src[o[0]:o[0] + z[0], o[1]:o[1] + z[1]])
        elif isinstance(t, torch.Tensor):
            t.detach().copy_(src)
