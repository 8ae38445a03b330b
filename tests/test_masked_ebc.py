"""MaskedEmbeddingBagCollection on one process: masking by key, surrogates, penalty and regularity values."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.sparse.jagged_tensor import KeyedTensor

from sharded_mde.modules.masked_ebc import ColumnGate, MaskedEmbeddingBagCollection, surrogate_grad
from sharded_mde.dims import column_cost, table_bytes

SPEC = [("a", 30, 8), ("b", 20, 4), ("c", 25, 8)]


def _tables():
    return [EmbeddingBagConfig(name=f"t_{f}", num_embeddings=r, embedding_dim=d, feature_names=[f]) for f, r, d in SPEC]


def _kjt(b: int = 6, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 3, (len(SPEC) * b,), generator=g, dtype=torch.int32)
    values = torch.cat([torch.randint(0, r, (int(lengths[i * b:(i + 1) * b].sum()),), generator=g)
                        for i, (_, r, _) in enumerate(SPEC)])
    return KeyedJaggedTensor.from_lengths_sync(keys=[f for f, _, _ in SPEC], values=values, lengths=lengths)


def _masked(**kw) -> MaskedEmbeddingBagCollection:
    torch.manual_seed(0)
    return MaskedEmbeddingBagCollection(_tables(), device=torch.device("cpu"), **kw)


def test_masking_pooled_columns_equals_masking_table_columns() -> None:
    m = _masked()
    kept = {"t_a": [0, 3, 5], "t_c": [1, 2, 3, 4, 7]}  # t_b fully pruned
    m.gate.set_kept(kept)
    ref = EmbeddingBagCollection(tables=_tables(), device=torch.device("cpu"))
    with torch.no_grad():
        for t in _tables():
            w = m.ebc.embedding_bags[t.name].weight.clone()
            keep = torch.zeros(t.embedding_dim, dtype=torch.bool)
            keep[kept.get(t.name, [])] = True
            w[:, ~keep] = 0
            ref.embedding_bags[t.name].weight.copy_(w)
    out, want = m(_kjt()).to_dict(), ref(_kjt()).to_dict()
    for f in want:
        torch.testing.assert_close(out[f], want[f], rtol=0, atol=0)
    assert out["b"].abs().sum() == 0 and out["a"][:, [1, 2, 4, 6, 7]].abs().sum() == 0 and out["a"].abs().sum() > 0


def test_gate_applies_mask_by_key_whatever_the_key_order() -> None:
    gate = ColumnGate(_tables())
    gate.set_kept({"t_a": [1], "t_b": [0, 2], "t_c": [7]})
    gate.eval()
    x = {f: torch.randn(3, d) for f, _, d in SPEC}
    for order in (["a", "b", "c"], ["c", "a", "b"]):
        kt = KeyedTensor(keys=order, length_per_key=[x[k].shape[1] for k in order], values=torch.cat([x[k] for k in order], 1))
        out = gate(kt).to_dict()
        torch.testing.assert_close(out["a"][:, 1], x["a"][:, 1])
        assert out["a"][:, [0, 2, 3, 4, 5, 6, 7]].abs().sum() == 0
        torch.testing.assert_close(out["b"][:, [0, 2]], x["b"][:, [0, 2]])
        assert out["c"][:, :7].abs().sum() == 0 and torch.equal(out["c"][:, 7], x["c"][:, 7])


@pytest.mark.parametrize("surrogate", ["identity", "clipped", "sigmoid"])
def test_surrogate_gradients(surrogate: str) -> None:
    u = torch.tensor([-2.0, -0.5, 0.0, 1.0, 1.5])
    s = torch.sigmoid(u)
    want = {"identity": torch.ones(5), "clipped": torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]),
            "sigmoid": 4 * s * (1 - s)}[surrogate]
    torch.testing.assert_close(surrogate_grad(u, surrogate), want)


def test_backward_records_the_mask_gradient_of_every_column() -> None:
    m = _masked()
    kept = {"t_a": [0, 3], "t_c": [1, 2, 3, 4, 7]}  # t_b fully pruned: its gradient must still be recorded
    m.gate.set_kept(kept)
    m.train()
    kt = m.ebc(_kjt(b=9))
    pooled = kt.values().detach()
    out = m.gate(kt)
    w = torch.randn(out.values().shape, generator=torch.Generator().manual_seed(3))
    (out.values() * w).sum().backward()
    # dL/dm_j = sum over rows of dL/dout_j * pooled_j, gathered into table order by key
    per_col = (w * pooled).sum(0)
    want = torch.cat([per_col[o:o + d] for o, d in zip([0, 8, 12], [8, 4, 8])])  # keys a, b, c = table order
    torch.testing.assert_close(m.gate.reduce_grad(), want, rtol=1e-5, atol=1e-6)
    assert m.gate.grad_sum.abs().max() == 0  # reset by reduce_grad
    grad_a = m.ebc.embedding_bags["t_a"].weight.grad
    assert grad_a[:, [1, 2, 4, 5, 6, 7]].abs().max() == 0 and grad_a[:, [0, 3]].abs().max() > 0
    assert m.ebc.embedding_bags["t_b"].weight.grad.abs().max() == 0
    m.eval()
    m.gate(m.ebc(_kjt())).values().sum().backward()
    assert m.gate.grad_sum.abs().max() == 0 and m.auxiliary_loss() is None


def test_update_is_the_discrete_gradient_plus_byte_price() -> None:
    gate = ColumnGate(_tables(), mask_init=0.1)
    full = sum(table_bytes(r, d).total for _, r, d in SPEC)
    price = torch.tensor([column_cost(r) / full for _, r, d in SPEC for _ in range(d)])
    price = price / price.mean()
    torch.testing.assert_close(gate.price, price)
    gate.mask[:5] = -0.1  # five pruned columns
    g1, g2 = (torch.randn(20, generator=torch.Generator().manual_seed(i)) for i in (0, 1))
    gate.update(g1, lam=5.0, lr=0.01, batch_size=64, move=False)  # statistics only
    assert torch.equal(gate.mask[5:], torch.full((15,), 0.1))
    before = gate.mask.clone()
    gate.update(g2, lam=2.0, lr=0.01, batch_size=64)
    mom = 0.1 * g1 * 0.9 + 0.1 * g2
    fisher = 64 * (0.01 * g1 * g1 * 0.99 + 0.01 * g2 * g2) / (1 - 0.99 ** 2)
    m = (before > 0).float()
    d = (mom + (0.5 - m) * fisher) / (fisher.mean() / 2)
    torch.testing.assert_close(gate.mask, before - 0.01 * (d + 2.0 * price))
    # a kept column with zero mean gradient but a large curvature is worth keeping: it moves up
    imp = ColumnGate(_tables(), mask_init=0.1)
    for i in range(50):
        g = torch.zeros(20)
        g[0] = 1.0 if i % 2 else -1.0
        g[1:] = 0.01 * (1.0 if i % 2 else -1.0)
        imp.update(g, lam=0.5, lr=0.01, batch_size=64)
    assert imp.mask[0] > 0.1 and (imp.mask[1:] < 0.1).all()
    clipped = ColumnGate(_tables(), mask_init=0.1, surrogate="clipped")  # |a / mask_init| > 1 does not move
    clipped.mask.copy_(torch.tensor([0.3, 0.05] + [-0.05] * 18))
    clipped.update(g1, lam=1.0, lr=0.01, batch_size=64)
    assert clipped.mask[0] == 0.3 and clipped.mask[1] != 0.05


def test_price_mixes_a_uniform_share() -> None:
    gate = ColumnGate(_tables(), uniform_price=1.0)
    torch.testing.assert_close(gate.price, torch.ones(20))


def test_kept_counts_and_values_follow_set_kept() -> None:
    gate = ColumnGate(_tables())
    gate.set_kept({"t_a": [0, 4], "t_b": [0, 1, 2, 3]}, magnitude=0.2)
    assert gate.kept_counts().tolist() == [2, 4, 0]
    vals = gate.table_values()
    assert vals["t_a"].tolist() == pytest.approx([0.2, -0.2, -0.2, -0.2, 0.2, -0.2, -0.2, -0.2])


def _naive_ortho(x: dict, kept: dict) -> torch.Tensor:
    total = torch.zeros(())
    for f, cols in kept.items():
        if not cols:
            continue
        xb = x[f][:, cols]
        xb = xb - xb.mean(0, keepdim=True)
        xb = xb / xb.norm(dim=0, keepdim=True)
        c = xb.T @ xb
        total = total + ((c - torch.eye(len(cols))) ** 2).sum()
    return total


def test_orthogonal_regularity_matches_a_per_table_reference() -> None:
    tables = [EmbeddingBagConfig(name=f"t_{f}", num_embeddings=r, embedding_dim=d, feature_names=[f]) for f, r, d in SPEC]
    kept = {"a": [0, 2, 3, 6], "b": [1, 3], "c": [0, 1, 2, 3, 4, 5, 6, 7]}
    for rows, mixed in ((0, True), (5, True)):
        gate = ColumnGate(tables, ortho_weight=0.5, ortho_rows=rows)
        gate.set_kept({f"t_{f}": c for f, c in kept.items()})
        x = {f: torch.randn(9, d) + torch.randn(9, 1) for f, _, d in SPEC}  # a shared component: correlated columns
        kt = KeyedTensor(keys=list(x), length_per_key=[v.shape[1] for v in x.values()], values=torch.cat(list(x.values()), 1))
        gate.train()
        gate(kt)
        sub = {f: v[:rows] if rows else v for f, v in x.items()}
        pairs = sum(d * (d - 1) for _, _, d in SPEC)
        torch.testing.assert_close(gate.auxiliary_loss(), 0.5 * _naive_ortho(sub, kept) / pairs, rtol=1e-4, atol=1e-6)
    # all tables of one width take the reshape path; the value must agree with the reference too
    same = [EmbeddingBagConfig(name=f"t_{f}", num_embeddings=10, embedding_dim=4, feature_names=[f]) for f in "xy"]
    gate = ColumnGate(same, ortho_weight=1.0)
    gate.set_kept({"t_x": [0, 1, 3], "t_y": [0, 1, 2, 3]})
    x = {f: torch.randn(7, 4) + torch.randn(7, 1) for f in "xy"}
    gate.train()
    gate(KeyedTensor(keys=["x", "y"], length_per_key=[4, 4], values=torch.cat([x["x"], x["y"]], 1)))
    torch.testing.assert_close(gate.auxiliary_loss(), _naive_ortho(x, {"x": [0, 1, 3], "y": [0, 1, 2, 3]}) / 24,
                               rtol=1e-4, atol=1e-6)


def test_orthogonal_regularity_trains_the_tables_not_the_mask() -> None:
    m = _masked(ortho_weight=1.0)
    m.train()
    m(_kjt(b=16))
    m.auxiliary_loss().backward()
    assert m.gate.reduce_grad().abs().max() == 0  # the regularity does not reach the mask
    assert m.ebc.embedding_bags["t_a"].weight.grad.abs().sum() > 0


def test_unknown_key_is_a_clear_error() -> None:
    gate = ColumnGate(_tables())
    with pytest.raises(KeyError, match="'zz' belongs to no masked table"):
        gate(KeyedTensor(keys=["zz"], length_per_key=[4], values=torch.zeros(2, 4)))
