"""The planted synthetic generator: determinism, recorded ground truth, teacher behaviour, formats."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from sharded_mde.config import DataConfig
from sharded_mde.data import SourceReader, Teacher, generate, prepare
from sharded_mde.data.synth import default_ranks, make_teacher

SMALL = dict(synth_rows=6000, synth_vocab_min=20, synth_vocab_max=2000)


def test_deterministic_by_seed(tmp_path):
    a = generate(DataConfig(**SMALL, synth_seed=3), tmp_path / "a", "tsv", progress=False)
    b = generate(DataConfig(**SMALL, synth_seed=3), tmp_path / "b", "tsv", progress=False)
    c = generate(DataConfig(**SMALL, synth_seed=4), tmp_path / "c", "tsv", progress=False)
    assert (tmp_path / "a" / "synth.tsv").read_bytes() == (tmp_path / "b" / "synth.tsv").read_bytes()
    assert (tmp_path / "a" / "synth.tsv").read_bytes() != (tmp_path / "c" / "synth.tsv").read_bytes()
    assert a == b and a["ranks"] != c["ranks"]


def test_tsv_is_criteo_format_with_ground_truth(tmp_path):
    truth = generate(DataConfig(**SMALL), tmp_path, "tsv", progress=False)
    on_disk = json.loads((tmp_path / "ground_truth.json").read_text())
    assert on_disk["ranks"] == truth["ranks"] and on_disk["data_file"] == "synth.tsv"
    first = (tmp_path / "synth.tsv").read_text().splitlines()[0].split("\t")
    assert len(first) == 40 and first[0] in ("0", "1")
    table = next(iter(SourceReader("criteo_tsv", [str(tmp_path / "synth.tsv")])))
    assert table.num_rows == SMALL["synth_rows"]
    hexes = table.column("C3").drop_null().to_pylist()
    assert all(len(h) == 8 and int(h, 16) >= 0 for h in hexes[:100])
    assert sum(table.column(f"I{j}").null_count for j in range(1, 14)) > 0  # some empty dense values
    assert min(table.column("I2").drop_null().to_pylist()) < 0  # Criteo-like negative counts
    # planted ranks: the default profile, permuted; vocab sizes log-spaced; distinct values within them
    assert sorted(truth["ranks"].values()) == sorted(default_ranks(26, 0))
    assert list(truth["ranks"].values()).count(0) == 6 and max(truth["ranks"].values()) == 32
    sizes = list(truth["vocab_sizes"].values())
    assert sizes[0] == 20 and sizes[-1] == 2000 and np.allclose(np.diff(np.log(sizes)), np.log(100) / 25, atol=0.05)
    for f, v in truth["vocab_sizes"].items():
        assert pc.count_distinct(table.column(f)).as_py() <= v
    t = truth["teacher"]
    assert 0.2 < t["ctr"] < 0.3 and t["test_rows"] == pytest.approx(600, rel=0.2) and 0.5 < t["test_auc"] < 1


def test_explicit_ranks_and_rank_zero_fields_are_noise():
    teacher = Teacher(DataConfig(**SMALL, synth_num_sparse=4, synth_num_dense=2, synth_ranks=[0, 3, 8, 0]))
    assert teacher.ranks == [0, 3, 8, 0]
    rng = np.random.default_rng(0)
    labels, tokens, dense, logit = teacher.sample(rng, 500)
    shuffled = tokens.copy()
    shuffled[:, 0] = rng.permutation(tokens[:, 0])
    shuffled[:, 3] = rng.permutation(tokens[:, 3])
    assert np.allclose(teacher.logit(shuffled, dense), logit, atol=1e-5)  # rank-0 fields: no effect
    shuffled[:, 2] = rng.permutation(tokens[:, 2])
    assert not np.allclose(teacher.logit(shuffled, dense), logit, atol=1e-3)
    with pytest.raises(ValueError, match="synth_ranks"):
        Teacher(DataConfig(**SMALL, synth_num_sparse=4, synth_ranks=[1, 2]))


def test_teacher_quality_and_rank_structure():
    """The teacher's AUC sits in the target band, and hiding a field's coordinates costs AUC by its rank."""
    from sharded_mde.train.metrics import auc
    import torch

    teacher = Teacher(DataConfig(synth_rows=1))
    labels, tokens, dense, logit = teacher.sample(np.random.default_rng(1), 60_000)
    full = auc(torch.from_numpy(logit), torch.from_numpy(labels.astype(np.float32)))
    assert 0.74 < full < 0.82 and 0.2 < labels.mean() < 0.3
    # keep only 2 latent coordinates of every field: high-rank fields lose information
    for u in teacher.latents:
        u[:, 2:] = 0.0
    low = auc(torch.from_numpy(teacher.logit(tokens, dense)), torch.from_numpy(labels.astype(np.float32)))
    assert low < full - 0.03


def test_tail_capacity_recorded_and_joined_with_ids(tmp_path):
    cfg = DataConfig(dir=str(tmp_path / "d"), synth_rows=5000, synth_vocab_min=20, synth_vocab_max=2000,
                     synth_tail_capacity=True, min_count=2)
    meta = prepare(cfg, progress=False)
    out = tmp_path / "d"
    truth = json.loads((out / "ground_truth.json").read_text())
    assert truth["token_capacity_file"] == "token_capacity.parquet" and not (out / "raw").exists()
    caps = pq.read_table(out / "token_capacity.parquet")
    assert caps.column_names == ["field", "value", "popularity_rank", "probability", "capacity", "id"]
    for f, info in truth["fields"].items():
        mine = caps.filter(pc.equal(caps.column("field"), f))
        cap = mine.column("capacity").to_numpy()
        assert mine.num_rows == info["vocab_size"] and cap[0] == info["rank"]
        assert info["head_size"] < info["vocab_size"] and cap[info["head_size"]:].max(initial=0) == info["tail_capacity"]
        if info["rank"] >= 4:
            assert info["tail_capacity"] < info["rank"]
        ids = mine.column("id").to_numpy()
        assert ids.max() < meta.num_embeddings[f] and ids[0] == 2  # the most popular token gets the first id
    assert sum(meta.rows.values()) == 5000


# ----------------------------------------------------------------------------- the factorised teacher

FACT = dict(synth_teacher="factorised", synth_rows=6000, synth_num_sparse=5, synth_num_dense=8, synth_latent_dim=8,
            synth_zipf=0.5, synth_ranks=[2, 0, 8, 5, 1], synth_vocab_sizes=[300, 500, 40, 60, 20])


def test_factorised_deterministic_by_seed(tmp_path):
    a = generate(DataConfig(**FACT, synth_seed=3), tmp_path / "a", "parquet", progress=False)
    b = generate(DataConfig(**FACT, synth_seed=3), tmp_path / "b", "parquet", progress=False)
    c = generate(DataConfig(**FACT, synth_seed=4), tmp_path / "c", "parquet", progress=False)
    ta, tb, tc = (pq.read_table(tmp_path / d / "synth.parquet") for d in "abc")
    assert ta.equals(tb) and not ta.equals(tc)
    assert a == b and a["teacher"]["kind"] == "factorised" and a["ranks"] == dict(zip(
        [f"C{i}" for i in range(1, 6)], FACT["synth_ranks"]))
    assert a["vocab_sizes"]["C3"] == 40 and a["settings"]["synth_teacher"] == "factorised"


def test_factorised_token_vectors_have_the_planted_rank():
    """The matrix of token vectors of field f has numerical rank r_f; rank-0 fields have none."""
    from sharded_mde.data.synth import FactorisedTeacher

    teacher = make_teacher(DataConfig(**FACT))
    assert isinstance(teacher, FactorisedTeacher)
    for f, r in enumerate(FACT["synth_ranks"]):
        e = teacher.token_vectors(f)
        assert e.shape == (FACT["synth_vocab_sizes"][f], FACT["synth_latent_dim"])
        assert np.linalg.matrix_rank(e, tol=1e-4) == r
        z = teacher.latents[f]  # orthonormal maps keep lengths; z ~ N(0, I / r): variance 1 whatever the rank
        assert np.allclose(np.linalg.norm(e, axis=1), np.linalg.norm(z, axis=1), atol=1e-5)
        if r >= 5:
            assert np.mean(np.sum(z * z, axis=1)) == pytest.approx(1.0, rel=0.25)


def test_factorised_value_vectors_follow_raw_values():
    """Raw values (in any order, as a vocabulary lists them) map to their tokens' vectors; unknown values to 0."""
    teacher = make_teacher(DataConfig(**FACT))
    values = teacher.value_strings(0).to_pylist()
    order = [7, 0, 123, 299]
    got = teacher.value_vectors(0, [values[i] for i in order] + ["not-a-value"])
    assert got.shape == (5, FACT["synth_latent_dim"])
    assert np.allclose(got[:4], teacher.token_vectors(0)[order]) and not np.any(got[4])
    assert np.linalg.norm(got[:4], axis=1).min() > 0


def test_factorised_logit_needs_exactly_r_directions_per_field():
    """Cutting a field's token vectors to their top r_f directions keeps the logit; r_f - 1 changes it."""
    teacher = make_teacher(DataConfig(**FACT))
    labels, tokens, dense, logit = teacher.sample(np.random.default_rng(5), 4000)
    for f, r in enumerate(FACT["synth_ranks"]):
        if r == 0:
            continue
        kept = teacher.latents[f]
        u, s, vt = np.linalg.svd(kept @ teacher.maps[f], full_matrices=False)
        for k, same in ((r, True), (r - 1, False)):
            cut = (u[:, :k] * s[:k]) @ vt[:k]
            teacher.latents[f], teacher.maps[f] = cut, np.eye(cut.shape[1], dtype=np.float32)
            assert np.allclose(teacher.logit(tokens, dense), logit, atol=1e-3) == same, (f, k)
        teacher.latents[f], teacher.maps[f] = kept, _orthonormal(teacher, f)


def _orthonormal(teacher, f):
    """Recomputes field f's map from the same generator (the test above swapped it out)."""
    return make_teacher(teacher.cfg).maps[f]


def test_factorised_noise_fields_and_context():
    """Rank-0 fields do not enter the logit; the dense context does (it is every field's partner)."""
    teacher = make_teacher(DataConfig(**FACT))
    rng = np.random.default_rng(0)
    labels, tokens, dense, logit = teacher.sample(rng, 2000)
    shuffled = tokens.copy()
    shuffled[:, 1] = rng.permutation(tokens[:, 1])
    assert np.allclose(teacher.logit(shuffled, dense), logit, atol=1e-5)
    shuffled[:, 2] = rng.permutation(tokens[:, 2])
    assert not np.allclose(teacher.logit(shuffled, dense), logit, atol=1e-2)
    assert not np.allclose(teacher.logit(tokens, dense[rng.permutation(len(dense))]), logit, atol=1e-2)


def test_factorised_labels_follow_the_teacher():
    """Logistic regression of the labels on the true logit recovers slope 1 and intercept 0, at the target CTR."""
    import torch

    from sharded_mde.data.synth import FACTORISED_CTR
    from sharded_mde.train.metrics import auc

    teacher = make_teacher(DataConfig(**FACT))
    labels, tokens, dense, logit = teacher.sample(np.random.default_rng(1), 60_000)
    y = labels.astype(np.float64)
    assert abs(y.mean() - FACTORISED_CTR) < 0.02
    assert auc(torch.from_numpy(logit), torch.from_numpy(y.astype(np.float32))) > 0.85
    x = np.stack([np.ones_like(y), logit.astype(np.float64)], 1)
    beta = np.zeros(2)
    for _ in range(25):  # Newton's method for the logistic likelihood
        p = 1 / (1 + np.exp(-x @ beta))
        beta += np.linalg.solve(x.T @ (x * (p * (1 - p))[:, None]), x.T @ (y - p))
    assert abs(beta[0]) < 0.1 and abs(beta[1] - 1) < 0.05


def test_factorised_prepare_and_bad_settings(tmp_path):
    meta = prepare(DataConfig(dir=str(tmp_path / "d"), format="synth", **FACT), progress=False)
    assert sum(meta.rows.values()) == FACT["synth_rows"] and len(meta.dense_features) == 8
    assert meta.num_embeddings["C5"] <= 20 + 2
    truth = json.loads((tmp_path / "d" / "ground_truth.json").read_text())
    assert truth["teacher"]["latent_dim"] == 8 and 0.85 < truth["teacher"]["test_auc"] < 1
    for bad, key in ((dict(synth_ranks=[2, 0, 9, 5, 1]), "synth_ranks"), (dict(synth_vocab_sizes=[3, 4]), "synth_vocab_sizes"),
                     (dict(synth_num_dense=0), "synth_num_dense"), (dict(synth_teacher="deep"), "synth_teacher")):
        with pytest.raises(ValueError, match=key):
            make_teacher(DataConfig(**{**FACT, **bad}))


def test_original_teacher_ignores_the_factorised_settings(tmp_path):
    """The mlp teacher's bytes do not depend on the keys only the factorised teacher reads."""
    generate(DataConfig(**SMALL, synth_num_sparse=4), tmp_path / "a", "tsv", progress=False)
    generate(DataConfig(**SMALL, synth_num_sparse=4, synth_latent_dim=7), tmp_path / "b", "tsv", progress=False)
    assert (tmp_path / "a" / "synth.tsv").read_bytes() == (tmp_path / "b" / "synth.tsv").read_bytes()
