"""Tables of several serving dtypes behind one lookup: fp32 tables in TorchRec's EBC, the rest in its quantised EBC.

The fp32 tables stay in TorchRec's float `EmbeddingBagCollection`, the lookup the model trained and
was evaluated with, so they score exactly as in the search's evaluation and cost rows x dim x 4
bytes (the byte model's fp32 figure); the fp16 / int8 / int4 tables share TorchRec's quantised EBC,
whose table configs carry each table's own `data_type` (one FBGEMM inference TBE holds them all).
No `from __future__ import annotations` here: TorchRec's fx trace runs through this forward.
"""

from typing import List

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor


class MixedPrecisionEBC(nn.Module):
    """One `KeyedTensor` (keys: the fp32 tables' features, then the quantised tables') from a float and a quantised EBC."""

    def __init__(self, float_ebc: EmbeddingBagCollection, quant_ebc: QuantEmbeddingBagCollection) -> None:
        super().__init__()
        self.float_ebc = float_ebc
        self.quant_ebc = quant_ebc

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """Pooled embeddings of every table; `features` may hold keys no table reads."""
        a = self.float_ebc(features)
        b = self.quant_ebc(features)
        # keys and widths are the sub-modules' static lists, so the fx trace keeps them as constants
        return KeyedTensor(keys=a.keys() + b.keys(), length_per_key=a.length_per_key() + b.length_per_key(),
                           values=torch.cat([a.values(), b.values()], dim=1))

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The table configs of both parts (the quantised ones with their weight `data_type`)."""
        return list(self.float_ebc.embedding_bag_configs()) + list(self.quant_ebc.embedding_bag_configs())
