"""Fake-quantised tables in a live model: what the model scores when its tables serve as fp16/int8/int4.

`fake_quantized(model, dtypes)` replaces, in place and for the duration of a `with` block, each named
table's weights by `export.quantize.fake_quantize_table` of them (the export's own encode, then
FBGEMM's dequantiser), optionally only over some of its columns (a supernet's kept columns, which
are the rows a compact table of those columns would serve). It works on a plain model and under
DistributedModelParallel where each rank holds whole rows of its shards (table-wise, row-wise,
data-parallel): FBGEMM quantises a row over all its columns, so a column-wise shard cannot be
quantised on its own and is refused.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from sharded_mde.export.quantize import fake_quantize_table
from sharded_mde.train.state import table_of


def _pieces(model: nn.Module, names: Sequence[str]) -> List[Tuple[str, torch.Tensor]]:
    """(table, local tensor holding whole rows) of every listed table in the model's state dict."""
    out = []
    for key, value in model.state_dict().items():
        name = table_of(key)
        if name is None or name not in names:
            continue
        if isinstance(value, ShardedTensor):
            full_dim = value.size()[1]
            for s in value.local_shards():
                if s.metadata.shard_offsets[1] != 0 or s.tensor.shape[1] != full_dim:
                    raise ValueError(f"table {name}: a column-wise shard cannot be fake-quantised (FBGEMM quantises "
                                     "whole rows); shard it table- or row-wise")
                out.append((name, s.tensor))
        else:
            out.append((name, value))
    return out


@contextlib.contextmanager
def fake_quantized(model: nn.Module, dtypes: Mapping[str, str],
                   columns: Optional[Mapping[str, Sequence[int]]] = None) -> Iterator[None]:
    """Within the block, each table of `dtypes` holds its weights fake-quantised to its dtype (over
    `columns[table]` only, when given: the other columns are left as they are); restored on exit.

    Args:
        model (nn.Module): a plain or DMP-wrapped model whose tables are `embedding_bags.<table>.weight`.
        dtypes (Mapping[str, str]): table -> fp32 | fp16 | int8 | int4 (fp32 leaves the table as it is).
        columns (Optional[Mapping[str, Sequence[int]]]): table -> the columns a served row holds.

    Example::

        with fake_quantized(trainer.dmp, {"t_C1": "int4"}):
            metrics = trainer.evaluate("valid")
    """
    names = [n for n, q in dtypes.items() if q != "fp32"]
    saved: List[Tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, w in _pieces(model, names):
                saved.append((w, w.detach().clone()))
                cols = None if columns is None or name not in columns else torch.as_tensor(list(columns[name]),
                                                                                          dtype=torch.long)
                if cols is None:
                    w.copy_(fake_quantize_table(w, dtypes[name]))
                elif len(cols):
                    w[:, cols] = fake_quantize_table(w[:, cols], dtypes[name])
        yield
    finally:
        with torch.no_grad():
            for w, orig in saved:
                w.copy_(orig)


def served_dtypes(tables: Sequence[object]) -> Dict[str, str]:
    """Table -> dtype of the dims-file entries (TableDims) that name a serving dtype other than fp32."""
    return {t.name: t.dtype for t in tables if getattr(t, "dtype", "") not in ("", "fp32") and t.dim > 0}
