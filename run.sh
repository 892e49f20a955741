#!/usr/bin/env bash
# The real SOP experiment on one node: train (model chosen on held-out training classes), then evaluate
# best.pt on the SOP test split. Extra arguments are config overrides, e.g.
#   ./run.sh data.root=/data/Stanford_Online_Products output.dir=models_ckpt/sop_run1
# Under SLURM:  srun --gres=gpu:1 --cpus-per-task=16 --mem=64G ./run.sh data.root=...
# The run folder gets config.yaml, metrics.jsonl, last.pt, best.pt, report.json and the test embeddings.
set -euo pipefail
cd "$(dirname "$0")"
CONFIG=${CONFIG:-configs/sop.yaml}
PYTHON=${PYTHON:-python}

if [ -f "$("$PYTHON" - "$CONFIG" "$@" <<'PY'
import sys
from config import load_config
print(load_config(sys.argv[1], sys.argv[2:]).output.dir + "/last.pt")
PY
)" ]; then
  RESUME=--resume   # a requeued or restarted job continues where it stopped
else
  RESUME=
fi
"$PYTHON" main.py --mode train --config "$CONFIG" $RESUME "$@"
"$PYTHON" main.py --mode eval --config "$CONFIG" "$@"
