"""The TBE benchmark's kernel set-up (sharded_mde/bench/tbe.py): FBGEMM's fused table-batched embedding
computes per-table sums of the right rows at mixed dims and applies row-wise Adagrad in its backward.
On CPU here; the same checks on CUDA (marked gpu) on a GPU machine, where `sharded-mde bench speed` times it."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagConfig

from sharded_mde.bench.tbe import build_tbe, tbe_inputs, tbe_times
from sharded_mde.dims import table_bytes

BATCH = 16
LR = 0.05


def _tables(dims=(8, 4, 12)) -> list:
    return [EmbeddingBagConfig(name=f"t{i}", num_embeddings=rows, embedding_dim=d, feature_names=[f"f{i}"])
            for i, (rows, d) in enumerate(zip((50, 30, 70), dims))]


def _check_forward_and_update(device: torch.device) -> None:
    tables = _tables()
    tbe = build_tbe(tables, device, "rowwise_adagrad", LR)
    indices, offsets = tbe_inputs(tables, BATCH, device)
    before = [w.detach().clone().cpu() for w in tbe.split_embedding_weights()]
    ids = indices.view(len(tables), BATCH).cpu()
    out = tbe(indices, offsets)
    expected = torch.cat([w[i] for w, i in zip(before, ids)], dim=1)
    assert out.shape == (BATCH, sum(t.embedding_dim for t in tables))
    torch.testing.assert_close(out.detach().cpu(), expected)
    out.backward(torch.ones_like(out))
    after = [w.detach().cpu() for w in tbe.split_embedding_weights()]
    for t, w0, w1, i in zip(tables, before, after, ids):
        touched = torch.zeros(t.num_embeddings, dtype=torch.bool)
        touched[i] = True
        # Row-wise Adagrad with a gradient of c ones on a row: state = c^2, step = lr * c / sqrt(c^2) = lr.
        torch.testing.assert_close(w1[touched], w0[touched] - LR, atol=1e-5, rtol=0)
        torch.testing.assert_close(w1[~touched], w0[~touched])


def test_tbe_sums_rows_and_applies_rowwise_adagrad_cpu():
    _check_forward_and_update(torch.device("cpu"))


@pytest.mark.gpu
def test_tbe_sums_rows_and_applies_rowwise_adagrad_cuda():
    _check_forward_and_update(torch.device("cuda"))


def test_tbe_times_reports_both_sets_with_their_bytes():
    full, compact = _tables(), _tables((4, 4, 4))[:2]  # the compact set also drops a table
    out = tbe_times({"full": full, "compact": compact}, BATCH, torch.device("cpu"), repeats=2)
    for name, tables in (("full", full), ("compact", compact)):
        row = out[name]
        assert row["tables"] == len(tables) and row["dims_sum"] == sum(t.embedding_dim for t in tables)
        assert row["bytes"] == sum(table_bytes(t.num_embeddings, t.embedding_dim, "fp32", "rowwise_adagrad").total
                                   for t in tables)
        assert row["forward_ms"] > 0 and row["forward_backward_ms"] > 0
    assert out["compact"]["bytes"] < out["full"]["bytes"]
