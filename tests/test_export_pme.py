"""Export of a PME token-group model trained on 2 gloo ranks: served outputs equal the trained model's.

A tiny planted data set is searched (method pme) and retrained on 2 ranks (row-wise shards); the
export of the retrain's sharded checkpoint is served from its files alone (group tables, remap,
projections, head) and must give the trained model's test logits and AUC; a damaged remap is refused.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml

from dist_utils import run_ranks
from sharded_mde.config import load_config
from sharded_mde.data import DatasetMeta, iterate_eval_batches, prepare
from sharded_mde.export import fake_quantize_table, load_export, read_manifest, serving_bytes
from sharded_mde.export.arrowfile import read_arrow, write_arrow
from sharded_mde.export.groups import REMAP_FILE, group_tables, token_group_bytes
from sharded_mde.export.stage import export_bytes, export_stage, serve_check
from sharded_mde.io import atomic_torch_save, read_json, sha256_file
from sharded_mde.modules.token_groups import FieldGroups, fields_from_dims, router_bytes
from sharded_mde.dims import group_name, load_dims, save_dims, serving_table_bytes
from sharded_mde.plan.tables import full_table_configs
from sharded_mde.train.distributed import init_distributed

WORLD = 2


def _search_retrain_predict(rank: int, world: int, config: str) -> None:
    from sharded_mde.search.run import run_search
    from sharded_mde.search.pme import compact_pme
    from sharded_mde.search.retrain import run_retrain
    from sharded_mde.train.run import train_stage

    cfg = load_config(config)
    env = init_distributed(prefer_cuda=False)
    dims = run_search(cfg, env)
    run_retrain(cfg, env, Path(cfg.run_dir) / "pme" / "dims.json", stage="retrain")
    # The trained model's own test logits: the retrained model resumed from its final checkpoint, sharded as trained.
    model, tables, _ = compact_pme(cfg, dims, full_table_configs(cfg), DatasetMeta.load(cfg.data.dir))
    ids = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=dims.data_dir))
    trainer, _ = train_stage(ids, env, "retrain", model=model, tables=tables)
    logits, _ = trainer.predict("test")
    if rank == 0:
        atomic_torch_save(Path(cfg.run_dir) / "trained_test_logits.pt", logits)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("export_pme")
    config = d / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(d / "run"),
        "data": {"dir": str(d / "data"), "synth_rows": 6000, "synth_num_sparse": 4, "synth_num_dense": 3,
                 "synth_vocab_min": 30, "synth_vocab_max": 800, "synth_tail_capacity": True},
        "model": {"embedding_dim": 16, "dense_arch": [8, 8], "over_arch": [8, 1]},
        "train": {"batch_size": 256, "epochs": 1, "checkpoint_every": 0, "sharding": "row_wise", "progress": False},
        "search": {"method": "pme", "budget": 0.3, "pme": {"score_fraction": 0.25, "combine": "project"}},
        "export": {"serve_batch_size": 512},
    }))
    cfg = load_config(config)
    prepare(cfg.data, progress=False)
    run_ranks(_search_retrain_predict, str(config), world_size=WORLD)
    run = Path(cfg.run_dir)
    out = run / "export"
    export_stage(cfg, run / "retrain" / "checkpoints", out, dims_path=run / "pme" / "dims.json", progress=False)
    return cfg, out


def test_served_model_equals_the_trained_model(exported) -> None:
    cfg, out = exported
    run = Path(cfg.run_dir)
    full = full_table_configs(cfg)
    dims = load_dims(run / "pme" / "dims.json", full)
    manifest = read_manifest(out)
    # every (field, size) group is its own table at its size, fed into its field
    fields = fields_from_dims(dims, full)
    assert any(len(f.groups) > 1 for f in fields)
    tables = {t.name: (t.rows, t.dim) for t in manifest.tables}
    assert sorted(tables.values()) == sorted((rows, size) for f in fields for size, rows in f.groups)
    feeds = {f.name: f.tables for f in manifest.features}
    assert all(len(feeds[f.feature]) == len(f.groups) for f in fields)
    assert manifest.source["world_size"] == WORLD and manifest.source["data_dir"] == str(Path(dims.data_dir).resolve())

    # fp32 served logits equal the sharded trained model's on the whole test split (rows in the ranks' gather order)
    data_dir = dims.data_dir
    model = load_export(out)
    served = []
    with torch.no_grad():
        for r in range(WORLD):
            for batch, n in iterate_eval_batches(data_dir, "test", cfg.train.batch_size, r, WORLD):
                served.append(model(batch.dense_features, batch.sparse_features)[:n])
    served = torch.cat(served)
    trained = torch.load(run / "trained_test_logits.pt")
    assert served.shape == trained.shape and served.numel() == DatasetMeta.load(data_dir).rows["test"]
    assert float((served - trained).abs().max()) < 1e-5

    # serve-check (TorchScript, reading the renumbered test split) gives the retrain's test AUC
    retrain = read_json(run / "retrain" / "retrain.json", "retrain summary")
    check = serve_check(cfg, out)
    assert check["scripted"] and check["data_dir"] == manifest.source["data_dir"]
    assert check["auc"] == pytest.approx(retrain["test"]["auc"], abs=1e-6)
    # bytes include the remap and every projection
    sizes = export_bytes(out, manifest)
    assert sizes["remap"] > 0 and sizes["projections"] > 0
    projections = sum(f.out_dim * s for f in fields for s, _ in f.groups if s < f.out_dim)
    assert check["serving_table_bytes"] == sum(r * c * 4 for r, c in tables.values()) + \
        sum(router_bytes(f) for f in fields) + 4 * projections


@pytest.mark.parametrize("dtype,tol", [("fp16", 1e-3), ("int8", 1e-2)])
def test_quantised_serving_of_token_groups(exported, dtype: str, tol: float) -> None:
    cfg, out = exported
    fp32, quant = load_export(out), load_export(out, dtype=dtype)
    requests = [b for b, _ in iterate_eval_batches(read_manifest(out).source["data_dir"], "test", 512, 0, 1)]
    with torch.no_grad():
        for b in requests:
            want = fp32(b.dense_features, b.sparse_features)
            assert float((quant(b.dense_features, b.sparse_features) - want).abs().max()) < tol
    manifest = read_manifest(out)
    assert serving_bytes(manifest, dtype) < serving_bytes(manifest, "fp32")


def test_token_group_tables_served_in_their_own_dtypes(exported, tmp_path: Path) -> None:
    """Per-group dtypes in the dims file: each group table is stored and served in its own, and the served
    model is the fp32 export's with those group tables fake-quantised (`fake_quantize_table`)."""
    cfg, out = exported
    run = Path(cfg.run_dir)
    dims = load_dims(run / "pme" / "dims.json", full_table_configs(cfg))
    cycle, chosen = ["int8", "fp16", "int4", "fp32"], {}
    for t in dims.tables:
        for g in t.groups:
            if g.size and g.rows:
                g.dtype = cycle[len(chosen) % len(cycle)]
                chosen[group_name(t.name, g.size)] = g.dtype
    assert len(set(chosen.values())) == 4
    save_dims(tmp_path / "dims.json", dims)
    manifest = export_stage(cfg, run / "retrain" / "checkpoints", tmp_path / "mixed", dims_path=tmp_path / "dims.json",
                            progress=False)
    assert manifest.format_version == 3 and {t.name: t.dtype for t in manifest.tables} == chosen
    ref = load_export(out)
    with torch.no_grad():
        for name, bag in ref.head.sparse_arch.ebc.embedding_bags.items():
            bag.weight.copy_(fake_quantize_table(bag.weight, chosen[name]))
    served = load_export(tmp_path / "mixed")
    with torch.no_grad():
        for b, _ in iterate_eval_batches(manifest.source["data_dir"], "test", 512, 0, 1):
            torch.testing.assert_close(served(b.dense_features, b.sparse_features), ref(b.dense_features, b.sparse_features),
                                       rtol=0, atol=1e-5)
    check = serve_check(cfg, tmp_path / "mixed")
    assert check["dtype"] == "mixed" and check["dtypes"] == chosen
    assert check["serving_bytes_by_table"] == {t.name: serving_table_bytes(t.rows, t.dim, chosen[t.name], 1)
                                               for t in manifest.tables}
    assert check["serving_table_bytes"] == sum(check["serving_bytes_by_table"].values()) + token_group_bytes(manifest)


def test_damaged_remap_is_refused_naming_it(exported, tmp_path: Path) -> None:
    _, out = exported
    altered = tmp_path / "altered"
    shutil.copytree(out, altered)
    remap = read_arrow(altered / REMAP_FILE, "remap file", ["feature", "start", "end", "table", "row"])
    rows = remap.column("row").to_pylist()
    i = next(k for k, t in enumerate(remap.column("table").to_pylist()) if t)
    rows[i] += 1
    write_arrow(altered / REMAP_FILE, remap.set_column(4, "row", pa.array(rows, type=pa.int64())))
    with pytest.raises(ValueError, match=rf"altered/{REMAP_FILE}: checksum mismatch"):
        load_export(altered)
    with pytest.raises(ValueError, match=rf"altered/{REMAP_FILE}: remap range {i} is .* but the manifest's token groups"):
        load_export(altered, verify=False)

    truncated = tmp_path / "truncated"
    shutil.copytree(out, truncated)
    data = (truncated / REMAP_FILE).read_bytes()
    (truncated / REMAP_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"truncated/{REMAP_FILE}: checksum mismatch"):
        load_export(truncated)
    with pytest.raises(ValueError, match=rf"truncated/{REMAP_FILE}: not a readable remap file"):
        load_export(truncated, verify=False)


def _format2_remap(manifest) -> pa.Table:
    """The remap as format version 2 wrote it: one range per reserved id, per group and for the pruned ids
    (table "")."""
    fields = [FieldGroups(d["feature"], d["num_embeddings"], d["out_dim"], tuple(tuple(g) for g in d["groups"]),
                          tuple(d["reserved"]), d["pooling"]) for d in manifest.token_groups.fields]
    table_of = group_tables(fields, [t.config() for t in manifest.tables])
    rows = []
    for f in fields:
        ranges = [(k, k + 1, g, f.reserved[:k].count(g)) for k, g in enumerate(f.reserved)]
        start = len(f.reserved)
        for g, (_, n) in enumerate(f.groups):
            n_res = f.reserved.count(g)
            if n > n_res:
                ranges.append((start, start + n - n_res, g, n_res))
                start += n - n_res
        if start < f.num_embeddings:
            ranges.append((start, f.num_embeddings, -1, 0))
        rows += [(f.feature, lo, hi, table_of[f.keys()[g]] if g >= 0 else "", row) for lo, hi, g, row in ranges]
    cols = list(zip(*rows))
    return pa.table({"feature": pa.array(cols[0], pa.string()), "start": pa.array(cols[1], pa.int64()),
                     "end": pa.array(cols[2], pa.int64()), "table": pa.array(cols[3], pa.string()),
                     "row": pa.array(cols[4], pa.int64())})


def test_format_2_export_with_its_longer_remap_serves_the_same(exported, tmp_path: Path) -> None:
    """An export written before remaps listed kept ranges only (format 2: pruned ranges, a range per reserved id)
    loads and serves the same logits; a damaged range in it is still refused."""
    _, out = exported
    manifest = read_manifest(out)
    old = tmp_path / "format2"
    shutil.copytree(out, old)
    legacy = _format2_remap(manifest)
    assert legacy.num_rows > read_arrow(out / REMAP_FILE, "remap file", legacy.column_names).num_rows  # layouts differ

    def write(remap: pa.Table) -> None:
        write_arrow(old / REMAP_FILE, remap)
        raw = json.loads((old / "manifest.json").read_text())
        raw["format_version"] = 2
        raw["files"][REMAP_FILE] = {"bytes": (old / REMAP_FILE).stat().st_size, "sha256": sha256_file(old / REMAP_FILE)}
        (old / "manifest.json").write_text(json.dumps(raw))

    write(legacy)
    new_model, old_model = load_export(out), load_export(old)
    with torch.no_grad():
        for b, _ in iterate_eval_batches(manifest.source["data_dir"], "test", 512, 0, 1):
            torch.testing.assert_close(old_model(b.dense_features, b.sparse_features),
                                       new_model(b.dense_features, b.sparse_features), rtol=0, atol=0)
    rows = legacy.column("row").to_pylist()
    i = next(k for k, t in enumerate(legacy.column("table").to_pylist()) if t)
    rows[i] += 1
    write(legacy.set_column(4, "row", pa.array(rows, type=pa.int64())))
    with pytest.raises(ValueError, match=rf"format2/{REMAP_FILE}: remap range \d+ is .* but the manifest's token groups"):
        load_export(old)
