#!/usr/bin/env bash
# The GPU checks of this project, for a machine with CUDA (run from anywhere; it works in the repository root):
#   1. installs FBGEMM-GPU and TorchRec, which the GPU machine lacks and cannot download, from the files
#      staged beside the checkout as ../shared/gpu/README.md describes: the FBGEMM-GPU parts
#      fbgemm.tar.xz.* (in $GPU_STAGE, default .gpu-stage/, or .gpu/part*/) and the small wheels
#      (.gpu/small/*.whl, or $GPU_STAGE/*.whl), into /tmp/site;
#   2. pytest -m gpu: every CUDA path (FBGEMM TBE forward/backward, a few training steps under
#      DistributedModelParallel on CUDA against CPU, serve-check on CUDA at row_alignment 16);
#   3. `sharded-mde bench speed` on CUDA, whose `tbe` section holds the compact/full FBGEMM TBE
#      forward and forward+backward times at batch 16k beside the bytes ratio, with the device name.
# Each step's output goes to $OUT (default runs/gpu_checks); the exit status is non-zero when any
# step fails, and without CUDA the script stops at once with one line saying so.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_checks}
GPU_STAGE=${GPU_STAGE:-.gpu-stage}
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  echo "gpu_checks: $PY cannot import torch (set PYTHON to the interpreter that has it); nothing was checked" >&2
  exit 1
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu_checks: no CUDA device here (torch.cuda.is_available() is False); nothing was checked" >&2
  exit 1
fi
mkdir -p "$OUT"

if ! "$PY" -c "import fbgemm_gpu, torchrec" >/dev/null 2>&1; then
  if [ ! -d /tmp/site/fbgemm_gpu ]; then
    shopt -s nullglob
    parts=("$GPU_STAGE"/fbgemm.tar.xz.* .gpu/part*/fbgemm.tar.xz.*)
    wheels=(.gpu/small/*.whl "$GPU_STAGE"/*.whl)
    shopt -u nullglob
    if [ ${#parts[@]} -eq 0 ] || [ ${#wheels[@]} -eq 0 ]; then
      echo "gpu_checks: FBGEMM-GPU parts (fbgemm.tar.xz.*) or TorchRec wheels not staged in $GPU_STAGE or .gpu/ (see ../shared/gpu/README.md)" >&2
      exit 1
    fi
    mkdir -p /tmp/site
    # The parts in the order of their numeric suffix (fbgemm.tar.xz.0, .1, ...), each once.
    printf '%s\n' "${parts[@]}" | awk -F. '!seen[$NF]++ {print $NF "\t" $0}' | sort -n | cut -f2- | xargs cat \
      | "$PY" -c 'import sys, tarfile; tarfile.open(fileobj=sys.stdin.buffer, mode="r|xz").extractall("/tmp/site")'
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site "${wheels[@]}"
  fi
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

failed=()
step() {  # step NAME COMMAND...: runs it, its output teed to $OUT/NAME.txt; a failure is recorded, not fatal
  local name=$1
  shift
  echo "== $name: $*"
  if "$@" 2>&1 | tee "$OUT/$name.txt"; then
    echo "== $name: ok"
  else
    echo "== $name: FAILED (exit ${PIPESTATUS[0]})"
    failed+=("$name")
  fi
}

step versions "$PY" -c "import torch, fbgemm_gpu, torchrec; print(torch.cuda.get_device_name(), torch.__version__, torchrec.__version__)"
step pytest_gpu "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs tests
step bench_speed_gpu "$PY" -m sharded_mde.cli bench speed configs/ham_planted.yaml --repeats 10 --out "$OUT/bench_speed_gpu.json"

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_checks: failed: ${failed[*]}" >&2
  exit 1
fi
echo "gpu_checks: every step passed"
