"""The DCP checkpoint layer on one process: round trip, old per-rank checkpoints refused in one line, full disk."""

from __future__ import annotations

import errno
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from sharded_mde.config import ModelConfig
from sharded_mde.export import export_compact
from sharded_mde.modules.model import build_model
from sharded_mde.search.retrain import read_supernet
from sharded_mde.train.checkpoint import (MODEL, CheckpointReader, discard_checkpoints_of_other_configs, guard_config,
                                          latest_checkpoint, load_checkpoint, read_marker, save_checkpoint)
from sharded_mde.train.state import table_of
from torchrec import EmbeddingBagConfig

ROOT = Path(__file__).resolve().parents[1]
TABLES = [EmbeddingBagConfig(name="t_a", num_embeddings=20, embedding_dim=8, feature_names=["a"])]
MCFG = ModelConfig(head="dlrm", dense_arch=[8, 8], over_arch=[8, 1])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(MCFG, TABLES, ["a"], 3, device=torch.device("cpu"))


def test_reader_returns_what_was_saved_and_the_trainer_state(tmp_path: Path) -> None:
    state = _model().state_dict()
    save_checkpoint(tmp_path, 4, {MODEL: state}, {"total_steps": 9}, local={"step": 4, "history": [{"auc": 0.5}]})
    reader = CheckpointReader(tmp_path)
    assert reader.dir == tmp_path / "step_000000004" and reader.info["total_steps"] == 9
    assert set(reader.keys) == set(state) and list(reader.tables().values()) == ["t_a"]
    key = next(iter(reader.tables()))
    pieces = list(reader.pieces(key))
    assert len(pieces) == 1 and pieces[0][0] == [0, 0] and torch.equal(pieces[0][1], state[key])
    dense = [k for k in state if table_of(k) is None]
    assert all(torch.equal(v, state[k]) for k, v in reader.tensors(dense).items())
    assert reader.trainer_state(0) == {"step": 4, "history": [{"auc": 0.5}]} and reader.trainer_state(1) is None


def _old_checkpoint(root: Path) -> Path:
    """A checkpoint directory as earlier versions wrote it: rank<R>.pt files and a marker without a format."""
    d = root / "step_000000003"
    d.mkdir(parents=True)
    torch.save({"model": {}}, d / "rank0.pt")
    (d / "COMPLETE.json").write_text(json.dumps({"step": 3, "world_size": 1}))
    return d


def test_an_old_per_rank_checkpoint_is_refused_in_one_line_naming_it(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    d = _old_checkpoint(root)
    want = (rf"{d}: a checkpoint in the per-rank format of an earlier version .*convert_checkpoint.py {d}`, "
            "or rerun the stage that wrote it with --force")
    for read in (read_marker, CheckpointReader, lambda p: read_supernet(p, {"t_a": [0]}),
                 lambda p: export_compact(p, tmp_path / "out", MCFG, ["a"], 3, TABLES, progress=False)):
        with pytest.raises(ValueError, match=want) as e:
            read(d)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=want):  # the resume guard refuses it before training starts ...
        guard_config(root, "aaaa", is_main=True)
    assert d.is_dir()
    discard_checkpoints_of_other_configs(True)  # ... and --force discards it, also under the same config
    try:
        guard_config(root, "aaaa", is_main=True)
    finally:
        discard_checkpoints_of_other_configs(False)
    assert latest_checkpoint(root) is None and not d.exists()


def test_an_interrupted_write_of_a_step_is_replaced(tmp_path: Path) -> None:
    d = tmp_path / "step_000000002"
    d.mkdir()
    (d / "__0_0.distcp").write_bytes(b"half")  # a crash inside the save: no COMPLETE marker
    assert latest_checkpoint(tmp_path) is None
    state = _model().state_dict()
    save_checkpoint(tmp_path, 2, {MODEL: state}, {})
    assert latest_checkpoint(tmp_path) == d and read_marker(d)["step"] == 2
    key = next(iter(CheckpointReader(d).tables()))
    assert torch.equal(next(CheckpointReader(d).pieces(key))[1], state[key])


def test_a_checkpoint_on_a_full_disk_is_an_os_error_naming_it(small_disk: Path) -> None:
    with pytest.raises(OSError) as e:
        save_checkpoint(small_disk, 1, {MODEL: {"w": torch.zeros(1 << 16)}}, {})  # 256 KiB into 64 KiB
    assert e.value.errno == errno.ENOSPC and str(small_disk) in str(e.value.filename)
    assert latest_checkpoint(small_disk) is None


def _converter():
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "tools" / "convert_checkpoint.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_an_old_two_rank_checkpoint_converts_to_dcp_with_the_same_tensors(tmp_path: Path) -> None:
    """A hand-written 2-rank checkpoint of the earlier format (table rows split over the ranks, its row-wise
    momentum on both, Adam state replicated) converts; the DCP checkpoint holds the same whole tensors."""
    state = _model().state_dict()
    key = next(k for k in state if table_of(k) == "t_a")
    momentum = torch.rand(20)
    adam = {"step": torch.tensor(3.0), "exp_avg": torch.rand(8, 3)}

    def sharded(value: torch.Tensor, lo: int, hi: int) -> dict:
        offsets = [lo] + [0] * (value.dim() - 1)
        return {"__sharded__": True, "global_size": list(value.shape), "shards": [(offsets, value[lo:hi])]}

    d = tmp_path / "checkpoints" / "step_000000003"
    d.mkdir(parents=True)
    for rank, (lo, hi) in enumerate([(0, 12), (12, 20)]):
        model = {k: (sharded(v, lo, hi) if k == key else v) for k, v in state.items()}
        optimizer = {"state": {key: {"t_a.momentum1": sharded(momentum, lo, hi)}, "dense.w": adam}}
        torch.save({"model": model, "optimizer": optimizer, "step": 3, "history": [{"auc": 0.6}], "callbacks": [],
                    "rng": torch.get_rng_state()}, d / f"rank{rank}.pt")
    (d / "COMPLETE.json").write_text(json.dumps({"step": 3, "world_size": 2, "total_steps": 9}))

    assert _converter().main([str(d)]) == 0
    assert read_marker(d)["total_steps"] == 9 and not list(d.glob("rank*.pt"))
    reader = CheckpointReader(d)
    assert all(torch.equal(v, state[k]) for k, v in reader.tensors(reader.keys).items())
    assert reader.trainer_state(0)["history"] == [{"auc": 0.6}]
    model = {k: torch.zeros_like(v) for k, v in state.items()}
    optimizer = {"state": {key: {"t_a.momentum1": torch.zeros(20)},
                           "dense.w": {n: torch.zeros_like(v) for n, v in adam.items()}}}
    assert load_checkpoint(d, model, optimizer)["step"] == 3
    assert torch.equal(model[key], state[key]) and torch.equal(optimizer["state"][key]["t_a.momentum1"], momentum)
    assert all(torch.equal(optimizer["state"]["dense.w"][n], v) for n, v in adam.items())
    assert _converter().main([str(d)]) == 2  # a DCP checkpoint is not converted twice
