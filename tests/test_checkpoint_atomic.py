"""kill -9 at any moment during checkpoint writing never leaves a torn last.pt."""

import os
import signal
import subprocess
import sys
import time

import torch

from conftest import REPO_ROOT
from checkpoint import load_checkpoint

WRITER = """
import sys, torch
sys.path.insert(0, {repo!r})
from checkpoint import save_checkpoint_atomically
from pathlib import Path
path = Path({path!r})
for i in range(100000):
    payload = torch.full((300_000,), float(i))  # 1.2 MB: each write takes a while, so kills land mid-write
    save_checkpoint_atomically({{"i": i, "payload": payload, "check": float(payload.sum())}}, path)
    print(i, flush=True)
"""


def test_kill_9_while_writing_checkpoints_in_a_loop_leaves_a_loadable_one(tmp_path):
    path = tmp_path / "last.pt"
    script = WRITER.format(repo=str(REPO_ROOT), path=str(path))
    for attempt, delay in enumerate((0.05, 0.13, 0.21, 0.37)):
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        process.stdout.readline()  # at least one checkpoint exists
        time.sleep(delay)  # then kill at an arbitrary point of a later write
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        checkpoint = load_checkpoint(path)
        assert checkpoint["payload"].shape == (300_000,)
        assert torch.all(checkpoint["payload"] == checkpoint["i"])
        assert float(checkpoint["payload"].sum()) == checkpoint["check"]
