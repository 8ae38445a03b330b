"""Compact export on one process: shard assembly, dtypes against TorchRec's quantiser, sizes, bad input, atomicity."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.inference.modules import quantize_embeddings
from torchrec.quant.embedding_modules import quant_prep_customize_row_alignment

from ckpt_utils import cut, write_pieces

from sharded_mde.config import ExportConfig, ModelConfig
from sharded_mde.export import export_compact, load_export, load_tables, read_manifest, script, serving_bytes
from sharded_mde.modules.model import build_model
from sharded_mde.dims import DimsFile, TableDims, table_bytes
from sharded_mde.train.checkpoint import MODEL as SAVED_MODEL

FEATURES = ["a", "b", "c"]
N_DENSE = 3
MODEL = ModelConfig(head="dlrm", dense_arch=[8, 8], over_arch=[8, 1])


def _tables(spec: List[Tuple[str, int, int]]) -> List[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t_{f}", num_embeddings=r, embedding_dim=d, feature_names=[f]) for f, r, d in spec]


SPEC = [("a", 53, 16), ("b", 31, 8), ("c", 40, 12)]


def _model(spec=SPEC):
    torch.manual_seed(0)
    return build_model(MODEL, _tables(spec), FEATURES, N_DENSE, device=torch.device("cpu"))


def _write_checkpoint(root: Path, state: Dict[str, torch.Tensor], cuts: Dict[str, Tuple[str, List[int]]]) -> Path:
    """A checkpoint whose table `t` is saved in pieces cut at rows ("rw") or columns ("cw")."""
    key = "model.sparse_arch.embedding_bags.{}.weight".format
    return write_pieces(root, 7, state, {key(t): cut(state[key(t)], how, at) for t, (how, at) in cuts.items()})


def _kjt(spec=SPEC, b: int = 9, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(spec) * b,), generator=g, dtype=torch.int32)
    values = torch.cat([torch.randint(0, r, (int(lengths[i * b:(i + 1) * b].sum()),), generator=g)
                        for i, (_, r, _) in enumerate(spec)])
    return KeyedJaggedTensor.from_lengths_sync(keys=[f for f, _, _ in spec], values=values, lengths=lengths)


def _dims(kept: Dict[str, List[int]], spec=SPEC) -> DimsFile:
    tables = [TableDims(name=f"t_{f}", features=[f], num_embeddings=r, full_dim=d, dim=len(kept[f"t_{f}"]),
                        kept_columns=kept[f"t_{f}"], bytes=table_bytes(r, len(kept[f"t_{f}"])).total) for f, r, d in spec]
    k = sum(t.bytes for t in tables)
    return DimsFile(method="ham", budget_fraction=0.5, budget_bytes=k, full_bytes=sum(table_bytes(r, d).total for _, r, d in spec),
                    kept_bytes=k, tables=tables)


def _export(tmp_path: Path, name: str = "out", dtype: str = "fp32", **kw) -> Path:
    model = _model()
    ckpt = _write_checkpoint(tmp_path / "ckpt", model.state_dict(), {"t_a": ("rw", [10, 11, 40]), "t_c": ("cw", [4, 8])})
    export_compact(ckpt, tmp_path / name, MODEL, FEATURES, N_DENSE, _tables(SPEC), export_cfg=ExportConfig(dtype=dtype, block_rows=7),
                   progress=False, **kw)
    return tmp_path / name


def test_uneven_row_and_column_shards_are_stitched_into_the_kept_columns(tmp_path: Path) -> None:
    model = _model()
    state = model.state_dict()
    ckpt = _write_checkpoint(tmp_path / "ckpt", state, {"t_a": ("rw", [10, 11, 40]), "t_c": ("cw", [4, 8])})
    kept = {"t_a": [1, 2, 3, 4, 8, 9, 14, 15], "t_b": list(range(8)), "t_c": [8, 9, 10, 11]}  # t_c: shards 0, 1 hold none
    export_compact(ckpt, tmp_path / "out", MODEL, FEATURES, N_DENSE, _tables(SPEC), dims=_dims(kept),
                   export_cfg=ExportConfig(block_rows=7), progress=False)
    manifest = read_manifest(tmp_path / "out")
    ebc = load_tables(tmp_path / "out", manifest)
    for t in manifest.tables:
        full = state[f"model.sparse_arch.embedding_bags.{t.name}.weight"]
        assert t.kept_columns == kept[t.name]
        assert torch.equal(ebc.embedding_bags[t.name].weight.detach(), full[:, kept[t.name]])
    assert not list(tmp_path.glob(".out.*")), "no staging directory may be left behind"


def test_quantised_serving_equals_torchrec_quantize_embeddings(tmp_path: Path) -> None:
    root = _export(tmp_path)
    manifest = read_manifest(root)
    kjt = _kjt()
    for dtype, qdtype in (("fp16", torch.float16), ("int8", torch.qint8), ("int4", torch.quint4x2)):
        float_ebc = load_tables(root, manifest, "fp32")
        quant_prep_customize_row_alignment(float_ebc, [EmbeddingBagCollection], 1)
        ref = quantize_embeddings(torch.nn.Sequential(float_ebc), dtype=qdtype, inplace=False)[0](kjt).to_dict()
        ours = load_tables(root, manifest, dtype, row_alignment=1)(kjt).to_dict()
        for f in FEATURES:
            assert torch.equal(ours[f], ref[f]), (dtype, f)
    # int8 rows stored at export are the rows a fp32 export quantises at load
    stored = _export(tmp_path, "int8", dtype="int8")
    a, b = load_export(root, "int8"), load_export(stored)
    dense = torch.randn(9, N_DENSE)
    assert torch.equal(a(dense, kjt), b(dense, kjt))
    with pytest.raises(ValueError, match=r"int8/tables/t_a.arrow: stored as int8, which cannot be served as fp32"):
        load_export(stored, "fp32")


def test_serving_model_scripts_and_matches_the_model(tmp_path: Path) -> None:
    root = _export(tmp_path)
    model = _model()
    kjt, dense = _kjt(seed=3), torch.randn(9, N_DENSE)
    for dtype in ("fp32", "int8"):
        serving = load_export(root, dtype)
        scripted = script(serving)
        assert isinstance(scripted, torch.jit.ScriptModule)
        assert torch.equal(scripted(dense, kjt), serving(dense, kjt))
    assert torch.equal(load_export(root)(dense, kjt), model.model(dense, kjt).squeeze(-1))


@pytest.mark.parametrize("dtype,elem", [("fp32", 4), ("fp16", 2)])
def test_export_size_is_within_2_percent_of_the_kept_table_bytes(tmp_path: Path, dtype: str, elem: int) -> None:
    spec = [("a", 20000, 16), ("b", 9000, 8), ("c", 6000, 12)]
    torch.manual_seed(0)
    model = build_model(MODEL, _tables(spec), FEATURES, N_DENSE, device=torch.device("cpu"))
    ckpt = _write_checkpoint(tmp_path / "ckpt", model.state_dict(), {"t_a": ("rw", [7000]), "t_c": ("cw", [4])})
    kept = {"t_a": list(range(0, 16, 2)), "t_b": [0, 1, 2, 3], "t_c": list(range(12))}
    manifest = export_compact(ckpt, tmp_path / "out", MODEL, FEATURES, N_DENSE, _tables(spec), dims=_dims(kept, spec),
                              export_cfg=ExportConfig(dtype=dtype, block_rows=4096), progress=False)
    raw = sum(r * len(kept[f"t_{f}"]) * elem for f, r, _ in spec)
    on_disk = manifest.table_bytes() + (tmp_path / "out" / "manifest.json").stat().st_size
    assert raw < on_disk <= 1.02 * raw + (tmp_path / "out" / "manifest.json").stat().st_size
    line = 1 if dtype == "fp32" else 128  # FBGEMM's inference TBE pads each table to a 128-byte line
    assert serving_bytes(manifest, dtype) == sum(-(-r * len(kept[f"t_{f}"]) * elem // line) * line for f, r, _ in spec)


def _edit_manifest(root: Path, fn) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_bad_exports_fail_naming_the_file(tmp_path: Path) -> None:
    root = _export(tmp_path)
    table = root / "tables" / "t_b.arrow"
    data = bytearray(table.read_bytes())
    data[-200] ^= 0xFF
    table.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"t_b\.arrow: checksum mismatch"):
        load_export(root)

    root = _export(tmp_path, "missing")
    (root / "head.arrow").unlink()
    with pytest.raises(ValueError, match=r"missing/head\.arrow: listed in .*manifest\.json but missing"):
        load_export(root)

    # A damaged checksum in the manifest: not hex is the manifest's fault; another valid digest is
    # a mismatch between the two files, and the message names both.
    root = _export(tmp_path, "badhex")
    _edit_manifest(root, lambda m: m["files"]["head.arrow"].update(sha256="g" + m["files"]["head.arrow"]["sha256"][1:]))
    with pytest.raises(ValueError, match=r"badhex/manifest\.json: files\['head\.arrow'\]: needs .* hex sha256"):
        load_export(root)
    root = _export(tmp_path, "otherhex")
    _edit_manifest(root, lambda m: m["files"]["head.arrow"].update(sha256="0" * 64))
    with pytest.raises(ValueError, match=r"otherhex/head\.arrow: checksum mismatch with its entry in .*otherhex/manifest\.json"):
        load_export(root)

    root = _export(tmp_path, "newer")
    _edit_manifest(root, lambda m: m.update(format_version=99))
    with pytest.raises(ValueError, match=r"newer/manifest\.json: written with export format_version 99"):
        load_export(root)

    root = _export(tmp_path, "shape")
    _edit_manifest(root, lambda m: m["tables"][2].update(rows=41))
    with pytest.raises(ValueError, match=r"shape/tables/t_c\.arrow: holds 40 rows but the manifest says 41"):
        load_export(root)
    _edit_manifest(root, lambda m: m["tables"][2].update(rows=40, dim=8))
    with pytest.raises(ValueError, match=r"shape/tables/t_c\.arrow: rows are fixed_size_list<item: float>\[12\] but the manifest says 8 columns of fp32"):
        load_export(root)

    with pytest.raises(ValueError, match=r"manifest\.json: export manifest not found"):
        load_export(tmp_path / "ckpt")


def test_failed_export_leaves_nothing_and_existing_export_is_kept(tmp_path: Path) -> None:
    root = _export(tmp_path)
    before = (root / "manifest.json").read_text()
    with pytest.raises(ValueError, match="already exists"):
        _export(tmp_path)
    # a checkpoint that lacks rows of one table fails after other tables were written
    state = _model().state_dict()
    ckpt = _write_checkpoint(tmp_path / "holes", state, {"t_c": ("rw", [20])})
    metadata = dcp.FileSystemReader(ckpt).read_metadata()  # drop the piece of rows [20, 40) from the checkpoint
    metadata.state_dict_metadata[f"{SAVED_MODEL}.model.sparse_arch.embedding_bags.t_c.weight"].chunks.pop()
    with open(ckpt / ".metadata", "wb") as f:
        pickle.dump(metadata, f)
    with pytest.raises(ValueError, match=r"table t_c: rows \[20, 40\) are in no checkpoint shard"):
        export_compact(ckpt, root, MODEL, FEATURES, N_DENSE, _tables(SPEC), overwrite=True, progress=False)
    assert (root / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    load_export(root)
