"""PME's scoring rows: `scoring_batches` streams only the rows it scores, and they are the right rows."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sharded_mde.config import DataConfig
from sharded_mde.data import prepare
from sharded_mde.data.readers import LABEL
from sharded_mde.search import pme_data
from sharded_mde.search.pme_data import scoring_batches


@pytest.mark.parametrize("read_rows", [64, 1 << 16])  # reads cut across batches and ranks, or one read
def test_scoring_batches_are_each_ranks_consecutive_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         read_rows: int) -> None:
    meta = prepare(DataConfig(format="synth", dir=str(tmp_path / "data"), synth_rows=3000, synth_num_sparse=3,
                              synth_num_dense=2, synth_vocab_min=20, synth_vocab_max=200), progress=False)
    monkeypatch.setattr(pme_data, "READ_ROWS", read_rows)
    rows = pa.concat_tables([pq.read_table(p) for p, _ in meta.split_parts("train")])
    batch, n, world = 50, 3, 2
    for rank in range(world):
        got = list(scoring_batches(tmp_path / "data", batch, n, rank, world))
        assert len(got) == n
        for b, x in enumerate(got):
            want = rows.slice(rank * n * batch + b * batch, batch)
            assert torch.equal(x.labels, torch.as_tensor(want.column(LABEL).to_numpy()).to(x.labels.dtype))
            ids = x.sparse_features.to_dict()[meta.sparse_features[1]].values()
            assert torch.equal(ids, torch.as_tensor(want.column(meta.sparse_features[1]).to_numpy()).long())
    with pytest.raises(ValueError, match="scoring needs"):
        next(scoring_batches(tmp_path / "data", 1000, 2, 0, world))
