"""PME token groups: one field's tokens split into tables of different sizes, pooled back to one output.

A field (feature) whose tokens were given different sizes by the PME search holds one TorchRec
table per (field, size) group. The vocabulary is renumbered group by group (largest size first),
so a token id says by itself which group it belongs to: after the reserved ids (0 missing, 1
out-of-vocabulary, which keep their ids and are placed by a two-entry table per field), the next
ids fill group 0, then group 1, ...; ids past the last group are tokens of size 0 (pruned: they
contribute zero). In each group's table the reserved tokens it holds come first. `TokenGroupEBC` routes each field's ids to its group features in the KJT, runs one plain
`EmbeddingBagCollection` (sharded by TorchRec's stock sharders under DMP), and sums the groups'
pooled outputs after a per-group projection (or zero padding) back to one output per field: KJT of
fields in, KeyedTensor of fields out, like an EBC, so it feeds the same heads as HAM. Group tables
always sum their part of a bag; a mean-pooled field's sum over its groups is divided by the length
of its whole bag (tokens of size 0 count too, as in the full table's mean), never per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from sharded_mde.dims import DimsFile, group_name
from sharded_mde.plan.tables import plan_tables

COMBINE_MODES = ("project", "pad")


@dataclass(frozen=True)
class FieldGroups:
    """One feature's token groups: (size, rows) by descending size (sizes > 0), its vocabulary and output dim.

    `reserved[k]` is the group holding reserved id k (-1: size 0); () when the ids have no reserved prefix.
    `pooling` is the field's bag pooling, "sum" or "mean".
    """

    feature: str
    num_embeddings: int
    out_dim: int
    groups: Tuple[Tuple[int, int], ...]
    reserved: Tuple[int, ...] = ()
    pooling: str = "sum"

    def __post_init__(self) -> None:
        if self.pooling not in ("sum", "mean"):
            raise ValueError(f"feature {self.feature}: pooling must be sum or mean, got {self.pooling!r}")
        sizes = [s for s, _ in self.groups]
        if not sizes or any(s <= 0 for s in sizes) or sizes != sorted(set(sizes), reverse=True):
            raise ValueError(f"feature {self.feature}: group sizes must be positive and strictly decreasing, got {sizes}")
        if any(not -1 <= g < len(sizes) for g in self.reserved):
            raise ValueError(f"feature {self.feature}: reserved ids name groups {list(self.reserved)} of {len(sizes)}")
        regular = [r - self.reserved.count(g) for g, (_, r) in enumerate(self.groups)]
        if any(r < 0 for r in regular) or sum(r for _, r in self.groups) <= 0 or \
                len(self.reserved) + sum(regular) > self.num_embeddings:
            raise ValueError(f"feature {self.feature}: group rows {[r for _, r in self.groups]} do not fit the "
                             f"vocabulary of {self.num_embeddings} with reserved ids in groups {list(self.reserved)}")
        if self.out_dim < sizes[0]:
            raise ValueError(f"feature {self.feature}: out_dim {self.out_dim} is below its largest group size {sizes[0]}")

    def keys(self) -> List[str]:
        """The group features of this field, in group order: `<feature>_s<size>`."""
        return [group_name(self.feature, s) for s, _ in self.groups]

    def id_ranges(self) -> List[Tuple[int, int, int, int]]:
        """(first id, end id, group, row of the first id) for every id that has a row, in id order.

        Ids of one group whose rows follow each other share one range (the reserved ids usually head their
        group's rows, so a one-group field routes with one range); ids in no range have size 0 and read nothing.
        """
        out = [(k, k + 1, g, self.reserved[:k].count(g)) for k, g in enumerate(self.reserved) if g >= 0]
        start = len(self.reserved)
        for g, (_, rows) in enumerate(self.groups):
            n_res = self.reserved.count(g)
            if rows > n_res:
                out.append((start, start + rows - n_res, g, n_res))
                start += rows - n_res
        return merge_runs(out)


R = TypeVar("R")


def merge_runs(ranges: Sequence[Tuple[int, int, R, int]]) -> List[Tuple[int, int, R, int]]:
    """(first id, end id, key, first row) ranges in id order, a range merged into the one before it when both have
    the same key and its ids and rows continue that one's."""
    out: List[Tuple[int, int, R, int]] = []
    for lo, hi, key, row in ranges:
        if out and out[-1][1] == lo and out[-1][2] == key and out[-1][3] + (lo - out[-1][0]) == row:
            out[-1] = (out[-1][0], hi, key, out[-1][3])
        else:
            out.append((lo, hi, key, row))
    return out


def fields_from_dims(dims: DimsFile, full_tables: Sequence[EmbeddingBagConfig]) -> List[FieldGroups]:
    """The token groups of every PME table of a dims file that kept any token (out dim = largest size).

    The size of each reserved id is read from `pme.reserved_sizes[table]` (absent: no reserved ids),
    each field's pooling from its full table in `full_tables`.
    """
    reserved_sizes = dims.pme.reserved_sizes if dims.pme else {}
    pooling = {t.name: t.pooling.value.lower() for t in full_tables}
    out = []
    for t in dims.tables:
        if not t.groups:
            raise ValueError(f"dims file table {t.name}: has no token groups (not a PME result)")
        groups = tuple((g.size, g.rows) for g in sorted(t.groups, key=lambda g: -g.size) if g.size and g.rows)
        if groups:
            index = {size: i for i, (size, _) in enumerate(groups)}
            reserved = tuple(index.get(s, -1) for s in reserved_sizes.get(t.name, []))
            if t.name not in pooling:
                raise ValueError(f"dims file table {t.name}: not a table of the model")
            out.extend(FieldGroups(f, t.num_embeddings, groups[0][0], groups, reserved, pooling[t.name])
                       for f in t.features)
    return out


def combine_of(dims: DimsFile, default: str = "project") -> str:
    """The combine mode a PME dims file's bytes were counted for (its `pme.combine`), else `default`."""
    return dims.pme.combine if dims.pme and dims.pme.combine else default


def router_bytes(field: FieldGroups) -> int:
    """Bytes of a field's routing table (the id ranges: start, end, group, first row as int64)."""
    return 4 * 8 * len(field.id_ranges())


class TokenGroupRouter(nn.Module):
    """Rewrites a KJT of fields into a KJT of token-group features, ids made local to their group.

    Fields without groups and ids of size-0 tokens are dropped; bag order and bag count are kept.
    """

    def __init__(self, fields: Sequence[FieldGroups]) -> None:
        super().__init__()
        self.out_keys: List[str] = [k for f in fields for k in f.keys()]
        self._feature_index: Dict[str, int] = {f.feature: i for i, f in enumerate(fields)}
        self._vocab: List[int] = [f.num_embeddings for f in fields]
        self._bases: List[int] = [sum(self._vocab[:i]) for i in range(len(fields))]
        starts, ends, group_of, first_row = [], [], [], []
        group_base = 0
        for f, base in zip(fields, self._bases):  # one global id space: field bases, then id ranges inside a field
            for lo, hi, g, row in f.id_ranges():
                starts.append(base + lo)
                ends.append(base + hi)
                group_of.append(group_base + g)
                first_row.append(row)
            group_base += len(f.groups)
        self.register_buffer("range_start", torch.tensor(starts, dtype=torch.long), persistent=False)
        self.register_buffer("range_end", torch.tensor(ends, dtype=torch.long), persistent=False)
        self.register_buffer("range_group", torch.tensor(group_of, dtype=torch.long), persistent=False)
        self.register_buffer("range_row", torch.tensor(first_row, dtype=torch.long), persistent=False)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        keys = features.keys()
        batch = features.stride()
        values, lengths = features.values(), features.lengths()
        weights = features.weights_or_none()
        dev = values.device
        index = [self._feature_index.get(k, -1) for k in keys]
        base = torch.tensor([self._bases[i] if i >= 0 else -1 for i in index], dtype=torch.long, device=dev)
        vocab = torch.tensor([self._vocab[i] if i >= 0 else 0 for i in index], dtype=torch.long, device=dev)
        bag = torch.repeat_interleave(torch.arange(len(keys) * batch, device=dev), lengths.long())
        key_of = bag // batch
        routed = base[key_of] >= 0
        bad = routed & ((values < 0) | (values >= vocab[key_of]))
        if bool(bad.any()):
            k = keys[int(key_of[bad.nonzero()[0, 0]])]
            raise ValueError(f"token groups: feature {k} has id {int(values[bad][0])} outside its vocabulary "
                             f"[0, {self._vocab[self._feature_index[k]]})")
        gid = values.long() + base[key_of]
        rng = torch.bucketize(gid, self.range_end, right=True).clamp(max=len(self.range_end) - 1)
        covered = routed & (gid >= self.range_start[rng]) & (gid < self.range_end[rng])  # else size 0
        group = torch.where(covered, self.range_group[rng], -1)
        keep = group >= 0
        order_key = group[keep] * batch + bag[keep] % batch
        order = torch.argsort(order_key, stable=True)
        new_values = (gid - self.range_start[rng] + self.range_row[rng])[keep][order]
        new_lengths = torch.bincount(order_key, minlength=len(self.out_keys) * batch).to(lengths.dtype)
        return KeyedJaggedTensor(
            keys=self.out_keys,
            values=new_values.to(values.dtype),
            lengths=new_lengths,
            weights=weights[keep][order] if weights is not None else None,
            stride=batch,
        )


class GroupCombiner(nn.Module):
    """Sums each field's group outputs after a per-group projection (size < out_dim) or zero padding.

    A mean-pooled field's sum is divided by its whole bag's length, read from the KJT of fields (an
    empty bag stays zero, as TorchRec's mean of an empty bag). Scriptable (the export serves it under
    TorchScript): projections are applied by iterating the ModuleList, which TorchScript unrolls,
    never by a variable index.
    """

    def __init__(self, fields: Sequence[FieldGroups], combine: str = "project") -> None:
        super().__init__()
        if combine not in COMBINE_MODES:
            raise ValueError(f"token groups: combine must be one of {COMBINE_MODES}, got {combine!r}")
        self.combine = combine
        self.features: List[str] = [f.feature for f in fields]
        self.out_dims: List[int] = [f.out_dim for f in fields]
        self.mean: List[bool] = [f.pooling == "mean" for f in fields]
        self.plan: List[List[Tuple[str, int, int]]] = []  # per field: (group key, size, projection index or -1)
        self.projected_keys: List[str] = []  # the group key each projection reads
        projections = []
        for f in fields:
            entries = []
            for key, (size, _) in zip(f.keys(), f.groups):
                p = -1
                if combine == "project" and size < f.out_dim:
                    p = len(projections)
                    projections.append(nn.Linear(size, f.out_dim, bias=False))
                    self.projected_keys.append(key)
                entries.append((key, size, p))
            self.plan.append(entries)
        self.projections = nn.ModuleList(projections)

    def forward(self, pooled: KeyedTensor, features: KeyedJaggedTensor) -> KeyedTensor:
        """The fields' outputs from the groups' pooled sums; `features` (the fields' KJT) gives the bag lengths."""
        groups = pooled.to_dict()
        projected: Dict[str, torch.Tensor] = {}
        for i, projection in enumerate(self.projections):
            key = self.projected_keys[i]
            projected[key] = projection(groups[key])
        keys = features.keys()
        outs: List[torch.Tensor] = []
        for entries, out_dim, feature, mean in zip(self.plan, self.out_dims, self.features, self.mean):
            parts: List[torch.Tensor] = []
            for key, size, p in entries:
                x = projected[key] if p >= 0 else groups[key]
                if p < 0 and size < out_dim:
                    x = F.pad(x, [0, out_dim - size])
                parts.append(x)
            acc = parts[0]
            for x in parts[1:]:
                acc = acc + x
            if mean and feature in keys:  # a field absent from the KJT has only empty bags: zeros either way
                lengths = features.lengths().view(len(keys), -1)[keys.index(feature)]
                acc = acc / lengths.clamp(min=1).unsqueeze(1).to(acc.dtype)
            outs.append(acc)
        return KeyedTensor.from_tensor_list(self.features, outs)


class TokenGroupEBC(nn.Module):
    """KJT of fields -> KeyedTensor of fields, each field's tokens held in size groups of one plain EBC.

    Args:
        fields (Sequence[FieldGroups]): per field, its token groups (`fields_from_dims`).
        tables (List[EmbeddingBagConfig]): the group tables (`plan_tables` of a PME dims file).
        combine (str): how a field's groups make one embedding ("project" or "pad").
        device (Optional[torch.device]): where the EBC is built.
        ebc (Optional[nn.Module]): an already filled module over `tables`.

    Example::

        sparse = build_token_group_ebc(pme_dims, tables)  # a TokenGroupEBC
        kt = sparse(features)  # one pooled embedding per field
    """

    def __init__(self, fields: Sequence[FieldGroups], tables: List[EmbeddingBagConfig], combine: str = "project",
                 device: Optional[torch.device] = None, ebc: Optional[nn.Module] = None) -> None:
        """`ebc`: an already filled module over `tables` (the export's float or quantised EBC); default a new EBC."""
        super().__init__()
        have = {f for t in tables for f in t.feature_names}
        need = [k for f in fields for k in f.keys()]
        if set(need) != have:
            missing = sorted(set(need) ^ have)
            raise ValueError(f"token groups: tables and groups disagree on features (first: {missing[0]})")
        not_sum = [t.name for t in tables if t.pooling != PoolingType.SUM]
        if not_sum:
            raise ValueError(f"token groups: table {not_sum[0]} must sum-pool (a field's mean is taken over its whole "
                             "bag, not per group)")
        self.fields: List[FieldGroups] = list(fields)
        self.router = TokenGroupRouter(fields)
        self.ebc = ebc if ebc is not None else EmbeddingBagCollection(tables=tables, device=device)
        self.combiner = GroupCombiner(fields, combine)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.combiner(self.ebc(self.router(features)), features)


def build_token_group_ebc(dims: DimsFile, full_tables: List[EmbeddingBagConfig], combine: str = "project",
                          device: Optional[torch.device] = None) -> TokenGroupEBC:
    """The token-group module of a PME dims file: `plan_tables` group tables + router + combiner.

    Args:
        dims (DimsFile): a PME dims file.
        full_tables (List[EmbeddingBagConfig]): the full tables it was searched on.
        combine (str): "project" or "pad".
        device (Optional[torch.device]): where the EBC is built.

    Example::

        sparse = build_token_group_ebc(load_dims("runs/demo/pme/dims.json", tables), tables)
    """
    return TokenGroupEBC(fields_from_dims(dims, full_tables), plan_tables(dims, full_tables), combine, device)
