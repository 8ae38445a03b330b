"""Multi-hot (multi-valued) fields: sum and mean pooling of bags checked against per-row references.

The HAM supernet module (MaskedEmbeddingBagCollection) and the PME token-group module are compared
with bags pooled row by row in Python (bags of 0..6 ids, empty ones included), forward and the
tables' gradients; the pooling config reaches the table configs; the planner's pooling factor of a
table is the data's mean bag length.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from sharded_mde.config import ConfigError, ModelConfig, PlanConfig, from_dict
from sharded_mde.export.serve import LEAF_MODULES
from sharded_mde.modules.masked_ebc import MaskedEmbeddingBagCollection
from sharded_mde.modules.token_groups import FieldGroups, TokenGroupEBC
from sharded_mde.dims import group_name
from sharded_mde.plan.sharding import plan_sharding, planner_constraints
from sharded_mde.plan.tables import with_pooling

SPEC = [("A", 30, 8, "sum"), ("B", 25, 12, "mean"), ("C", 20, 4, "mean")]
B = 7


def multi_hot_kjt(vocab: Dict[str, int], batch: int, seed: int, max_bag: int = 6) -> KeyedJaggedTensor:
    """Bags of 0..max_bag ids per (key, row), key-major, with at least one empty and one long bag per key."""
    g = torch.Generator().manual_seed(seed)
    keys = list(vocab)
    lengths = torch.randint(0, max_bag + 1, (len(keys), batch), generator=g)
    lengths[:, 0], lengths[:, 1] = 0, max_bag
    values = torch.cat([torch.randint(0, vocab[k], (int(lengths[i].sum()),), generator=g) for i, k in enumerate(keys)])
    return KeyedJaggedTensor.from_lengths_sync(keys=keys, values=values, lengths=lengths.flatten())


def bags(kjt: KeyedJaggedTensor, key: str) -> List[List[int]]:
    """The ids of each bag of `key`, row by row."""
    jt = kjt[key]
    off = jt.offsets().tolist()
    return [jt.values()[off[b]:off[b + 1]].tolist() for b in range(len(off) - 1)]


def _tables() -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t_{f}", num_embeddings=r, embedding_dim=d, feature_names=[f],
                               pooling=PoolingType[p.upper()]) for f, r, d, p in SPEC]


def test_masked_ebc_pools_bags_like_a_per_row_sum_or_mean() -> None:
    torch.manual_seed(0)
    m = MaskedEmbeddingBagCollection(_tables())
    a = torch.randn(m.gate.mask.shape, generator=torch.Generator().manual_seed(3))
    m.gate.mask.copy_(a)  # about half the columns pruned
    mask = (a > 0).float()
    kjt = multi_hot_kjt({f: r for f, r, _, _ in SPEC}, B, seed=1)
    out = m(kjt).to_dict()
    loss = sum((o * torch.arange(1, o.shape[1] + 1)).sum() for o in out.values())
    loss.backward()
    col = 0
    for f, _, d, pooling in SPEC:
        w = m.ebc.embedding_bags[f"t_{f}"].weight
        want, grad = [], torch.zeros_like(w)
        for ids in bags(kjt, f):
            acc = sum((w[i].detach() for i in ids), torch.zeros(d))
            scale = 1 / max(len(ids), 1) if pooling == "mean" else 1.0
            want.append(acc * scale * mask[col:col + d])
            for i in ids:  # d/dw[i] of sum_j (j+1) * pooled_j
                grad[i] += scale * mask[col:col + d] * torch.arange(1, d + 1)
        torch.testing.assert_close(out[f].detach(), torch.stack(want), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w.grad, grad, rtol=1e-5, atol=1e-6)
        col += d
    assert bags(kjt, "B")[0] == [] and float(out["B"][0].detach().abs().sum()) == 0  # an empty bag pools to zeros
    assert len(bags(kjt, "B")[1]) == 6 and float(out["B"][1].detach().abs().sum()) > 0


# C1: reserved ids 0 and 1 in the size-4 and size-16 groups, ids from 2 + 8 + 14 + 24 = 48 on have size 0;
# C2: its id 0 has size 0 and ids 27.. too: size-0 ids still count in a mean's bag length
FIELDS = [
    FieldGroups("C1", 50, 16, ((16, 9), (8, 14), (4, 25)), reserved=(2, 0), pooling="mean"),
    FieldGroups("C2", 40, 12, ((12, 6), (4, 20)), reserved=(-1, 1), pooling="mean"),
    FieldGroups("C3", 30, 8, ((8, 12), (4, 18)), pooling="sum"),
]
VOCAB = {"C1": 50, "C2": 40, "C3": 30, "C4": 9}  # C4 has no groups: the module ignores it


def _group_tables(fields: List[FieldGroups]) -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t_{group_name(f.feature, s)}", num_embeddings=r, embedding_dim=s,
                               feature_names=[group_name(f.feature, s)]) for f in fields for s, r in f.groups]


def token_place(f: FieldGroups) -> Dict[int, tuple]:
    """(group, row) of every id that has a size, spelled out: reserved ids first, then each group's regular ids."""
    place = {k: (g, f.reserved[:k].count(g)) for k, g in enumerate(f.reserved) if g >= 0}
    tok = len(f.reserved)
    for g, (_, rows) in enumerate(f.groups):
        for row in range(f.reserved.count(g), rows):
            place[tok] = (g, row)
            tok += 1
    return place


def token_group_reference(m: TokenGroupEBC, kjt: KeyedJaggedTensor) -> Dict[str, torch.Tensor]:
    """Per bag: each id looked up at its own size, projected (or padded), summed; a mean divides by the whole bag."""
    proj = {key: (m.combiner.projections[p].weight if p >= 0 else None)
            for entries in m.combiner.plan for key, _, p in entries}
    out = {}
    for f in m.fields:
        place = token_place(f)
        rows = []
        for ids in bags(kjt, f.feature):
            acc = torch.zeros(f.out_dim)
            for tok in ids:
                if tok not in place:
                    continue  # a size-0 id: nothing to add, but it is still one id of the bag
                g, row = place[tok]
                key, size = f.keys()[g], f.groups[g][0]
                e = m.ebc.embedding_bags[f"t_{key}"].weight[row]
                acc = acc + (proj[key] @ e if proj[key] is not None else torch.cat([e, e.new_zeros(f.out_dim - size)]))
            rows.append(acc / max(len(ids), 1) if f.pooling == "mean" else acc)
        out[f.feature] = torch.stack(rows)
    return out


@pytest.mark.parametrize("combine", ["project", "pad"])
def test_token_groups_pool_bags_like_a_per_row_reference(combine: str) -> None:
    torch.manual_seed(0)
    m = TokenGroupEBC(FIELDS, _group_tables(FIELDS), combine)
    for seed in range(3):
        kjt = multi_hot_kjt(VOCAB, B, seed)
        got = m(kjt).to_dict()
        want = token_group_reference(m, kjt)
        assert sorted(got) == ["C1", "C2", "C3"]
        for f in want:
            torch.testing.assert_close(got[f], want[f], rtol=1e-5, atol=1e-6)
        # the same loss through the module and through the reference: the same table and projection gradients
        grads = []
        for outs in (got, want):
            m.zero_grad()
            sum((o * o).sum() for o in outs.values()).backward()
            grads.append({n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in m.named_parameters()})
        for n in grads[1]:
            torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)
    assert bags(kjt, "C1")[0] == [] and float(got["C1"][0].detach().abs().sum()) == 0


def test_token_group_mean_divides_by_the_whole_bag_not_per_group() -> None:
    m = TokenGroupEBC(FIELDS[:1], _group_tables(FIELDS[:1]), "pad")
    w16, w8 = m.ebc.embedding_bags["t_C1_s16"].weight, m.ebc.embedding_bags["t_C1_s8"].weight
    # id 1 -> row 0 of size 16, ids 2, 3 -> rows 1, 2 of size 16; id 10 -> row 0 of size 8; id 49 has size 0
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["C1"], values=torch.tensor([1, 10, 49, 2, 3]),
                                              lengths=torch.tensor([3, 2]))
    out = m(kjt)["C1"].detach()
    torch.testing.assert_close(out[0], (w16[0] + torch.cat([w8[0], torch.zeros(8)])).detach() / 3)
    torch.testing.assert_close(out[1], (w16[1] + w16[2]).detach() / 2)


def test_token_group_tables_must_sum() -> None:
    tables = [dataclasses.replace(t, pooling=PoolingType.MEAN) for t in _group_tables(FIELDS)]
    with pytest.raises(ValueError, match="t_C1_s16 must sum-pool"):
        TokenGroupEBC(FIELDS, tables)


def test_mean_token_groups_script_for_serving() -> None:
    from torchrec.fx import symbolic_trace

    from sharded_mde.export.serve import ServingModel
    from sharded_mde.modules.heads import build_head

    torch.manual_seed(0)
    sparse = TokenGroupEBC(FIELDS, _group_tables(FIELDS), "project")
    head = build_head("dlrm", sparse, {"C1": 16, "C2": 12, "C3": 8, "C4": 0}, 3, [8, 4], [8, 1])
    model = ServingModel(head).eval()
    scripted = torch.jit.script(symbolic_trace(model, leaf_modules=LEAF_MODULES))
    kjt = multi_hot_kjt(VOCAB, B, seed=5)
    dense = torch.randn(B, 3)
    torch.testing.assert_close(scripted(dense, kjt), model(dense, kjt))


def test_pooling_config_reaches_the_tables() -> None:
    cfg = from_dict(ModelConfig, {"pooling": {"B": "mean"}})
    plain = [EmbeddingBagConfig(name=f"t_{f}", num_embeddings=r, embedding_dim=d, feature_names=[f]) for f, r, d, _ in SPEC]
    assert [t.pooling for t in with_pooling(plain, cfg)] == [PoolingType.SUM, PoolingType.MEAN, PoolingType.SUM]
    with pytest.raises(ConfigError, match="pooling.B: one of sum, mean"):
        from_dict(ModelConfig, {"pooling": {"B": "max"}})
    with pytest.raises(ConfigError, match="model.pooling.Z: not a sparse feature"):
        with_pooling(plain, from_dict(ModelConfig, {"pooling": {"Z": "mean"}}))


def test_planner_pooling_factor_is_the_mean_bag_length() -> None:
    tables = [dataclasses.replace(t, num_embeddings=1000 * t.num_embeddings) for t in _tables()]
    tables.append(EmbeddingBagConfig(name="t_A_s4", num_embeddings=500, embedding_dim=4, feature_names=["A_s4"]))
    bag = {"A": 1.0, "B": 3.25, "C": 0.5}
    cfg = PlanConfig(world_size=2, compute_device="cpu")
    _, options = plan_sharding(tables, cfg, bag_lengths=bag)
    chosen = {so.name: so.input_lengths for so in options}
    assert chosen == {"t_A": [1.0], "t_B": [3.25], "t_C": [0.5], "t_A_s4": [1.0]}
    # a configured pooling_factor wins over the data; without data, 1
    over = dataclasses.replace(cfg, constraints={"t_B": {"pooling_factor": 2.0}})
    assert planner_constraints(tables, over, bag)["t_B"].pooling_factors == [2.0]
    assert planner_constraints(tables, cfg)["t_B"].pooling_factors == [1.0]


def test_pme_token_gradients_of_mean_bags_equal_autograd() -> None:
    from torchrec import EmbeddingBagCollection

    from sharded_mde.search.pme_score import _token_gradients

    torch.manual_seed(0)
    tables = _tables()
    ebc = EmbeddingBagCollection(tables)
    kjt = multi_hot_kjt({f: r for f, r, _, _ in SPEC}, B, seed=2)
    pooled = ebc(kjt)
    g_out = torch.randn(pooled.values().shape, generator=torch.Generator().manual_seed(4))
    (pooled.values() * g_out).sum().backward()
    grads = dict(zip(pooled.keys(), torch.split(g_out, pooled.length_per_key(), dim=1)))
    got = _token_gradients(kjt, grads, tables)
    for t in tables:
        ids, g = got[t.name][:2]  # (ids, dL/dE, ...)
        want = ebc.embedding_bags[t.name].weight.grad
        torch.testing.assert_close(g, want[ids], rtol=1e-5, atol=1e-6)
        assert sorted(ids.tolist()) == sorted(set(kjt[t.feature_names[0]].values().tolist()))
