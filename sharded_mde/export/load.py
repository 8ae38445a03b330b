"""Rebuilding the serving model from an export directory alone.

Each table is served in the dtype it is stored in (the manifest records it per table), or every
table in one dtype asked for at load. fp32 tables load into TorchRec's `EmbeddingBagCollection`;
fp16 / int8 / int4 tables into TorchRec's quantised EBC built from table configs that carry each
table's own weight `data_type` (FBGEMM inference TBEs with fp32 output, rows padded to
`row_alignment`); an export with both gets both behind one lookup (`export.mixed`). Table files
are streamed block by block into the module's storage, converting float rows to the serving dtype
with FBGEMM's row-wise quantiser (the one `quantize_embeddings` uses); int8/int4 rows load as they
are. A PME export's group tables load the same way, inside its token-group module (remap,
per-group lookup, projection, sum: `export.groups`). Every file is checked against the manifest's
sha256 first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import DataType
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

from sharded_mde.dims import SCALE_BIAS_BYTES, serving_table_bytes
from sharded_mde.export.arrowfile import read_weights
from sharded_mde.export.groups import serving_token_groups, token_group_bytes
from sharded_mde.export.manifest import ExportedTable, Manifest, read_manifest, verify_files
from sharded_mde.export.mixed import MixedPrecisionEBC
from sharded_mde.export.serve import ServingModel
from sharded_mde.export.tablefile import DTYPES, QUANT_BITS, encode, read_blocks, to_float
from sharded_mde.modules.heads import build_head, projected_fields
from sharded_mde.train.state import SPARSE_ARCH

_DATA_TYPE = {"fp32": DataType.FP32, "fp16": DataType.FP16, "int8": DataType.INT8, "int4": DataType.INT4}


def _converted_blocks(root: Path, t: ExportedTable, dtype: str) -> Iterator[Tuple[int, torch.Tensor]]:
    """(first row, rows in `dtype`'s stored form) per block of table `t`."""
    if t.dtype not in DTYPES:
        raise ValueError(f"{root / t.file}: unknown dtype {t.dtype!r} in the manifest")
    if t.dtype != dtype and t.dtype in QUANT_BITS:
        raise ValueError(f"{root / t.file}: stored as {t.dtype}, which cannot be served as {dtype} "
                         "(export fp32 or fp16 to choose the serving dtype at load)")
    for r0, rows in read_blocks(root / t.file, t.rows, t.dim, t.dtype):
        yield r0, rows if t.dtype == dtype else encode(to_float(rows, t.dim, t.dtype), dtype)


def served_dtypes(manifest: Manifest, dtype: Optional[str] = None) -> Dict[str, str]:
    """Each table's serving dtype, by name: `dtype` for every table when given, else the dtype it is stored in."""
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"serving dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return {t.name: dtype or t.dtype for t in manifest.tables}


def dtype_label(dtypes: Mapping[str, str]) -> str:
    """The one dtype all tables are served in, or "mixed" (fp32 for an export without tables)."""
    found = set(dtypes.values())
    return found.pop() if len(found) == 1 else "mixed" if found else "fp32"


@torch.no_grad()
def _float_ebc(root: Path, tables: Sequence[ExportedTable], device: torch.device) -> EmbeddingBagCollection:
    """A TorchRec EBC (fp32) of `tables`, filled from their files."""
    ebc = EmbeddingBagCollection(tables=[t.config() for t in tables], device=torch.device("meta"))
    ebc = ebc.to_empty(device=device)
    for t in tables:
        weight = ebc.embedding_bags[t.name].weight
        for r0, rows in _converted_blocks(root, t, "fp32"):
            weight[r0:r0 + rows.shape[0]].copy_(rows.view(torch.float32))
    return ebc


@torch.no_grad()
def _quant_ebc(root: Path, tables: Sequence[ExportedTable], dtypes: Mapping[str, str], row_alignment: int,
               device: torch.device) -> QuantEmbeddingBagCollection:
    """TorchRec's quantised EBC of `tables`, each with its weight dtype from `dtypes`, filled from their files."""
    by_name = {t.name: t for t in tables}
    qebc = QuantEmbeddingBagCollection(
        [t.config(_DATA_TYPE[dtypes[t.name]]) for t in tables], is_weighted=False, device=device,
        output_dtype=torch.float, register_tbes=True, row_alignment=row_alignment)
    for tbe in qebc.tbes:
        for spec, (weight, scale_bias) in zip(tbe.embedding_specs, tbe.split_embedding_weights()):
            data_bytes = weight.shape[1]
            for r0, rows in _converted_blocks(root, by_name[spec[0]], dtypes[spec[0]]):
                n = rows.shape[0]
                weight[r0:r0 + n].copy_(rows[:, :data_bytes])
                if scale_bias is not None:  # fused rows end with the fp16 scale and bias
                    scale_bias[r0:r0 + n].copy_(rows[:, data_bytes:data_bytes + SCALE_BIAS_BYTES])
    return qebc


def load_tables(root: str | Path, manifest: Manifest, dtype: Optional[str] = None, row_alignment: int = 1,
                device: torch.device = torch.device("cpu")) -> nn.Module:
    """The export's tables, each in its stored dtype (or all in `dtype`): an EBC when all are fp32, TorchRec's
    quantised EBC when none is, else both behind one lookup (`MixedPrecisionEBC`)."""
    dtypes = served_dtypes(manifest, dtype)
    root = Path(root)
    floats = [t for t in manifest.tables if dtypes[t.name] == "fp32"]
    quantised = [t for t in manifest.tables if dtypes[t.name] != "fp32"]
    if not quantised:
        return _float_ebc(root, floats, device)
    qebc = _quant_ebc(root, quantised, dtypes, row_alignment, device)
    return MixedPrecisionEBC(_float_ebc(root, floats, device), qebc) if floats else qebc


def serving_bytes(manifest: Manifest, dtype: Optional[str] = None, row_alignment: int = 1) -> int:
    """Bytes the serving tables take, each in its stored dtype (or all in `dtype`), from the one serving
    byte model (`dims.serving_table_bytes`). For token groups, the remap and the (fp32) group projections
    are counted too."""
    return sum(serving_bytes_by_table(manifest, dtype, row_alignment).values()) + token_group_bytes(manifest)


def serving_bytes_by_table(manifest: Manifest, dtype: Optional[str] = None, row_alignment: int = 1) -> Dict[str, int]:
    """`dims.serving_table_bytes` of each table of the export, served in its stored dtype (or `dtype`)."""
    dtypes = served_dtypes(manifest, dtype)
    return {t.name: serving_table_bytes(t.rows, t.dim, dtypes[t.name], row_alignment) for t in manifest.tables}


def load_export(
    root: str | Path,
    dtype: Optional[str] = None,
    row_alignment: int = 1,
    device: torch.device = torch.device("cpu"),
    verify: bool = True,
) -> ServingModel:
    """The serving model of an export: its tables, each as stored (or all as `dtype`), and its head.

    With `verify`, every file's size and sha256 are checked against the manifest first.

    Args:
        root (str | Path): the export directory.
        dtype (Optional[str]): one dtype to serve every table in (fp32, fp16, int8, int4; default: each as stored).
        row_alignment (int): row alignment of quantised tables.
        device (torch.device): where to load.
        verify (bool): check sizes and checksums first.

    Example::

        serving = load_export("runs/demo/export", dtype="int8")
        logits = serving(dense_features, sparse_features)
    """
    root = Path(root)
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    ebc = load_tables(root, manifest, dtype, row_alignment, device)
    sparse = ebc if manifest.token_groups is None else serving_token_groups(root, manifest, ebc)
    h = manifest.head
    weights = read_weights(root / h.weights_file)
    head = build_head(h.kind, sparse, {f.name: f.dim for f in manifest.features},
                      h.dense_in_features, list(h.dense_arch), list(h.over_arch), h.dcn_layers, h.dcn_rank,
                      h.full_width, projected_fields(weights))
    expected = {k for k in head.state_dict() if not k.startswith(SPARSE_ARCH)}
    if set(weights) != expected:
        extra = sorted(set(weights) ^ expected)
        raise ValueError(f"{root / h.weights_file}: weight {extra[0]} does not match head {h.kind!r} "
                         "built from the manifest")
    try:
        head.load_state_dict(weights, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{root / h.weights_file}: weights do not fit the head in the manifest "
                         f"({str(e).splitlines()[-1].strip()})") from None
    model = ServingModel(head.to(device))
    model.eval()
    return model
