#!/usr/bin/env bash
# The fused kernels' checks on a CUDA GPU, most important first, each under its own time
# limit so a short lease still brings back the first ones:
#   1. tests/test_kernels_gpu.py (values, gradients, opcheck, torch.compile, a LoRKD step)
#   2. bench/kernels.py --tune  (tiles at LoRKD's shapes; the winners are used by 3 and 4)
#   3. bench/kernels.py --shapes lorkd     (fused vs eager vs dense, fp32 and bf16)
#   4. bench/kernels.py --shapes synthetic (bf16, with the torch.compile baseline; CKA too)
# On an H100 (2026-11-27) step 1 took ~100 s, step 2 ~10 s per candidate per kernel and
# dtype (~5 min in all), steps 3 and 4 about a minute each. Where a lease is short, run
# the steps in two calls: STEPS="1 2" then STEPS="3 4" (step 3 reads step 2's file).
# Usage: [STEPS="1 2 3 4"] bash bench/gpu_checks.sh [OUT_DIR]   (default bench/results/gpu-checks)
set -u
out=${1:-bench/results/gpu-checks}
steps=" ${STEPS:-1 2 3 4} "
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import torch, triton, timm; print('torch', torch.__version__, 'triton', triton.__version__,
'timm', timm.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } 2>&1 | tee "$out/gpu.txt"
if [[ $steps == *" 1 "* ]]; then
  timeout 180 $py -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py > "$out/pytest_gpu.log" 2>&1
  echo "pytest rc=$?" | tee -a "$out/pytest_gpu.log"; tail -3 "$out/pytest_gpu.log"
fi
if [[ $steps == *" 2 "* ]]; then
  timeout 420 $py bench/kernels.py --tune --out "$out/kernels-tune.json" > "$out/tune.log" 2>&1
  echo "tune rc=$?" | tee -a "$out/tune.log"; grep "^best" "$out/tune.log"
fi
if [ -s "$out/kernels-tune.json" ]; then export MEDKD_KERNEL_TILES="$out/kernels-tune.json"; fi
if [[ $steps == *" 3 "* ]]; then
  timeout 150 $py bench/kernels.py --shapes lorkd --no-compile --dtypes float32 bfloat16 \
    --out "$out/kernels-lorkd.json" > "$out/lorkd.log" 2>&1
  echo "lorkd rc=$?" | tee -a "$out/lorkd.log"; tail -2 "$out/lorkd.log"
fi
if [[ $steps == *" 4 "* ]]; then
  timeout 150 $py bench/kernels.py --shapes synthetic --dtypes bfloat16 --out "$out/kernels-synthetic.json" \
    > "$out/synthetic.log" 2>&1
  echo "synthetic rc=$?" | tee -a "$out/synthetic.log"; tail -2 "$out/synthetic.log"
fi
