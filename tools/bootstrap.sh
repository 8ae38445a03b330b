#!/usr/bin/env bash
# Creates or reuses .venv with the pinned TorchRec/FBGEMM stack, then installs sharded_mde editable.
# One script for every entry point (make demo, make test, .ci/run, docker). Re-running it when
# nothing changed takes seconds: a stamp file records the hash of this script and pyproject.toml.
# Usage: bash tools/bootstrap.sh [VENV_DIR]   (default .venv; PYTHON picks the interpreter)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-$root/.venv}
py=${PYTHON:-python3}
stamp=$venv/.sharded_mde_stamp
want=$(cat "$root/tools/bootstrap.sh" "$root/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import torchrec, sharded_mde" 2>/dev/null; then
  exit 0
fi
echo "bootstrap: setting up $venv (first run takes a few minutes)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=(quiet "$venv/bin/python" -m pip install -q --disable-pip-version-check)
# pip's notes about local index folders and torchrec's declared CUDA dependency are expected noise.
quiet() { "$@" 2> >(grep -vE "is ignored: it is neither|dependency resolver does not currently|requires fbgemm-gpu, which is not installed" >&2); }
TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0
if [ "${SHARDED_MDE_CUDA:-}" = 1 ] || { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  "${pip[@]}" "torch==$TORCH_VERSION" "fbgemm-gpu==$FBGEMM_VERSION"
else
  # CPU machines: the +cpu build of torch (no CUDA libraries) and the CPU build of FBGEMM.
  "${pip[@]}" "torch==$TORCH_VERSION+cpu" 2>/dev/null || "${pip[@]}" "torch==$TORCH_VERSION"
  "${pip[@]}" "fbgemm-gpu-cpu==$FBGEMM_VERSION"
fi
# torchrec declares a dependency on the CUDA fbgemm-gpu wheel (multi-GB): install it without
# dependencies and add the ones it really imports.
"${pip[@]}" --no-deps "torchrec==$TORCHREC_VERSION"
"${pip[@]}" tensordict "torchmetrics==1.0.3" tqdm pyre-extensions iopath \
  pyarrow pyyaml matplotlib pytest hypothesis numpy duckdb
"${pip[@]}" --no-deps -e "$root"
echo "$want" > "$stamp"
echo "bootstrap: ready ($("$venv/bin/python" -c 'import torch, torchrec; print("torch", torch.__version__, "torchrec", torchrec.__version__)'))" >&2
