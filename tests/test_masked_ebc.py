"""MaskedEmbeddingBagCollection on one process: masking by key, surrogates, penalty and regularity values."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.sparse.jagged_tensor import KeyedTensor

from sharded_mde.modules.masked_ebc import ColumnGate, MaskedEmbeddingBagCollection, hard_mask
from sharded_mde.plan.dims import column_cost, table_bytes

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
    a = torch.tensor([-2.0, -0.5, 0.3, 1.5], requires_grad=True)
    m = hard_mask(a, surrogate)
    assert m.tolist() == [0.0, 0.0, 1.0, 1.0]
    (m * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    up = torch.tensor([1.0, 2.0, 3.0, 4.0])
    s = torch.sigmoid(a.detach())
    want = {"identity": up, "clipped": up * torch.tensor([0.0, 1.0, 1.0, 0.0]), "sigmoid": up * s * (1 - s)}[surrogate]
    torch.testing.assert_close(a.grad, want)


def test_penalty_is_lambda_times_kept_column_bytes_over_full_bytes() -> None:
    m = _masked(mask_init=0.1, lr_scale=2.0)
    m.gate.set_kept({"t_a": [0, 1], "t_c": range(8)})
    m.gate.set_lambda(3.0)
    m.train()
    m(_kjt())
    full = sum(table_bytes(r, d).total for _, r, d in SPEC)
    want = 3.0 * (2 * column_cost(30) + 8 * column_cost(25)) / full
    torch.testing.assert_close(m.auxiliary_loss(), torch.tensor(want, dtype=torch.float32))
    m.auxiliary_loss().backward()
    # identity surrogate: d penalty / d a = lambda * price, and a = weight * lr_scale
    price = torch.tensor([column_cost(r) / full for _, r, d in SPEC for _ in range(d)])
    torch.testing.assert_close(m.gate.weight.grad, 3.0 * price * 2.0)
    m.eval()
    m(_kjt())
    assert m.auxiliary_loss() is None


def test_kept_counts_and_values_follow_set_kept() -> None:
    gate = ColumnGate(_tables(), lr_scale=0.5)
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
        torch.testing.assert_close(gate.auxiliary_loss(), 0.5 * _naive_ortho(sub, kept), rtol=1e-4, atol=1e-5)
    # all tables of one width take the reshape path; the value must agree with the reference too
    same = [EmbeddingBagConfig(name=f"t_{f}", num_embeddings=10, embedding_dim=4, feature_names=[f]) for f in "xy"]
    gate = ColumnGate(same, ortho_weight=1.0)
    gate.set_kept({"t_x": [0, 1, 3], "t_y": [0, 1, 2, 3]})
    x = {f: torch.randn(7, 4) + torch.randn(7, 1) for f in "xy"}
    gate.train()
    gate(KeyedTensor(keys=["x", "y"], length_per_key=[4, 4], values=torch.cat([x["x"], x["y"]], 1)))
    torch.testing.assert_close(gate.auxiliary_loss(), _naive_ortho(x, {"x": [0, 1, 3], "y": [0, 1, 2, 3]}),
                               rtol=1e-4, atol=1e-5)


def test_orthogonal_regularity_trains_the_tables_not_the_mask() -> None:
    m = _masked(ortho_weight=1.0)
    m.train()
    m(_kjt(b=16))
    m.auxiliary_loss().backward()
    assert m.gate.weight.grad.abs().max() == 0  # lambda is 0: only the regularity, which does not touch the mask
    assert m.ebc.embedding_bags["t_a"].weight.grad.abs().sum() > 0


def test_unknown_key_is_a_clear_error() -> None:
    gate = ColumnGate(_tables())
    with pytest.raises(KeyError, match="'zz' belongs to no masked table"):
        gate(KeyedTensor(keys=["zz"], length_per_key=[4], values=torch.zeros(2, 4)))
