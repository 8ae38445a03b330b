"""PME dims file: valid, under budget, and its bytes are exactly what the compact module holds.

Also the renumbering: reserved ids fixed, groups contiguous by descending size, vocabulary files
rewritten in id order, and the module reading renumbered ids equals the selection's sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor

from sharded_mde.config import RunConfig, SearchConfig
from sharded_mde.modules.token_groups import build_token_group_ebc
from sharded_mde.dims import PmeRecord, load_dims, save_dims
from sharded_mde.plan.tables import plan_tables
from sharded_mde.search.budget import budget_bytes
from sharded_mde.search.pme import WEIGHT_DTYPE, make_pme_dims
from sharded_mde.search.pme_data import rank_correlation, renumber_data, tail_rate, token_order
from sharded_mde.search.pme_score import ShardInfo, TokenScores
from sharded_mde.search.pme_select import ByteModel, select_sizes

TABLES = [EmbeddingBagConfig(name="t_A", num_embeddings=600, embedding_dim=16, feature_names=["A"]),
          EmbeddingBagConfig(name="t_B", num_embeddings=450, embedding_dim=8, feature_names=["B"]),
          EmbeddingBagConfig(name="t_N", num_embeddings=200, embedding_dim=16, feature_names=["N"])]


def _scores() -> TokenScores:
    g = torch.Generator().manual_seed(0)
    local, noise = {}, {}
    for i, t in enumerate(TABLES):
        n, d = t.num_embeddings, t.embedding_dim
        count = (300.0 / torch.arange(1, n + 1)).expand(d, n).T  # Zipf-like rows per token
        mu = torch.randn(n, d, generator=g) * (0.0 if t.name == "t_N" else 0.5)  # a noise field: no evidence
        local[i] = mu * count + torch.randn(n, d, generator=g) * count.sqrt()
        noise[i] = count.clone()
    layout = [ShardInfo(t.name, 0, 0, t.num_embeddings, t.embedding_dim, 0) for t in TABLES]
    return TokenScores(TABLES, layout, local, noise, 1, 0.0)


def _module_bytes(module, optimizer_row_bytes: int = 4, adam_bytes: int = 8) -> int:
    """What the built module really holds: group tables + row-wise state, projections + Adam state, routing."""
    n = 0
    for c in module.ebc.embedding_bag_configs():
        n += c.num_embeddings * (c.embedding_dim * 4 + optimizer_row_bytes)
    n += sum(p.numel() * (4 + adam_bytes) for p in module.combiner.parameters())
    n += sum(b.numel() * b.element_size() for b in module.router.buffers())
    return n


@pytest.mark.parametrize("combine,budget", [("project", 0.1), ("project", 0.4), ("pad", 0.25)])
def test_dims_bytes_are_the_module_bytes(tmp_path: Path, combine: str, budget: float) -> None:
    cfg = RunConfig(search=SearchConfig(method="pme", budget=budget))
    cfg.search.pme.combine = combine
    model = ByteModel(WEIGHT_DTYPE, cfg.train.embedding_optimizer, cfg.train.dense_optimizer, combine)
    b = budget_bytes(TABLES, budget, WEIGHT_DTYPE, cfg.train.embedding_optimizer)
    sel = select_sizes(_scores(), b, model)
    dims = make_pme_dims(cfg, TABLES, sel, model, PmeRecord(combine=combine))
    save_dims(tmp_path / "dims.json", dims)
    dims = load_dims(tmp_path / "dims.json", TABLES)
    assert dims.kept_bytes <= dims.budget_bytes == b
    assert dims.kept_bytes > 0.97 * b
    rows = {t.name: sum(g.rows for g in t.groups if g.size) for t in dims.tables}
    assert rows["t_N"] < rows["t_A"] and rows["t_N"] < rows["t_B"]  # the noise field gets fewer rows
    module = build_token_group_ebc(dims, TABLES, combine)
    assert _module_bytes(module) == dims.kept_bytes
    assert [c.name for c in plan_tables(dims, TABLES)] == [c.name for c in module.ebc.embedding_bag_configs()]


def test_renumbered_ids_reach_each_tokens_own_size(tmp_path: Path) -> None:
    cfg = RunConfig(search=SearchConfig(method="pme", budget=0.1))
    model = ByteModel(combine="pad")
    sel = select_sizes(_scores(), budget_bytes(TABLES, 0.1), model)
    dims = make_pme_dims(cfg, TABLES, sel, model, PmeRecord(combine="pad"))
    module = build_token_group_ebc(dims, TABLES, "pad")
    with torch.no_grad():
        for p in module.ebc.parameters():
            p.fill_(1.0)  # a token's pooled output then counts its size in non-zero columns
    for t in TABLES:
        sizes = sel.sizes[t.name]
        new = torch.as_tensor(token_order(sizes.numpy()))
        f = t.feature_names[0]
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=[f], values=new, lengths=torch.ones(t.num_embeddings, dtype=torch.long))
        out = module(kjt).to_dict()
        got = (out[f] != 0).sum(1) if f in out else torch.zeros(t.num_embeddings, dtype=torch.long)
        want = torch.where(sizes > 0, sizes, sizes[1]).long()  # a pruned token reads the OOV row
        want[0] = sizes[0]
        assert bool((sizes[2:] == 0).any()) and bool((sizes[2:] > 0).any()), t.name  # both kinds are checked
        assert torch.equal(got, want), t.name


def test_token_order_and_vocab_renumbering(tmp_path: Path) -> None:
    sizes = np.array([4, 0, 8, 4, 0, 16, 8])
    new = token_order(sizes)
    assert new.tolist() == [0, 1, 3, 5, 1, 2, 4]  # old id 4 (size 0) is pruned: it reads the OOV id 1
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "vocab").mkdir(parents=True)
    pq.write_table(pa.table({"value": ["a", "b", "c", "d", "e"], "id": pa.array([2, 3, 4, 5, 6], pa.int32()),
                             "count": [50, 40, 30, 20, 10]}), src / "vocab" / "A.parquet")
    bags = pa.array([[2, 4], [], None], pa.list_(pa.int32()))
    pq.write_table(pa.table({"label": [1.0, 0.0, 1.0], "A": pa.array([2, 5, 4], pa.int32()),
                             "B": pa.array([3, 3, 3], pa.int32()), "M": bags}), src / "train.parquet")
    (src / "meta.json").write_text("{}")
    renumber_data(src, dst, {"A": new, "M": new})
    vocab = pq.read_table(dst / "vocab" / "A.parquet")
    assert vocab.column("id").to_pylist() == [2, 3, 4, 5]
    # old id 5 (value d, size 16) is now 2; old 2 (a, size 8) is 3; old 6 (e, 8) is 4; old 3 (b, 4) is 5; c is left
    # out, so serving encodes it as out-of-vocabulary, as the renumbered rows have it
    assert vocab.column("value").to_pylist() == ["d", "a", "e", "b"]
    train = pq.read_table(dst / "train.parquet")
    assert train.column("A").to_pylist() == [3, 2, 1] and train.column("B").to_pylist() == [3, 3, 3]
    assert train.column("M").to_pylist() == [[3, 1], [], None]  # bags keep their lengths and nulls
    assert train.schema.field("A").type == pa.int32() and train.schema.field("M").type == pa.list_(pa.int32())
    assert (dst / "meta.json").read_text() == "{}"


def test_tail_rate_tops_the_oov_rows_share_up_to_tail_share() -> None:
    """The OOV row reads at least `share` of a field's training ids: pruned ids count, kept ones top it up."""
    counts = np.array([5, 0, 60, 20, 10, 10])  # missing ids (0) never count
    none_pruned = token_order(np.array([0, 0, 4, 4, 4, 4]))
    assert tail_rate(counts, none_pruned, 0.1) == pytest.approx(0.1)
    some = token_order(np.array([0, 0, 4, 4, 0, 4]))  # 10 of 100 ids pruned: 0.2 needs (0.2 - 0.1) / 0.9 of the rest
    assert tail_rate(counts, some, 0.2) == pytest.approx(0.1 / 0.9)
    assert tail_rate(counts, some, 0.1) == 0.0 and tail_rate(counts, some, 0.05) == 0.0  # the tail carries enough
    assert tail_rate(counts, none_pruned, 0.0) == 0.0


def test_tail_rates_send_kept_training_ids_to_the_oov_row_only(tmp_path: Path) -> None:
    """A seeded share of the training split's kept ids reads the OOV row; valid, reserved and pruned ids untouched."""
    n = 20000
    new = token_order(np.array([4, 4] + [4] * 8 + [0] * 2))  # old ids 2..9 kept, 10 and 11 pruned
    rng = np.random.default_rng(0)
    ids = pa.array(np.r_[0, rng.integers(2, 12, n - 1)], pa.int32())  # one missing id (0), then tokens
    bags = pa.array([[2, 3, 4]] * n, pa.list_(pa.int32()))
    src = tmp_path / "src"
    for split in ("train", "valid"):
        (src / split).mkdir(parents=True)
        pq.write_table(pa.table({"label": np.zeros(n), "A": ids, "M": bags}), src / split / "part-00000.parquet")
    runs = []
    for seed in (7, 7, 8):
        dst = tmp_path / f"dst{len(runs)}"
        renumber_data(src, dst, {"A": new, "M": new}, {"A": 0.25, "M": 0.25}, seed=seed)
        runs.append({s: pq.read_table(dst / s / "part-00000.parquet") for s in ("train", "valid")})
    plain = new[ids.to_numpy()]
    got = runs[0]["train"].column("A").to_numpy()
    moved = (got != plain)
    assert got[0] == 0 and set(np.unique(got[moved]).tolist()) == {1}  # only to the OOV id, never the missing id
    kept = plain >= 2
    assert not moved[~kept].any() and abs(moved[kept].mean() - 0.25) < 0.02  # pruned ids were OOV already
    assert np.array_equal(runs[1]["train"].column("A").to_numpy(), got)  # the same seed: the same rows
    assert not np.array_equal(runs[2]["train"].column("A").to_numpy(), got)
    assert np.array_equal(runs[0]["valid"].column("A").to_numpy(), plain)  # held-out splits are renumbered only
    bag = runs[0]["train"].column("M").to_pylist()
    assert all(len(b) == 3 for b in bag) and 0.2 < np.mean([v == 1 for b in bag for v in b]) < 0.3  # per entry
    renumber_data(src, tmp_path / "none", {"A": new})  # no rates: exactly the renumbering
    assert np.array_equal(pq.read_table(tmp_path / "none" / "train" / "part-00000.parquet").column("A").to_numpy(), plain)


def test_rank_correlation() -> None:
    assert rank_correlation(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 40])) == pytest.approx(1.0)
    assert rank_correlation(np.array([4, 4, 8, 16]), np.array([1, 2, 3, 4])) == pytest.approx(0.9486833)
    assert rank_correlation(np.array([1, 1, 1]), np.array([1, 2, 3])) is None

