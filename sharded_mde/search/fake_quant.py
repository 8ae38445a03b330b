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

from sharded_mde.dims import TableDims, group_name
from sharded_mde.dims.file import serving_dtypes
from sharded_mde.export.quantize import fake_quantize_table
from sharded_mde.train.state import table_of


def table_pieces(model: nn.Module, names: Sequence[str]) -> List[Tuple[str, torch.Tensor]]:
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
                   columns: Optional[Mapping[str, Sequence[int]]] = None, zero_others: bool = False) -> Iterator[None]:
    """Within the block, each table of `dtypes` holds its weights fake-quantised to its dtype (over
    `columns[table]` only, when given: the other columns are left as they are, or zeroed with
    `zero_others`, for every table of `columns`: a table served at those columns only); restored on exit.

    Args:
        model (nn.Module): a plain or DMP-wrapped model whose tables are `embedding_bags.<table>.weight`.
        dtypes (Mapping[str, str]): table -> fp32 | fp16 | int8 | int4 (fp32 leaves the table as it is).
        columns (Optional[Mapping[str, Sequence[int]]]): table -> the columns a served row holds.
        zero_others (bool): zero the columns outside `columns[table]` (a narrower table, e.g. a PME group).

    Example::

        with fake_quantized(trainer.dmp, {"t_C1": "int4"}):
            metrics = trainer.evaluate("valid")
    """
    names = [n for n, q in dtypes.items() if q != "fp32"]
    if zero_others and columns is not None:
        names += [n for n in columns if n not in names]
    saved: List[Tuple[torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for name, w in table_pieces(model, names):
                saved.append((w, w.detach().clone()))
                q = dtypes.get(name, "fp32")
                cols = None if columns is None or name not in columns else torch.as_tensor(list(columns[name]),
                                                                                          dtype=torch.long)
                if cols is None:
                    w.copy_(fake_quantize_table(w, q))
                    continue
                if len(cols) and q != "fp32":
                    w[:, cols] = fake_quantize_table(w[:, cols], q)
                if zero_others:
                    others = torch.ones(w.shape[1], dtype=torch.bool)
                    others[cols] = False
                    w[:, others] = 0.0
        yield
    finally:
        with torch.no_grad():
            for w, orig in saved:
                w.copy_(orig)


def served_dtypes(tables: Sequence[TableDims]) -> Dict[str, str]:
    """Model table -> serving dtype other than fp32, for the tables a compact model of these dims-file entries
    holds with rows (`dims.file.serving_dtypes`, fp32 where none is set)."""
    held = {group_name(t.name, g.size) for t in tables for g in t.groups if g.size and g.rows}
    held |= {t.name for t in tables if not t.groups and t.dim}
    return {name: q for name, q in serving_dtypes(tables, "fp32").items() if name in held and q != "fp32"}


class QuantAwareTables:
    """Quantisation-aware training of tables with a fused (in-backward) optimizer: a trainer callback.

    Over the last `fraction` of the training steps, the tables of `dtypes` hold their fake-quantised weights Q(W) during each step's
    forward and backward, while fp32 shadow weights W take the updates (the straight-through estimator):
    the fused optimizer moves the table from Q(W) to Q(W) + delta, so after each step W <- W + delta and the
    table is set to Q(W) for the next step. The training ends with the tables at Q(W), what serving
    holds. The shadow weights are checkpointed with the trainer (`state_dict`), so a resumed run goes on
    exactly. Tables must hold whole rows on each rank (see `fake_quantized`).

    Example::

        qat = QuantAwareTables({"t_C1": "int4"}, fraction=0.3)
        train_stage(cfg, env, "retrain", model=model, tables=tables, callbacks=[qat])
    """

    def __init__(self, dtypes: Mapping[str, str], fraction: float) -> None:
        self.dtypes = {n: q for n, q in dtypes.items() if q != "fp32"}
        self.fraction = float(fraction)
        self.shadow: Optional[List[torch.Tensor]] = None  # W per local piece, in `table_pieces` order
        self.served: Optional[List[torch.Tensor]] = None  # Q(W) the table held during the step

    @torch.no_grad()
    def on_step_end(self, trainer: object, step: int) -> None:
        """After step `step`: take the step's update into W and set the tables to Q(W) (in the last `fraction`)."""
        total = trainer.total_steps  # type: ignore[attr-defined]
        if step < total - int(round(self.fraction * total)):
            return  # before the quantisation-aware steps
        pieces = table_pieces(trainer.dmp, list(self.dtypes))  # type: ignore[attr-defined]
        if self.shadow is None:  # the first quantised step: W is the table as trained so far
            self.shadow = [w.detach().clone() for _, w in pieces]
        else:
            for (_, w), shadow, served in zip(pieces, self.shadow, self.served):
                shadow.add_(w - served)
        self.served = []
        for (name, w), shadow in zip(pieces, self.shadow):
            q = fake_quantize_table(shadow, self.dtypes[name])
            w.copy_(q)
            self.served.append(q)

    def on_eval(self, trainer: object, step: int, metrics: Dict[str, float]) -> None:
        """Nothing to record."""

    def state_dict(self) -> Dict[str, object]:
        """The shadow weights and the quantised tables of the last step (None before `start`)."""
        return {"shadow": self.shadow, "served": self.served}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Restores the shadow weights on resume."""
        self.shadow, self.served = state["shadow"], state["served"]  # type: ignore[assignment]
