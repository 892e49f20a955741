#!/usr/bin/env bash
# One prepared device session: every GPU measurement of the benches, results as JSON under $OUT.
#   OUT=/tmp/out bash bench/gpu_session.sh          (on a CUDA machine; each step has its own time limit)
#   STEPS="train_goal train_rest profile" OUT=/tmp/out bash bench/gpu_session.sh     (only the named steps)
# The device tool allows 600 s per command and 900 s per session, start included. Durations measured on
# an H200 (2026-11-27): embed_graph 48 s, cuda_tests 15 s, e2e 88 s, e2e_cache 89 s (the default, about
# 250 s: the embedding path, the newest work); train_goal 158 s, train_rest 103 s, profile 71 s (the
# training half, about 330 s); data_cpu16 and eval_gpu about 120 s together. The machine goes back after
# 30 s idle: run the next command at once.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
OUT=${OUT:-/tmp/gpu_session}
STEPS=${STEPS:-"embed_graph cuda_tests e2e e2e_cache"}
mkdir -p "$OUT"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: runs only when NAME is in $STEPS
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s)" | tee -a "$OUT/session.log"
  local started=$(date +%s)
  # One log for all steps: the device returns at most 8 files per command.
  timeout "$limit" "$@" 2>&1 | grep -v -e "batch/s" -e "USDT" | tee -a "$OUT/session.log" | tail -25
  echo "=== $name done in $(( $(date +%s) - started ))s" | tee -a "$OUT/session.log"
}

# The training goal (images/s and the ratio to the reference's way, one process, one card; the reference is
# timed before and after, because it varied by 30% between two processes on one H200).
step train_goal 200 $PY bench/train_bench.py --steps 6 --warmup 2 --only "reference,+ SDPA + torch.compile" \
  --reference-again --out "$OUT/train_goal.json"
# The other switches, with the reference again for their ratios, and the embedding rows.
step train_rest 150 $PY bench/train_bench.py --steps 6 --warmup 2 \
  --only "reference,eager attention,SDPA attention,grad checkpointing,embed bf16: SDPA + torch.compile" \
  --out "$OUT/train_rest.json"
# Where the compiled training step's GPU time goes, by kernel.
step profile 180 $PY bench/profile_step.py --out "$OUT/profile.json"
# Second half: the CUDA-graph embedding (checked against the plain forward, then 100 batches of each), the
# CUDA-only tests when pytest is there, end to end from the originals and from the downsized cache (untimed
# build), the loader on the device's CPUs, exact kNN.
step embed_graph 100 $PY bench/train_bench.py --steps 100 --warmup 3 --only "channels-last" --out "$OUT/embed_graph.json"
if $PY -c "import pytest" 2>/dev/null; then
  step cuda_tests 60 $PY -m pytest -q -p no:cacheprovider tests/test_graphed_inference.py -k cuda
fi
step e2e 150 $PY bench/e2e_bench.py --images 60502 --workers 16 --out "$OUT/e2e.json"
step e2e_cache 160 $PY bench/e2e_bench.py --images 60502 --workers 16 --cache --out "$OUT/e2e_cache.json"
step data_cpu16 120 $PY bench/data_bench.py --workers 16 --images 4000 --out "$OUT/data_bench16.json"
step eval_gpu 80 $PY bench/eval_bench.py --devices cuda --dims 512,1024 --out "$OUT/eval_gpu.json"
