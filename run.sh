#!/usr/bin/env bash
# The real SOP experiment: train (model chosen on held-out training classes), then evaluate best.pt on the SOP
# test split. Extra arguments are config overrides, e.g.
#   ./run.sh data.root=/data/Stanford_Online_Products output.dir=models_ckpt/sop_run1
# Under SLURM, one GPU:  srun --gres=gpu:1 --cpus-per-task=16 --mem=64G ./run.sh data.root=...
# Several GPUs of this node (torchrun, one process per GPU):  NPROC_PER_NODE=8 ./run.sh data.root=...
# Several nodes: sbatch slurm/train.sbatch data.root=...  (srun starts this script once per node; the first
# node named by `scontrol show hostnames` hosts the rendezvous). See docs/distributed.md.
# The run folder gets config.yaml, metrics.jsonl, last.pt, best.pt, report.json and the test embeddings.
# Exit code 3: training was stopped by SIGTERM/SIGINT after saving last.pt; running this again resumes it.
set -euo pipefail
cd "$(dirname "$0")"
CONFIG=${CONFIG:-configs/sop.yaml}
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
NNODES=${SLURM_NNODES:-1}
# torch.compile's kernels (configs/sop.yaml compiles) are kept beside the code, on the cluster's shared filesystem,
# instead of in each node's /tmp: a requeued or later job on another node reads them back instead of compiling
# for minutes again (docs/performance.md). An inductor cache directory set by the caller wins.
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/torchinductor}

OUTPUT_DIR=$("$PYTHON" - "$CONFIG" "$@" <<'PY'
import sys
from config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).output.dir)
PY
)
if [ -f "$OUTPUT_DIR/last.pt" ]; then
  RESUME=--resume   # a requeued or restarted job continues where it stopped
else
  RESUME=
fi

if [ "$NNODES" -gt 1 ]; then
  HOSTS=$(scontrol show hostnames "$SLURM_JOB_NODELIST")  # not piped into head: pipefail would see SIGPIPE
  HEAD_NODE=${HOSTS%%$'\n'*}
  LAUNCH=("$TORCHRUN" --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" --rdzv-backend=c10d
          --rdzv-endpoint="$HEAD_NODE:${RDZV_PORT:-29500}" --rdzv-id="${SLURM_JOB_ID:-run}")
elif [ "$NPROC_PER_NODE" -gt 1 ]; then
  LAUNCH=("$TORCHRUN" --standalone --nnodes=1 --nproc-per-node="$NPROC_PER_NODE")
else
  LAUNCH=("$PYTHON")
fi

# A stop signal sent to this script (SLURM's --signal, scancel, Ctrl-C) is passed on: bash would otherwise hold
# it until the training ended. The training saves last.pt at the next step boundary and exits 3.
forwarding_stop_signals() {
  "$@" &
  local child=$! code=0
  trap 'kill -TERM "$child" 2>/dev/null || true' TERM INT
  wait "$child" || code=$?
  while kill -0 "$child" 2>/dev/null; do  # wait was cut short by the trap: the child is still saving
    code=0
    wait "$child" || code=$?
  done
  trap - TERM INT
  return "$code"
}

rm -f "$OUTPUT_DIR/interrupted.txt"  # left by an earlier stopped run: only this run's may count
code=0
forwarding_stop_signals "${LAUNCH[@]}" main.py --mode train --config "$CONFIG" $RESUME "$@" || code=$?
if [ "$code" -ne 0 ]; then
  # torchrun exits 1 whatever its processes' code: rank 0 leaves this file when a stop signal ended training.
  if [ -f "$OUTPUT_DIR/interrupted.txt" ]; then
    exit 3
  fi
  exit "$code"
fi
"${LAUNCH[@]}" main.py --mode eval --config "$CONFIG" "$@"
