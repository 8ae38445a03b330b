"""The planted synthetic generator: determinism, recorded ground truth, teacher behaviour, formats."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from sharded_mde.config import DataConfig
from sharded_mde.data import SourceReader, Teacher, generate, prepare
from sharded_mde.data.synth import default_ranks

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
