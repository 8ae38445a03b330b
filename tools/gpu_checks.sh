#!/usr/bin/env bash
# The GPU checks of this project, for a session that has the GPU machine (../shared/gpu/README.md):
# run there after the install line, from the repository root, with $OUT set by the device tool.
#   pytest -m gpu (CUDA tests: FBGEMM TBE, ...) and `sharded-mde bench speed` on CUDA, whose `tbe`
#   section holds the compact/full FBGEMM TBE forward and forward+backward times at batch 16k
#   beside the bytes ratio, with the device name.
# Not yet run on a GPU machine: the first run should confirm or correct it.
set -u
OUT=${OUT:-runs/gpu_checks}
mkdir -p "$OUT"
python3 -c "import torch, fbgemm_gpu, torchrec; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', torch.__version__, torchrec.__version__)" \
  2>&1 | tee "$OUT/versions.txt"
python3 -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.txt"
python3 -m sharded_mde.cli bench speed configs/ham_planted.yaml --repeats 10 --out "$OUT/bench_speed_gpu.json" \
  2>&1 | tail -40 | tee "$OUT/bench_speed_gpu.txt"
