"""The Dockerfiles install through the same bootstrap as the README, and copy what exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def test_there_is_a_cpu_and_a_cuda_image() -> None:
    assert {p.suffix for p in DOCKERFILES} == {".cpu", ".cuda"}


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_through_bootstrap(path: Path) -> None:
    text = path.read_text()
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    installs = [r for r in runs if "pip install" in r or "bootstrap" in r]
    assert installs == [r for r in runs if "bootstrap.sh" in r], f"{path.name}: installs outside the bootstrap: {installs}"
    assert any("bash tools/bootstrap.sh" in r for r in runs)
    for src in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert (ROOT / src.rstrip("/")).exists(), f"{path.name}: COPY {src} does not exist"
    assert 'ENTRYPOINT ["sharded-mde"]' in text


def test_readme_and_makefile_use_the_same_bootstrap() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "tools/bootstrap.sh" in makefile
    boot = (ROOT / "tools" / "bootstrap.sh").read_text()
    # The CUDA image forces the CUDA FBGEMM build through the variable the bootstrap reads.
    assert "SHARDED_MDE_CUDA" in boot and "SHARDED_MDE_CUDA=1" in (ROOT / "docker" / "Dockerfile.cuda").read_text()
    for pin in ("TORCH_VERSION=2.13.0", "FBGEMM_VERSION=1.8.0", "TORCHREC_VERSION=1.8.0"):
        assert pin in boot
