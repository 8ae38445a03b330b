"""Fake quantisation of a table: the float weights a table serves with after the export stores it as a dtype.

The export stores rows with `tablefile.encode` (fp16 casts; int8/int4 FBGEMM's fused row-wise
quantiser, the one TorchRec's `quantize_embeddings` uses) and the loader hands those bytes to
TorchRec's quantised EBC unchanged. `fake_quantize_table` runs the same encode, then FBGEMM's own
dequantiser, so a float model with a table replaced by its fake-quantised weights scores what the
served model scores (up to the TBE's summation order): the search can price a table's precision
without exporting.
"""

from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch

from sharded_mde.dims import legal_serving_dim, serving_dim_multiple
from sharded_mde.export.tablefile import DTYPES, QUANT_BITS, encode, to_float


def dequantize_rows(rows: torch.Tensor, dim: int, dtype: str) -> torch.Tensor:
    """Stored rows (n, row_bytes) uint8 of `dtype` -> float32 (n, dim), as FBGEMM's reference dequantiser reads them."""
    if dtype in QUANT_BITS:
        return torch.ops.fbgemm.FusedNBitRowwiseQuantizedSBHalfToFloat(rows.contiguous(), QUANT_BITS[dtype])[:, :dim]
    return to_float(rows, dim, dtype)


@torch.no_grad()
def fake_quantize_table(weight: torch.Tensor, dtype: str) -> torch.Tensor:
    """`weight` (rows, dim) quantised to `dtype` (fp32 | fp16 | int8 | int4) and back: float32, same shape.

    Exactly the rows the export writes for a table served as `dtype`, dequantised by FBGEMM. Raises a
    one-line ValueError for an unknown dtype or a dim that dtype cannot hold (int8: even, int4: % 4).
    """
    if dtype not in DTYPES:
        raise ValueError(f"fake_quantize_table: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if weight.dim() != 2:
        raise ValueError(f"fake_quantize_table: weight must be (rows, dim), got shape {tuple(weight.shape)}")
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    rows, dim = w.shape
    if dtype == "fp32" or rows == 0 or dim == 0:
        return w.clone().to(weight.device)
    if not legal_serving_dim(dim, dtype):
        raise ValueError(f"fake_quantize_table: {dtype} needs a dim that is a multiple of "
                         f"{serving_dim_multiple(dtype)}, got {dim}")
    return dequantize_rows(encode(w, dtype), dim, dtype).to(weight.device)
