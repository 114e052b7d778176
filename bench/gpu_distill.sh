#!/usr/bin/env bash
# The distillation runs that need a CUDA GPU, most important first, all within one deadline so
# that a short lease still brings back the first ones (bench/distill.py writes its results file
# after every run, and --resume picks up where a killed call stopped):
#   1. LiteMedSAM at 256 px, its features through torch on the GPU: kd, rd, rd-paper on mri and
#      ct, 100% and 10% labels, seeds 0-2                      -> OUT_DIR/distill-256.json
#   2. lora on fashion-mnist, the arm of the main protocol a CPU cannot afford (features through
#      ONNX Runtime on the CPU, as in bench/results/distill.json) -> OUT_DIR/distill-fashion-mnist-lora.json
#      (bench/distill.py --merge adds it to bench/results/distill.json)
#   3. lora with the 256 px teacher, seed by seed               -> OUT_DIR/distill-256.json
# Needs the data at their Debian paths (mricron-data, invesalius-examples, dataset-fashion-mnist).
# Usage: [DEADLINE_S=540] [DEVICE=cuda] [EXTRA="--max-train 24"] bash bench/gpu_distill.sh [OUT_DIR]
set -u
out=${1:-bench/results/gpu-distill}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
end=$((SECONDS + ${DEADLINE_S:-540}))

distill() {  # distill LOG ARGS...: one bench/distill.py call within what is left of the deadline
  local log=$out/$1 left=$((end - SECONDS)); shift
  if ((left < 20)); then echo "skipped (deadline): $*" | tee -a "$log"; return; fi
  # shellcheck disable=SC2086  # EXTRA is a list of arguments
  timeout "$left" $py bench/distill.py --device "${DEVICE:-cuda}" --resume "$@" ${EXTRA:-} >> "$log" 2>&1
  echo "rc=$? after $SECONDS s: $*" | tee -a "$log"
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $py -c "import torch, timm, peft, onnxruntime as ort; print('torch', torch.__version__, 'timm', timm.__version__,
'peft', peft.__version__, 'onnxruntime', ort.__version__, 'cpus', torch.get_num_threads())"; } 2>&1 | tee "$out/gpu.txt"
at256=(--teachers litemedsam@256 --override teacher.backend=torch --datasets mri ct --output "$out/distill-256.json")
distill distill-256.log "${at256[@]}" --arms kd rd rd-paper
distill distill-fashion-mnist-lora.log --datasets fashion-mnist --arms lora \
  --output "$out/distill-fashion-mnist-lora.json"
for seed in 0 1 2; do distill distill-256.log "${at256[@]}" --arms lora --seeds "$seed"; done
grep -h "acc " "$out"/*.log | tail -n 40
