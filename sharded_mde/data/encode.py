"""Canonical rows -> model inputs: dense log-transform and vocabulary ids, at preparation and at serving."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

import numpy as np
import pyarrow as pa

from sharded_mde.data.readers import LABEL, Schema
from sharded_mde.data.vocab import Vocabulary


def transform_dense(x: np.ndarray) -> np.ndarray:
    """log(1 + max(x, 0)) as float32, with empty (NaN) values mapped to 0."""
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(np.log1p(np.maximum(x, 0.0)), nan=0.0).astype(np.float32)


class Encoder:
    """Turns canonical tables (label, raw dense, raw sparse strings) into processed tables."""

    def __init__(self, schema: Schema, vocabs: Dict[str, Vocabulary]) -> None:
        self.schema, self.vocabs = schema, vocabs

    @classmethod
    def load(cls, data_dir: Union[str, Path]) -> "Encoder":
        """The encoder of a prepared data directory (its saved vocabularies)."""
        from sharded_mde.data.meta import DatasetMeta

        meta = DatasetMeta.load(data_dir)
        schema = Schema(tuple(meta.dense_features), tuple(meta.sparse_features), tuple(meta.multi_valued))
        return cls(schema, {f: Vocabulary.load(data_dir, f) for f in meta.sparse_features})

    def encode(self, table: pa.Table) -> pa.Table:
        """label float32, dense float32 (log-transformed), sparse int32 ids (list<int32> for multi-valued fields)."""
        cols = {LABEL: table.column(LABEL).cast(pa.float32())} if LABEL in table.column_names else {}
        for n in self.schema.dense:
            raw = table.column(n).cast(pa.float64()).to_numpy()  # nulls become NaN
            cols[n] = pa.array(transform_dense(raw))
        for n in self.schema.sparse:
            if n in self.schema.multi:
                cols[n] = self.vocabs[n].encode_bags(table.column(n))
            else:
                cols[n] = pa.array(self.vocabs[n].encode(table.column(n)))
        return pa.table(cols)
