#!/usr/bin/env bash
# One prepared device session for issue 17: every GPU measurement, as JSON under $OUT, printed as it goes.
#   OUT=/tmp/out bash bench/gpu_session.sh                     (the default steps, within BUDGET_S seconds)
#   STEPS="attention knn sweeps" OUT=/tmp/out bash bench/gpu_session.sh      (only the named steps)
#   DRY_RUN=1 OUT=/tmp/dry bash bench/gpu_session.sh           (the same commands at --tiny sizes, on a CPU)
# Steps run in the order below, which is their priority. Before each, the time left of BUDGET_S (default 570 s:
# the device tool allows 600 s per command) must cover the step's expected seconds, else it is skipped and the
# end of the log names the STEPS=... command that runs what was skipped, in a second command of the session.
# Expected seconds are estimates, not yet measured (a cold torch.compile of Swinv2-B took 120-140 s on an H200,
# e2e 88 s); the flex compile is the least known. No step needs network or faiss.
# The device machine lacks pytorch-metric-learning (objective.py, the captured-step tests): carry a copy of this
# venv's pure-Python package in the ignored folder .whl, which the script puts on PYTHONPATH when needed:
#   mkdir -p .whl/site && cp -r .venv/lib/python3.11/site-packages/pytorch_metric_learning .whl/site/
#   then run with carry [".whl"]: OUT=$OUT bash bench/gpu_session.sh
# Optional steps (not in the default list): profile, profile_flex (where a compiled step's time goes, by kernel),
# flex_tests (the CUDA test of tests/test_flex_attention.py), trainer_rows (Trainer.train_step compiled, SDPA
# and flex), sweep_compiled (the compiled SDPA step at batch 128, 256, 384), e2e_cache, e2e_flex, e2e_compiled
# (the compiled evaluation with nvjpeg, on a cold and then a warm compile cache), jpeg_decode
# (bench/jpeg_decode_bench.py: GPU JPEG decoding against the loader's), ddp (bench/ddp_bench.py: the training
# step with and without the DDP wrapper).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled
OUT=${OUT:-/tmp/gpu_session}
DRY_RUN=${DRY_RUN:-0}
DEFAULT_STEPS="cuda_tests e2e e2e_device_decode knn_card train_captured train_flex attention knn sweeps"
STEPS=${STEPS:-$DEFAULT_STEPS}
PY=${PY:-python3}
if [ "$DRY_RUN" = 1 ]; then
  TINY=--tiny; BUDGET_S=${BUDGET_S:-7200}
else
  TINY=; BUDGET_S=${BUDGET_S:-570}
fi
START=$(date +%s)
SKIPPED=""
mkdir -p "$OUT"
# At most 8 files come back from the device: one log (this header included) and, at the end, results.json, which
# gathers every step's JSON (one file per step would pass that limit).
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/session.log"
else
  echo "no nvidia-smi: no GPU here" | tee -a "$OUT/session.log"
fi
if ! $PY -c "import pytorch_metric_learning" 2>/dev/null && [ -d .whl/site/pytorch_metric_learning ]; then
  export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
fi
$PY -c "import torch, transformers, pytorch_metric_learning as p; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'pytorch-metric-learning', p.__version__)" 2>&1 | tee -a "$OUT/session.log"

step() {  # step NAME EXPECTED_SECONDS COMMAND...: runs when NAME is in $STEPS and the budget has room
  local name=$1 expected=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if [ "$left" -lt "$expected" ]; then
    echo "=== $name skipped: ${left}s left of ${BUDGET_S}s, ${expected}s expected" | tee -a "$OUT/session.log"
    SKIPPED="$SKIPPED $name"
    return 0
  fi
  echo "=== $name (expected ${expected}s, at most ${left}s)" | tee -a "$OUT/session.log"
  local started=$(date +%s)
  # One log for all steps: the device returns at most 8 files per command.
  timeout "$left" "$@" 2>&1 | grep -v -e "batch/s" -e "USDT" | tee -a "$OUT/session.log" | tail -30
  local rc=${PIPESTATUS[0]}
  echo "=== $name done in $(( $(date +%s) - started ))s (rc $rc)" | tee -a "$OUT/session.log"
}

if [ "$DRY_RUN" = 1 ]; then
  E2E_SIZE=(--tiny); KNN=(--tiny --devices cpu); WORKERS=2
else
  E2E_SIZE=(--images 60502); KNN=(--devices cuda --dims 1024 --cases ours/torch); WORKERS=16
fi

# Correctness first: the captured steps' losses and weights against eager steps on the tiny model, nvjpeg's
# pictures against the loader's, and the search kept on the card against the CPU search (CUDA tests).
step cuda_tests 50 $PY -m pytest -q -p no:cacheprovider tests/test_captured_step.py tests/test_device_decode.py \
  tests/test_retrieval_metrics.py -k cuda
# The whole --mode eval of 60,502 JPEGs (the on-device masks and the uncompiled CUDA graph, eval.cuda_graph),
# then the same with the JPEGs decoded by nvjpeg on the GPU (data.eval_decode=device): workers only read bytes.
step e2e 110 $PY bench/e2e_bench.py "${E2E_SIZE[@]}" --workers $WORKERS --out "$OUT/e2e.json"
step e2e_device_decode 110 $PY bench/e2e_bench.py "${E2E_SIZE[@]}" --workers $WORKERS --decode device \
  --out "$OUT/e2e_device_decode.json"
# Exact kNN + metrics at 60,502 x 1,024, k = 1,001, neighbours and metrics on the card: the CUDA default budget
# (eval.memory_gb=0: half the card's free memory), and a 1 GB budget (the CPU default) later.
step knn_card 40 $PY bench/eval_bench.py "${KNN[@]}" --memory-gb 0 --out "$OUT/knn_card.json"
# The captured training step against the same step uncaptured, one compiled SDPA model for all rows (its cold
# compile is most of the time), then the compiled embedding and the compiled embedding replayed as a CUDA graph.
step train_captured 240 $PY bench/train_bench.py $TINY --steps 6 --warmup 2 \
  --only "reference,): SDPA + torch.compile,embed bf16: SDPA + torch.compile" --out "$OUT/train_captured.json"
# flex_attention in the compiled step, uncaptured and captured (its own cold compile).
step train_flex 220 $PY bench/train_bench.py $TINY --steps 6 --warmup 2 --only "): flex + torch.compile" \
  --out "$OUT/train_flex.json"
# The attention module alone, forward + backward and forward: SDPA vs flex, both bias layouts (stage 1, masked).
step attention 70 $PY bench/attention_bench.py $TINY --scope module --module-stages 1 \
  --variants sdpa,flex,flex-gathered --out "$OUT/attention.json"
step knn 50 $PY bench/eval_bench.py "${KNN[@]}" --memory-gb 1 --out "$OUT/knn_1gb.json"
# Images/s and peak memory per batch size (the uncompiled SDPA step), the uncompiled CUDA-graph embedding per
# batch size, and the channels-last eager embedding.
step sweeps 70 $PY bench/train_bench.py $TINY --steps 4 --warmup 2 --sweep 128,256,384 --embed-sweep 512 \
  --only "batch sweep,embed sweep,embed bf16: SDPA + CUDA graph,channels-last batch as the loader" \
  --out "$OUT/sweeps.json"

# Optional steps.
step profile 180 $PY bench/profile_step.py $TINY --out "$OUT/profile.json"
step profile_flex 220 $PY bench/profile_step.py $TINY --attention flex --out "$OUT/profile_flex.json"
step flex_tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_flex_attention.py -k cuda
step trainer_rows 360 $PY bench/train_bench.py $TINY --steps 6 --warmup 2 \
  --only "reference,ours: + SDPA + torch.compile,ours: + flex + torch.compile" --out "$OUT/trainer_rows.json"
step sweep_compiled 360 $PY bench/train_bench.py $TINY --steps 4 --warmup 2 --sweep 128,256,384 --sweep-compile \
  --only "batch sweep" --out "$OUT/sweep_compiled.json"
step e2e_cache 170 $PY bench/e2e_bench.py "${E2E_SIZE[@]}" --workers $WORKERS --cache --out "$OUT/e2e_cache.json"
step e2e_flex 200 $PY bench/e2e_bench.py "${E2E_SIZE[@]}" --workers $WORKERS --attention flex \
  --out "$OUT/e2e_flex.json"
# The evaluation at its fastest: the compiled embedding with nvjpeg decoding, run twice on one fresh inductor
# cache: the cold run pays the compile, the warm one (a user's second run, or a cluster job given a shared
# TORCHINDUCTOR_CACHE_DIR) reads the compiled kernels back. The difference is the compile's share of start-up.
INDUCTOR_CACHE=$(mktemp -d)  # fresh: the first run below is cold
step e2e_compiled 300 env TORCHINDUCTOR_CACHE_DIR="$INDUCTOR_CACHE" bash -c 'python=$1 out=$2; shift 2
  for run in cold warm; do "$python" bench/e2e_bench.py "$@" --decode device --extra eval.compile=true \
    --out "$out/e2e_compiled_$run.json" || exit; done' _ "$PY" "$OUT" "${E2E_SIZE[@]}" --workers $WORKERS
# GPU JPEG decoding, one image and lists per call, and the whole data.eval_decode=device batch (decode, turn,
# resize, crop), against the loader's CPU decode.
step jpeg_decode 40 $PY bench/jpeg_decode_bench.py $TINY --out "$OUT/jpeg_decode.json"
# Step time with and without the DDP wrapper in a world of one (NCCL; more rows with more GPUs), issue 16.
step ddp 120 $PY bench/ddp_bench.py $TINY --steps 10 --out "$OUT/ddp.json"

($PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
parts = sorted(path for path in out.glob("*.json") if path.name != "results.json")
gathered = out / "results.json"  # kept from an earlier command into the same folder, when there is one
results = json.loads(gathered.read_text()) if gathered.exists() else {}
for path in parts:
    try:  # a step killed while writing leaves a broken file: keep its error, gather the rest
        results[path.stem] = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        results[path.stem] = {"unreadable": f"{type(error).__name__}: {error}"}
gathered.write_text(json.dumps(results, indent=1))
for path in parts:
    path.unlink()
print(f"=== {len(parts)} step results gathered in {out / 'results.json'}")
PY
) 2>&1 | tee -a "$OUT/session.log"
echo "=== session done in $(( $(date +%s) - START ))s" | tee -a "$OUT/session.log"
if [ -n "$SKIPPED" ]; then
  echo "=== skipped for time; run next: STEPS=\"${SKIPPED# }\" OUT=$OUT bash bench/gpu_session.sh" | tee -a "$OUT/session.log"
fi
