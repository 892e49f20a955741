#!/usr/bin/env bash
# One prepared device session: every GPU measurement of the benches, results as JSON under $OUT.
#   OUT=/tmp/out bash bench/gpu_session.sh        (on a CUDA machine; each step has its own time limit)
# Steps run cheapest-first so that a session cut short still returns the most important tables.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  local started=$(date +%s)
  timeout "$limit" "$@" 2>&1 | grep -v "batch/s" | tee "$OUT/$name.log" | tail -25
  echo "=== $name done in $(( $(date +%s) - started ))s"
}

step eval_gpu 80 $PY bench/eval_bench.py --devices cuda --dims 512,1024 --out "$OUT/eval_gpu.json"
step train_eager 130 $PY bench/train_bench.py --skip-compile --steps 6 --warmup 2 --out "$OUT/train_eager.json"
step train_compile 230 $PY bench/train_bench.py --steps 6 --warmup 2 --only "SDPA + torch.compile" --out "$OUT/train_compile.json"
step data_cpu16 120 $PY bench/data_bench.py --workers 16 --images 4000 --out "$OUT/data_bench16.json"
step e2e 150 $PY bench/e2e_bench.py --images 60502 --workers 16 --out "$OUT/e2e.json"
step e2e_cache 170 $PY bench/e2e_bench.py --images 60502 --workers 16 --cache --out "$OUT/e2e_cache.json"
