"""PME scoring: the shard-local saliencies and noise equal an unsharded model's dense per-row reference.

Real gloo ranks, the fused TBE kernel (which never exposes table gradients), table-wise, row-wise
and column-wise plans; the tables must be untouched by scoring.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection
from torchrec.datasets.utils import Batch

from dist_utils import random_batch, run_ranks, shard_with_reference, table_configs
from sharded_mde.config import ModelConfig, TrainConfig
from sharded_mde.modules.model import build_model
from sharded_mde.search.pme_score import PooledCapture, calibrate_output_bias, score_tokens

FEATURES = ["C1", "C2", "C3"]
TABLES = [("C1", 30, 8), ("C2", 20, 16), ("C3", 25, 8)]
N_DENSE, B, BATCHES = 3, 8, 3


def _batch(rank: int, step: int) -> Batch:
    return random_batch(TABLES, B, N_DENSE, seed=1000 * step + rank, seen=0.5)  # upper half of each table never seen


def _model():
    torch.manual_seed(0)
    return build_model(ModelConfig(dense_arch=[8, 8], over_arch=[8, 1]), table_configs(TABLES), FEATURES, N_DENSE,
                       sparse_arch=PooledCapture(EmbeddingBagCollection(tables=table_configs(TABLES))))


def _reference(ref, world: int):
    """The unsharded model's dense gradients of the mean rank loss of each global batch: E * (their sum), and the
    noise E^2 * sum over bag entries of the entry's per-row gradient^2."""
    names = [f"model.sparse_arch.ebc.embedding_bags.t_{f}.weight" for f, _, _ in TABLES]
    params = dict(ref.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    noise = {n: torch.zeros_like(params[n]) for n in names}
    capture = ref.model.sparse_arch
    for step in range(BATCHES):
        loss = 0
        for r in range(world):
            batch = _batch(r, step)
            loss_r = ref(batch)[0] / world
            (pooled_g,) = torch.autograd.grad(loss_r, capture.last.values(), retain_graph=True)
            loss = loss + loss_r
            per_row = dict(zip(capture.last.keys(), torch.split(pooled_g, capture.last.length_per_key(), dim=1)))
            for (f, _, _), n in zip(TABLES, names):  # each row's pooled gradient is that row's own (no cross-row term)
                jt = batch.sparse_features[f]
                for row, ids in enumerate(torch.split(jt.values(), jt.lengths().tolist())):
                    for i in ids.tolist():
                        noise[n][i] += per_row[f][row] ** 2
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            total[n] += g
    e = {n: params[n].detach() for n in names}
    return [{n: e[n] * total[n] for n in names}, {n: e[n] ** 2 * noise[n] for n in names}]


def _body(rank: int, world: int, kinds: tuple) -> None:
    for kind in kinds:
        _check(rank, world, kind)


def _check(rank: int, world: int, kind: str) -> None:
    cfg = TrainConfig(embedding_optimizer="sgd", embedding_lr=1.0)
    dmp, ref = shard_with_reference(_model(), table_configs(TABLES), kind, world, cfg)
    before = {k: v for k, v in copy.deepcopy(dmp.state_dict()).items()}
    scores = score_tokens(dmp, table_configs(TABLES), (_batch(rank, s) for s in range(10)), BATCHES,
                          torch.device("cpu"), progress=False, calibrate=False)
    assert scores.batches == BATCHES
    want = _reference(ref, world)
    owned = 0
    for got, expected in zip((scores.local, scores.noise), want):
        for i, acc in got.items():
            s = scores.layout[i]
            full = expected[f"model.sparse_arch.ebc.embedding_bags.{s.table}.weight"]
            torch.testing.assert_close(acc, full[s.row0:s.row0 + s.rows, s.col0:s.col0 + s.cols], rtol=1e-4, atol=1e-9)
            owned += 1
    assert owned == 2 * sum(1 for s in scores.layout if s.rank == rank)
    total = torch.tensor([sum(float(a.abs().sum()) for part in (scores.local, scores.noise)
                              for a in part.values())])
    dist.all_reduce(total)
    assert float(total) > 0
    after = dmp.state_dict()
    for k, v in before.items():  # scoring never updates the tables (nor anything else)
        a, b = (after[k].local_shards(), v.local_shards()) if hasattr(v, "local_shards") else ([after[k]], [v])
        for x, y in zip(a, b):
            x, y = getattr(x, "tensor", x), getattr(y, "tensor", y)
            assert torch.equal(x, y), k


def test_single_rank_matches_dense_reference() -> None:
    run_ranks(_body, ("table_wise",), world_size=1)


def test_two_ranks_match_dense_reference_tw_rw_cw() -> None:
    run_ranks(_body, ("table_wise", "row_wise", "column_wise"))


def test_calibration_puts_the_mean_prediction_at_the_click_rate() -> None:
    model = _model()
    batch = _batch(0, 0)
    batch.labels[:] = 0
    batch.labels[:2] = 1  # click rate 0.25
    shift = calibrate_output_bias(model, [batch])
    assert shift != 0
    with torch.no_grad():
        _, (_, logits, _) = model(batch)
    assert abs(float(torch.sigmoid(logits).mean()) - 0.25) < 0.02
