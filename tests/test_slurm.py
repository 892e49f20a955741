"""run.sh and slurm/train.sbatch under stand-ins for sbatch, srun, scontrol, torchrun and python on PATH: which
launcher starts, with which rendezvous, and when the job requeues itself. No SLURM, no training: each stand-in
logs how it was called (one line per call) and does what the scenario says."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
STAND_INS = {
    # sbatch: run the script as SLURM would in its allocation (nodes from the #SBATCH header, 4 GPUs each).
    "sbatch": r'''
echo "sbatch $*" >> "$LOG"
nodes=$(sed -n 's/^#SBATCH --nodes=//p' "$1")
SLURM_JOB_ID=4242 SLURM_NNODES=$nodes SLURM_JOB_NODELIST="gpu-node[07-08]" SLURM_GPUS_ON_NODE=4 \
  SLURM_CPUS_PER_TASK=32 SLURM_SUBMIT_DIR="$PWD" bash "$@"
''',
    "srun": 'echo "srun $*" >> "$LOG"; while [ "${1#-}" != "$1" ]; do shift; done; exec "$@"',  # one node's task
    "scontrol": r'''
echo "scontrol $*" >> "$LOG"
if [ "$1 $2" = "show hostnames" ]; then [ "$3" = "gpu-node[07-08]" ] && printf 'gpu-node07\ngpu-node08\n'; fi
''',
    # torchrun and python: log the call; training may write interrupted.txt (rank 0 after a stop signal).
    "torchrun": 'echo "torchrun $*" >> "$LOG"; case "$*" in *"--mode train"*) '
                '[ -n "${STOPPED:-}" ] && echo stopped > "$OUTPUT_DIR/interrupted.txt"; exit "${TRAIN_EXIT:-0}";; esac',
    "python": r'''
if [ "$1" = "-" ]; then echo "$OUTPUT_DIR"; exit 0; fi  # run.sh asks for output.dir
echo "python $*" >> "$LOG"
case "$*" in *"--mode train"*)
  if [ -n "${WAIT_FOR_TERM:-}" ]; then  # a training that saves and exits 3 on SIGTERM, as main.py does
    trap 'echo "python got TERM" >> "$LOG"; exit 3' TERM
    touch "$OUTPUT_DIR/started"
    for _ in $(seq 300); do sleep 0.01; done  # bounded: 3 s at most
    exit 0
  fi
  exit "${TRAIN_EXIT:-0}";;
esac
''',
}


@pytest.fixture
def slurm(tmp_path):
    """(run(command, **env) -> (exit code, log lines), environment) with the stand-ins first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STAND_INS.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    log = tmp_path / "calls.log"
    base = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "OUTPUT_DIR": str(output_dir),
            "HOME": str(tmp_path)}

    def run(command: list[str], **env) -> tuple[int, list[str]]:
        done = subprocess.run(command, cwd=REPO_ROOT, env={**base, **env}, capture_output=True, text=True, timeout=30)
        return done.returncode, log.read_text().splitlines() if log.exists() else []

    return run, output_dir, base


SUBMIT = ["sbatch", "slurm/train.sbatch", "data.root=/data/sop", "output.dir=models_ckpt/sop_ddp"]


def test_sbatch_starts_one_torchrun_per_node_with_a_rendezvous_on_the_first_host(slurm):
    run, _, _ = slurm
    code, calls = run(SUBMIT)
    assert code == 0
    assert calls[1] == "srun --ntasks-per-node=1 ./run.sh data.num_workers=7 data.root=/data/sop output.dir=models_ckpt/sop_ddp"
    assert "scontrol show hostnames gpu-node[07-08]" in calls
    rendezvous = ("--nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=gpu-node07:29500 "
                  "--rdzv-id=4242 main.py")
    trainings = [line for line in calls if line.startswith("torchrun") and "--mode train" in line]
    evaluations = [line for line in calls if line.startswith("torchrun") and "--mode eval" in line]
    assert trainings == [f"torchrun {rendezvous} --mode train --config configs/sop.yaml data.num_workers=7 "
                         f"data.root=/data/sop output.dir=models_ckpt/sop_ddp"]
    assert evaluations == [f"torchrun {rendezvous} --mode eval --config configs/sop.yaml data.num_workers=7 "
                           f"data.root=/data/sop output.dir=models_ckpt/sop_ddp"]
    assert not any("requeue" in line for line in calls)


def test_a_stopped_training_requeues_the_job_and_resumes_from_last_pt(slurm):
    run, output_dir, _ = slurm
    # torchrun exits 1 whatever its processes' code; rank 0's interrupted.txt says they were stopped
    code, calls = run(SUBMIT, TRAIN_EXIT="1", STOPPED="1")
    assert code == 3
    assert calls[-1] == "scontrol requeue 4242"
    assert not any("--mode eval" in line for line in calls)
    (output_dir / "last.pt").write_bytes(b"saved")  # what the stopped training left
    code, calls = run(SUBMIT)  # the requeued job
    assert code == 0
    assert any(line.startswith("torchrun") and "--mode train --config configs/sop.yaml --resume" in line
               for line in calls[-3:])


@pytest.mark.parametrize("train_exit", ["1", "2"])
def test_a_failed_training_is_not_requeued(slurm, train_exit):
    run, output_dir, _ = slurm
    (output_dir / "interrupted.txt").write_text("from an earlier, stopped run")  # stale: must not count
    code, calls = run(SUBMIT, TRAIN_EXIT=train_exit)
    assert code == int(train_exit)
    assert not any("requeue" in line or "--mode eval" in line for line in calls)


def test_interactive_srun_on_one_gpu_runs_python_as_before(slurm):
    run, _, _ = slurm
    code, calls = run(["srun", "--gres=gpu:1", "./run.sh", "data.root=/data/sop"], SLURM_NNODES="1")
    assert code == 0
    assert calls[1:] == ["python main.py --mode train --config configs/sop.yaml data.root=/data/sop",
                         "python main.py --mode eval --config configs/sop.yaml data.root=/data/sop"]


@pytest.mark.parametrize("given", ["", "/scratch/inductor"])
def test_compiled_kernels_are_cached_on_the_shared_filesystem_unless_the_caller_chose_a_place(slurm, tmp_path, given):
    run, _, _ = slurm
    telling_python = tmp_path / "bin" / "python_telling_its_cache"
    telling_python.write_text('#!/usr/bin/env bash\n[ "$1" = "-" ] && { echo "$OUTPUT_DIR"; exit 0; }\n'
                              'echo "cache=${TORCHINDUCTOR_CACHE_DIR:-unset} $2 $3" >> "$LOG"\n')
    telling_python.chmod(0o755)
    code, calls = run(["./run.sh"], PYTHON=str(telling_python), **({"TORCHINDUCTOR_CACHE_DIR": given} if given else {}))
    assert code == 0
    cache = given or str(REPO_ROOT / ".cache/torchinductor")
    assert calls == [f"cache={cache} --mode train", f"cache={cache} --mode eval"]


def test_several_gpus_of_one_node_use_a_standalone_torchrun(slurm):
    run, _, _ = slurm
    code, calls = run(["./run.sh", "data.root=/data/sop"], NPROC_PER_NODE="2")
    assert code == 0
    assert calls[0] == "torchrun --standalone --nnodes=1 --nproc-per-node=2 main.py --mode train --config " \
                       "configs/sop.yaml data.root=/data/sop"


def test_a_stop_signal_to_run_sh_reaches_the_training(slurm):
    _, output_dir, base = slurm
    process = subprocess.Popen(["./run.sh", "data.root=/data/sop"], cwd=REPO_ROOT,
                               env={**base, "WAIT_FOR_TERM": "1"})
    try:
        deadline = time.monotonic() + 10
        while not (output_dir / "started").exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # bounded wait for the stand-in training to start
        assert (output_dir / "started").exists()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 3
    finally:
        if process.poll() is None:
            process.kill()
    assert "python got TERM" in Path(base["LOG"]).read_text()



def shell_commands(markdown: Path, first_word: tuple[str, ...]) -> list[str]:
    """The commands of a document's ```bash blocks that start with one of `first_word` (continuations joined)."""
    commands, in_block, pending = [], False, ""
    for line in markdown.read_text().splitlines():
        if line.startswith("```"):
            in_block = line == "```bash"
            continue
        if not in_block or (not pending and (not line.strip() or line.startswith("#"))):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            command = pending.split("#")[0].strip()
            pending = ""
            if command.split()[0].split("=")[0] in first_word or command.split()[0] in first_word:
                commands.append(command)
    return commands


def test_the_documented_launch_commands_run_as_written(slurm):
    run, _, environment = slurm
    commands = [*shell_commands(REPO_ROOT / "README.md", ("sbatch", "NPROC_PER_NODE", "srun")),
                *shell_commands(REPO_ROOT / "docs" / "distributed.md", ("sbatch", "NPROC_PER_NODE", "srun", "torchrun"))]
    assert len(commands) >= 7  # README: srun, NPROC_PER_NODE, sbatch; distributed.md: those and 2 torchrun lines
    for command in commands:
        Path(environment["LOG"]).unlink(missing_ok=True)
        code, calls = run(["bash", "-c", command], SLURM_NNODES="1")
        assert code == 0, command
        launched = [line for line in calls if line.startswith(("torchrun", "python"))]
        assert launched and "main.py --mode" in launched[-1], command
