"""tools/learned_rank.py: weighted principal directions of a table, truncation, and the spectrum figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("learned_rank", ROOT / "tools" / "learned_rank.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rank2_table(rows: int = 400, dim: int = 16, noise: float = 1e-4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return 0.3 + torch.randn(rows, 2, generator=g) @ torch.randn(2, dim, generator=g) + noise * torch.randn(rows, dim, generator=g)


def test_rank_two_table_has_two_directions():
    tool = _tool()
    table = _rank2_table()
    mean, var, vec = tool.principal_directions(table, torch.ones(table.shape[0], dtype=torch.float64))
    stats = tool.spectrum_stats(var)
    assert stats["k95"] <= 2 and 1.0 < stats["effective_rank"] < 2.0 + 1e-6
    assert stats["top4_share"] > 0.9999 and var[0] >= var[1] >= var[2]
    assert torch.allclose(tool.truncate(table, mean, vec, 2), table, atol=1e-3)
    assert not torch.allclose(tool.truncate(table, mean, vec, 1), table, atol=1e-2)
    assert torch.allclose(tool.truncate(table, mean, vec, table.shape[1]), table, atol=1e-5)


def test_rows_without_count_do_not_shape_the_directions():
    tool = _tool()
    table = _rank2_table()
    g = torch.Generator().manual_seed(1)
    table[:100] = 5 * torch.randn(100, table.shape[1], generator=g)  # full-rank rows, never seen in training
    weights = torch.ones(table.shape[0], dtype=torch.float64)
    weights[:100] = 0
    _, var, _ = tool.principal_directions(table, weights)
    assert tool.spectrum_stats(var)["k95"] <= 2
    _, var_all, _ = tool.principal_directions(table, torch.ones_like(weights))
    assert tool.spectrum_stats(var_all)["k95"] > 2


def test_planted_share_separates_signal_from_noise():
    """A table that maps the planted vectors linearly has share 1; added noise lowers it; unseen rows do not count."""
    import numpy as np

    tool = _tool()
    g = torch.Generator().manual_seed(2)
    vectors = torch.randn(300, 8, generator=g)
    vectors[:, 3:] = 0  # rank 3, as a factorised field's token vectors
    table = 0.5 + vectors @ torch.randn(8, 16, generator=g)
    weights = torch.ones(300, dtype=torch.float64)
    assert tool.planted_share(table, weights, vectors.numpy()) > 0.9999
    noisy = table + 0.5 * torch.randn(300, 16, generator=g)
    assert 0.3 < tool.planted_share(noisy, weights, vectors.numpy()) < 0.95
    assert tool.planted_share(torch.randn(300, 16, generator=g), weights, vectors.numpy()) < 0.1
    garbage = table.clone()
    garbage[:50] = 10 * torch.randn(50, 16, generator=g)
    weights[:50] = 0
    assert tool.planted_share(garbage, weights, vectors.numpy()) > 0.9999
    assert tool.planted_share(table, weights, np.zeros((300, 8), dtype=np.float32)) == 0.0
