#!/usr/bin/env bash
# One prepared device session: every GPU measurement of the benches, results as JSON under $OUT.
#   OUT=/tmp/out bash bench/gpu_session.sh                 (on a CUDA machine; each step has its own time limit)
#   STEPS="train_goal e2e_cache" OUT=/tmp/out bash bench/gpu_session.sh     (only the named steps)
# Steps run most-important-first, so that a session cut short still returns the tables the goals need.
# The device tool allows 600 s per command: run the default first half (its limits add up to 520 s), then,
# if the session's device time allows, STEPS="train_rest e2e eval_gpu" (460 s of limits).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
OUT=${OUT:-/tmp/gpu_session}
FIRST_HALF="train_goal e2e_cache data_cpu16"
STEPS=${STEPS:-$FIRST_HALF}
mkdir -p "$OUT"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: runs only when NAME is in $STEPS
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s)"
  local started=$(date +%s)
  timeout "$limit" "$@" 2>&1 | grep -v "batch/s" | tee "$OUT/$name.log" | tail -25
  echo "=== $name done in $(( $(date +%s) - started ))s"
}

# The training goal (images/s and the ratio to the reference's way, one process, one card).
step train_goal 240 $PY bench/train_bench.py --steps 6 --warmup 2 --only "reference,+ SDPA + torch.compile" \
  --out "$OUT/train_goal.json"
# The end-to-end goal, from the downsized cache (untimed build), then the loader on the device's CPUs.
step e2e_cache 160 $PY bench/e2e_bench.py --images 60502 --workers 16 --cache --out "$OUT/e2e_cache.json"
step data_cpu16 120 $PY bench/data_bench.py --workers 16 --images 4000 --out "$OUT/data_bench16.json"
# Second half: the other switches (with the reference again, for their ratios) and the embedding rows, the
# end-to-end run from the originals, exact kNN.
step train_rest 230 $PY bench/train_bench.py --steps 6 --warmup 2 \
  --only "reference,eager attention,SDPA attention,grad checkpointing,embed bf16: SDPA + torch.compile" \
  --out "$OUT/train_rest.json"
step e2e 150 $PY bench/e2e_bench.py --images 60502 --workers 16 --out "$OUT/e2e.json"
step eval_gpu 80 $PY bench/eval_bench.py --devices cuda --dims 512,1024 --out "$OUT/eval_gpu.json"
