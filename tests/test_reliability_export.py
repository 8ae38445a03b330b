"""Property tests: a truncated, altered or deleted file of an export fails loading with an error naming that file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharded_mde.export import load_export
from test_export_files import _export

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def export_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("export"))


def _files(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@FAST
@given(data=st.data())
def test_damaged_export_file_is_named(export_root: Path, tmp_path: Path, data: st.DataObject) -> None:
    root = tmp_path / "copy"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(export_root, root)
    rel = data.draw(st.sampled_from(_files(root)), label="file")
    target = root / rel
    raw = target.read_bytes()
    how = data.draw(st.sampled_from(["truncate", "alter", "delete", "append"]), label="how")
    if how == "truncate":
        target.write_bytes(raw[:data.draw(st.integers(0, len(raw) - 1), label="keep")])
    elif how == "alter":
        at = data.draw(st.integers(0, len(raw) - 1), label="at")
        flip = data.draw(st.integers(1, 255), label="xor")
        target.write_bytes(raw[:at] + bytes([raw[at] ^ flip]) + raw[at + 1:])
    elif how == "append":
        target.write_bytes(raw + data.draw(st.binary(min_size=1, max_size=16), label="tail"))
    else:
        target.unlink()
    try:
        model = load_export(root)
    except ValueError as e:
        msg = str(e)
        assert "\n" not in msg and str(target) in msg, (rel, how, msg)
        return
    # only a manifest edit that keeps it valid JSON with the same meaning may load (e.g. whitespace)
    assert rel == "manifest.json", (rel, how)
    reference = load_export(export_root)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
