"""TokenGroupEBC equals a per-token reference (each token looked up at its own size, projected, pooled).

Checked unsharded and on 2 real gloo ranks under table-wise and row-wise plans, forward and one
optimizer step (fused SGD on the group tables, SGD on the projections).
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from dist_utils import run_ranks, shard_with_reference
from sharded_mde.config import TrainConfig
from sharded_mde.modules.token_groups import (FieldGroups, TokenGroupEBC, build_token_group_ebc, fields_from_dims,
                                              router_bytes)
from sharded_mde.dims import DimsFile, PmeRecord, TableDims, TokenGroup, group_name, table_bytes
from sharded_mde.train.sharding import make_optimizer

# field C3 keeps no token (dropped); C2 has size-0 tokens past its groups; C4 is not in the module at all;
# C1's reserved ids 0 and 1 sit in its size-4 and size-16 groups, C2's id 0 is a size-0 token
FIELDS = [
    FieldGroups("C1", 50, 16, ((16, 10), (8, 15), (4, 25)), reserved=(2, 0)),
    FieldGroups("C2", 40, 12, ((12, 5), (4, 20)), reserved=(-1, 1)),
    FieldGroups("C5", 30, 8, ((8, 30),)),
]
KEYS = ["C1", "C2", "C4", "C5"]
VOCAB = {"C1": 50, "C2": 40, "C4": 9, "C5": 30}
B = 6


def _tables(fields: List[FieldGroups]) -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t_{group_name(f.feature, s)}", num_embeddings=r, embedding_dim=s,
                               feature_names=[group_name(f.feature, s)]) for f in fields for s, r in f.groups]


def _kjt(seed: int) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(KEYS) * B,), generator=g)
    values = torch.cat([torch.randint(0, VOCAB[k], (int(lengths[i * B:(i + 1) * B].sum()),), generator=g)
                        for i, k in enumerate(KEYS)])
    return KeyedJaggedTensor.from_lengths_sync(keys=KEYS, values=values, lengths=lengths)


def reference(module: TokenGroupEBC, weights: Dict[str, torch.Tensor], kjt: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
    """Per token: find its group and row, look it up at its own size, project (or pad), then sum-pool the bag."""
    proj = {key: (module.combiner.projections[p].weight if p >= 0 else None)
            for entries in module.combiner.plan for key, _, p in entries}
    jts = kjt.to_dict()
    out = {}
    for f in module.fields:
        jt = jts[f.feature]
        # where each id lives, spelled out token by token: reserved ids first, then each group's regular ids
        place = {k: (g, f.reserved[:k].count(g)) for k, g in enumerate(f.reserved)}
        tok = len(f.reserved)
        for g, (_, rows) in enumerate(f.groups):
            for row in range(f.reserved.count(g), rows):
                place[tok] = (g, row)
                tok += 1
        bags = []
        for b in range(kjt.stride()):
            acc = torch.zeros(f.out_dim)
            for tok in jt.values()[jt.offsets()[b]:jt.offsets()[b + 1]].tolist():
                g, row = place.get(tok, (-1, 0))
                if g < 0:
                    continue
                key, size = f.keys()[g], f.groups[g][0]
                e = weights[f"ebc.embedding_bags.t_{key}.weight"][row]
                acc = acc + (proj[key] @ e if proj[key] is not None else torch.cat([e, e.new_zeros(f.out_dim - size)]))
            bags.append(acc)
        out[f.feature] = torch.stack(bags)
    return out


@pytest.mark.parametrize("combine", ["project", "pad"])
def test_unsharded_matches_per_token_reference(combine: str) -> None:
    torch.manual_seed(0)
    m = TokenGroupEBC(FIELDS, _tables(FIELDS), combine)
    for seed in range(3):
        kjt = _kjt(seed)
        got = m(kjt).to_dict()
        ref = reference(m, m.state_dict(), kjt)
        assert sorted(got) == ["C1", "C2", "C5"]
        for f in ref:
            torch.testing.assert_close(got[f], ref[f], rtol=1e-5, atol=1e-6)
    assert all(float(got[f].detach().abs().sum()) > 0 for f in got)


def test_projection_count_and_router_drops_pruned_tokens() -> None:
    m = TokenGroupEBC(FIELDS, _tables(FIELDS), "project")
    # the largest group of a field is already out_dim wide: no projection for it
    assert len(m.combiner.projections) == 3
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["C2", "C4"], values=torch.tensor([6, 7, 1, 0, 25, 26, 3]),
                                              lengths=torch.tensor([2, 4, 1, 0]))
    routed = m.router(kjt).to_dict()
    # C2: id 0 is a size-0 reserved token, id 1 is row 0 of the size-4 group, ids 2..6 the size-12 group,
    # ids 7..25 rows 1..19 of the size-4 group, ids 26.. size-0 tokens
    assert routed["C2_s12"].values().tolist() == [4] and routed["C2_s12"].lengths().tolist() == [1, 0]
    assert routed["C2_s4"].values().tolist() == [1, 0, 19] and routed["C2_s4"].lengths().tolist() == [1, 2]
    assert routed["C1_s16"].lengths().tolist() == [0, 0]  # fields absent from the batch give empty bags
    with pytest.raises(ValueError, match="feature C2 has id 40 outside"):
        m.router(KeyedJaggedTensor.from_lengths_sync(keys=["C2"], values=torch.tensor([40]), lengths=torch.tensor([1])))


def test_id_ranges_merge_runs_of_rows_and_leave_pruned_ids_out() -> None:
    """A routing range per run of ids whose rows follow in one group: size-0 ids get none (they read nothing),
    and reserved ids that head their group's rows share the group's range (32 B each, counted in the budget)."""
    c2 = FIELDS[1]  # id 0 size 0; id 1 row 0 of the size-4 group, then ids 2..6 size 12, ids 7..25 size 4
    assert c2.id_ranges() == [(1, 2, 1, 0), (2, 7, 0, 0), (7, 26, 1, 1)]
    assert FIELDS[2].id_ranges() == [(0, 30, 0, 0)]
    one = FieldGroups("U", 100, 4, ((4, 42),), reserved=(-1, 0))  # missing id pruned, OOV row and 41 tokens at 4
    assert one.id_ranges() == [(1, 43, 0, 0)] and router_bytes(one) == 32
    both = FieldGroups("V", 10, 8, ((8, 4), (4, 3)), reserved=(0, 0))
    assert both.id_ranges() == [(0, 4, 0, 0), (4, 7, 1, 0)]


def test_from_dims_file_uses_plan_tables() -> None:
    groups = [TokenGroup(8, 3, table_bytes(3, 8).total), TokenGroup(0, 4, 0), TokenGroup(4, 5, table_bytes(5, 4).total)]
    full = [EmbeddingBagConfig(name="t_C1", num_embeddings=12, embedding_dim=16, feature_names=["C1"]),
            EmbeddingBagConfig(name="t_C2", num_embeddings=7, embedding_dim=16, feature_names=["C2"])]
    tables = [TableDims("t_C1", ["C1"], 12, 16, 8, [], sum(g.bytes for g in groups), groups),
              TableDims("t_C2", ["C2"], 7, 16, 0, [], 0, [TokenGroup(0, 7, 0)])]
    dims = DimsFile("pme", 0.5, 1, sum(table_bytes(t.num_embeddings, 16).total for t in full),
                    tables[0].bytes, tables, pme=PmeRecord(reserved_sizes={"t_C1": [4, 8]}))
    assert fields_from_dims(dims, full) == [FieldGroups("C1", 12, 8, ((8, 3), (4, 5)), reserved=(1, 0))]
    m = build_token_group_ebc(dims, full, "pad")
    assert [c.name for c in m.ebc.embedding_bag_configs()] == ["t_C1_s8", "t_C1_s4"]
    # C1: id 1 -> row 0 of the size-8 group, ids 2, 3 -> rows 1, 2; id 0 -> row 0 of size 4; ids 4..7 -> rows 1..4; 8.. size 0
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["C1", "C2"], values=torch.tensor([9, 3, 0, 1]),
                                              lengths=torch.tensor([1, 1, 1, 1, 0, 0]))
    out = m(kjt).to_dict()
    assert list(out) == ["C1"] and out["C1"].shape == (3, 8)
    assert float(out["C1"][0].detach().abs().sum()) == 0  # id 9 is a size-0 token
    torch.testing.assert_close(out["C1"][1], m.ebc.embedding_bags["t_C1_s8"].weight[2])
    torch.testing.assert_close(out["C1"][2], torch.cat([m.ebc.embedding_bags["t_C1_s4"].weight[0], torch.zeros(4)]))


def _dist_body(rank: int, world: int, kinds: tuple) -> None:
    for kind in kinds:
        _check_sharded(rank, world, kind, "project")


def _check_sharded(rank: int, world: int, kind: str, combine: str) -> None:
    torch.manual_seed(0)
    tables = _tables(FIELDS)
    cfg = TrainConfig(embedding_optimizer="sgd", embedding_lr=0.5, dense_optimizer="sgd", dense_lr=0.5)
    dmp, ref = shard_with_reference(TokenGroupEBC(FIELDS, tables, combine), tables, kind, world, cfg)
    opt = make_optimizer(dmp, cfg)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(2):
        kjts = [_kjt(100 * step + r) for r in range(world)]
        out = dmp(kjts[rank]).to_dict()
        want = reference(ref, ref.state_dict(), kjts[rank])
        for f in want:
            torch.testing.assert_close(out[f], want[f], rtol=1e-5, atol=1e-6)
        loss = sum((out[f] ** 2).sum() for f in out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_loss = sum(sum((o ** 2).sum() for o in ref(k).to_dict().values()) for k in kjts) / world
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
    # after the updates: every id of every field in a bag of its own, on every rank (each updated row read alone)
    n = max(VOCAB.values())
    every = KeyedJaggedTensor.from_lengths_sync(
        keys=KEYS, values=torch.cat([torch.arange(VOCAB[k]) for k in KEYS]),
        lengths=torch.cat([(torch.arange(n) < VOCAB[k]).long() for k in KEYS]))
    out = dmp(every).to_dict()
    want = reference(ref, ref.state_dict(), every)
    for f in want:
        torch.testing.assert_close(out[f], want[f], rtol=1e-4, atol=1e-5)


def test_sharded_matches_per_token_reference_tw_rw() -> None:
    run_ranks(_dist_body, ("table_wise", "row_wise"))
