"""kill -9 at any moment during checkpoint writing never leaves a torn last.pt."""

import os
import signal
import subprocess
import sys
import time

import torch

from conftest import REPO_ROOT
from checkpoint import load_checkpoint

# One process imports torch once, then forks a fresh writer process for every line it reads; each writer saves
# checkpoints in a loop until it is killed.
WRITERS = """
import os, sys, torch
sys.path.insert(0, {repo!r})
from checkpoint import save_checkpoint_atomically, weights_digest
from pathlib import Path
path = Path({path!r})
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        for i in range(100000):
            weights = {{"payload": torch.full((300_000,), float(i))}}  # 1.2 MB: kills land mid-write
            save_checkpoint_atomically({{"model": weights, "weights_sha256": weights_digest(weights), "config": {{}},
                                        "i": i, "check": float(weights["payload"].sum())}}, path)
            print(i, flush=True)
        os._exit(0)
    print("writer", pid, flush=True)
    os.waitpid(pid, 0)
    print("gone", flush=True)
"""


def test_kill_9_while_writing_checkpoints_in_a_loop_leaves_a_loadable_one(tmp_path):
    path = tmp_path / "last.pt"
    script = WRITERS.format(repo=str(REPO_ROOT), path=str(path))
    forker = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for delay in (0.05, 0.13, 0.21, 0.37):
            forker.stdin.write("start\n")
            forker.stdin.flush()
            writer, written = None, False
            while writer is None or not written:  # its pid, and at least one checkpoint exists
                line = forker.stdout.readline()
                assert line, "the writer process ended"
                if line.startswith("writer "):
                    writer = int(line.split()[1])
                else:
                    written = True
            time.sleep(delay)  # then kill at an arbitrary point of a later write
            os.kill(writer, signal.SIGKILL)
            for line in forker.stdout:  # the writer's last lines, then its end
                if line.strip() == "gone":
                    break
            checkpoint = load_checkpoint(path)  # also checks the weights against their stored digest
            payload = checkpoint["model"]["payload"]
            assert payload.shape == (300_000,)
            assert torch.all(payload == checkpoint["i"])
            assert float(payload.sum()) == checkpoint["check"]
    finally:
        forker.kill()
        forker.wait(timeout=30)
