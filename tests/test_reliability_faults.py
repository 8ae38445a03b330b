"""Production faults (issue 16): file modes, the run directory lock, config changes, OS errors, thread defaults.

The whole-pipeline cases (Ctrl-C in each stage, a full disk, damaged markers, moved and re-prepared
data) run through the CLI in `tools/reliability_audit.py`, which writes docs/reliability.md.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sharded_mde.cli import default_cpu_threads, main
from sharded_mde.interrupts import Interrupted, interruptible
from sharded_mde.io import atomic_torch_save, atomic_write_json, atomic_write_text, describe_os_error
from sharded_mde.pipeline.ledger import StageLedger
from sharded_mde.pipeline.lock import run_dir_lock
from sharded_mde.train.checkpoint import (COMPLETE, discard_checkpoints_of_other_configs, guard_config,
                                          latest_checkpoint, read_marker, save_checkpoint)
from test_export_files import _export

ROOT = Path(__file__).resolve().parents[1]


def _modes(root: Path) -> tuple:
    """`stat -c %a` of every file and of every directory (root included) under `root`, as two sets."""
    paths = [root, *root.rglob("*")]
    out = subprocess.run(["stat", "-c", "%a %F", *map(str, paths)], capture_output=True, text=True, check=True).stdout
    files = {ln.split()[0] for ln in out.splitlines() if "directory" not in ln}
    dirs = {ln.split()[0] for ln in out.splitlines() if "directory" in ln}
    return files, dirs


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, "644", "755"), (0o027, "640", "750")])
def test_export_files_and_directories_follow_the_umask(tmp_path: Path, umask: int, file_mode: str, dir_mode: str) -> None:
    old = os.umask(umask)
    try:
        root = _export(tmp_path)
    finally:
        os.umask(old)
    files, dirs = _modes(root)
    assert files == {file_mode} and dirs == {dir_mode}, (files, dirs)


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "data": {"dir": str(tmp_path / "data")}}))
    return path


def test_a_second_writer_is_refused_naming_the_holder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _config(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from sharded_mde.pipeline.lock import run_dir_lock\n"
                               f"with run_dir_lock({str(tmp_path / 'run')!r}):\n print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert main(["train", str(config)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"run directory is in use by pid {holder.pid}" in err, err
    finally:
        holder.kill()
        holder.wait()
    with run_dir_lock(tmp_path / "run"):  # the holder's death released it (no stale lock to clean up)
        pass


def test_unwritable_run_dir_is_one_line_before_any_step(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _config(tmp_path)
    (tmp_path / "run").mkdir()
    if os.geteuid() == 0:  # root ignores permissions: a read-only file system instead
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(tmp_path / "run")]).returncode:
            pytest.skip("cannot mount a tmpfs here")
    else:
        os.chmod(tmp_path / "run", 0o555)
    try:
        assert main(["run", str(config)]) == 2
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "-l", str(tmp_path / "run")])
    err = capsys.readouterr()
    assert "[run]" not in err.out and not (tmp_path / "data").exists()  # refused before the data stage
    assert err.err.count("\n") == 1 and str(tmp_path / "run") in err.err
    assert "Read-only file system" in err.err or "Permission denied" in err.err


def test_os_errors_name_the_path_and_the_action() -> None:
    e = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/x/rank0.pt")
    assert describe_os_error(e, "running stage search") == (
        "/x/rank0.pt: No space left on device while running stage search (free some space and rerun: finished "
        "steps are kept)")
    assert describe_os_error(OSError(errno.EIO, "I/O error"), "writing", "/run").startswith("/run (a file in it): I/O error")


def test_a_checkpoint_on_a_full_disk_is_an_os_error(small_disk: Path) -> None:
    """torch.save on a full file system raises RuntimeError ("unexpected pos ..."): it must come out as
    ENOSPC naming the file, and leave no temp file (the CLI turns it into one line, exit 2)."""
    import torch

    with pytest.raises(OSError) as e:
        atomic_torch_save(small_disk / "rank0.pt", {"w": torch.zeros(1 << 16)})  # 256 KiB into 64 KiB
    assert e.value.errno == errno.ENOSPC and str(small_disk) in str(e.value.filename)
    assert list(small_disk.iterdir()) == []


def test_checkpoints_of_another_config_are_refused_or_discarded(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    guard_config(root, "aaaa", is_main=True)
    save_checkpoint(root, 3, {}, {})
    guard_config(root, "aaaa", is_main=True)  # same config: resumes
    assert latest_checkpoint(root) is not None
    with pytest.raises(ValueError, match=r"checkpoints up to step 3 were made with another training config .*--force"):
        guard_config(root, "bbbb", is_main=True)
    assert latest_checkpoint(root) is not None  # refused: nothing deleted
    discard_checkpoints_of_other_configs(True)
    try:
        guard_config(root, "bbbb", is_main=True)
    finally:
        discard_checkpoints_of_other_configs(False)
    assert latest_checkpoint(root) is None
    guard_config(root, "bbbb", is_main=True)  # recorded: the new config's checkpoints resume


def test_damaged_checkpoint_marker_names_it_and_the_way_out(tmp_path: Path) -> None:
    d = save_checkpoint(tmp_path, 3, {}, {})
    for text in ['{"step": ', '[1, 2]', '{"step": 3}']:
        (d / COMPLETE).write_text(text)
        with pytest.raises(ValueError, match=rf"{d / COMPLETE}.*delete {d} to resume from the checkpoint before it"):
            read_marker(d)


def test_ledger_reruns_the_first_changed_stage_and_every_later_one(tmp_path: Path) -> None:
    ledger = StageLedger(tmp_path)
    for name in ("data", "baseline", "search", "export"):
        ledger.record(name, {}, 1.0, f"{name}-1")
    same = {"data": "data-1", "baseline": "baseline-1", "search": "search-1", "export": "export-1"}
    assert StageLedger(tmp_path).changed(same) == []
    assert StageLedger(tmp_path).changed({**same, "baseline": "baseline-2"}) == ["baseline", "search", "export"]
    assert StageLedger(tmp_path).changed({**same, "export": "export-2"}) == ["export"]
    atomic_write_json(tmp_path / "stages.json", {"stages": [1]})
    with pytest.raises(ValueError, match=r"stages.json: stage ledger is damaged.*delete it"):
        StageLedger(tmp_path)


def test_thread_default_is_the_users_when_set_else_a_share_of_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_cpu_threads() is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert 1 <= default_cpu_threads() <= cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(2 * cores))
    assert default_cpu_threads() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), 0.0, 0.0))  # every core busy elsewhere
    assert default_cpu_threads() == 1


class _SignalInDestructor:
    """Sends SIGTERM to this process from `__del__`, where the handler's exception is dropped by Python."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs here; "Exception ignored in ... __del__"


def test_an_interrupt_swallowed_by_a_destructor_stops_the_next_write(tmp_path: Path) -> None:
    """Seen in the audit: SIGTERM landing in an import's weakref callback was lost and the run went on to exit 0."""
    with pytest.raises(Interrupted) as caught:
        with interruptible():
            _SignalInDestructor()  # dropped at once: its __del__ runs and the first exception is lost
            atomic_write_text(tmp_path / "after.txt", "must not be written")
    assert caught.value.signum == signal.SIGTERM and not (tmp_path / "after.txt").exists()
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored (the test run goes on)


def test_serve_check_data_must_have_the_exports_vocabularies(tmp_path: Path) -> None:
    """serve-check scores `data.dir` (moved data is fine) only if its vocabularies match the export's digest."""
    from types import SimpleNamespace

    from sharded_mde.config import RunConfig
    from sharded_mde.export.manifest import vocabulary_digest
    from sharded_mde.export.stage import serving_data_dir
    from sharded_mde.io import sha256_file

    data = tmp_path / "moved_data"
    (data / "vocab").mkdir(parents=True)
    for f in ("C1", "C2"):
        (data / "vocab" / f"{f}.parquet").write_bytes(f"ids of {f}".encode())
    digest = vocabulary_digest({f: sha256_file(data / "vocab" / f"{f}.parquet") for f in ("C1", "C2")})
    manifest = SimpleNamespace(token_groups=None, source={"data_dir": "/where/it/was/exported", "vocab_digest": digest},
                               features=[SimpleNamespace(name=f, vocabulary=f"vocab/{f}.parquet") for f in ("C1", "C2")])
    cfg = RunConfig()
    cfg.data.dir = str(data)
    assert serving_data_dir(cfg, tmp_path / "export", manifest) == data  # the config's data, not the stored path
    (data / "vocab" / "C2.parquet").write_bytes(b"ids of C2, re-prepared")
    with pytest.raises(ValueError, match=rf"{data}: vocabularies \(digest \w+\) differ from those {tmp_path / 'export'} "
                                         rf"was exported with \(digest {digest}\)"):
        serving_data_dir(cfg, tmp_path / "export", manifest)
    cfg.data.dir = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"nowhere: data directory to score .* not found"):
        serving_data_dir(cfg, tmp_path / "export", manifest)
