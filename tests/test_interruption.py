"""SIGTERM (SLURM pre-emption) to a real training process: a checkpoint at a step boundary, exit code 3,
and --resume finishes the run."""

import signal
import subprocess
import sys
import time

import main
from conftest import REPO_ROOT
from checkpoint import load_checkpoint


def overrides(tmp_path, epochs):
    return [f"data.root={tmp_path / 'demo'}", "data.demo_classes=40", "data.demo_images_per_class=8",
            "data.image_size=32", "data.val_fraction=0.25", "data.classes_per_batch=3", "data.images_per_class=2",
            "data.num_workers=1", f"train.epochs={epochs}", f"output.dir={tmp_path / 'run'}", "wandb.mode=disabled"]


def test_sigterm_saves_at_a_step_boundary_and_resume_completes(tmp_path):
    config = str(REPO_ROOT / "configs" / "demo.yaml")
    process = subprocess.Popen([sys.executable, "main.py", "--mode", "train", "--config", config,
                                *overrides(tmp_path, 1000)],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:  # wait until training is really under way: one epoch done
            if line.startswith("epoch 1:"):
                break
        time.sleep(0.3)  # land somewhere inside epoch 2
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == main.EXIT_INTERRUPTED, stderr[-2000:]
    assert "SIGTERM" in stderr and "--resume" in stderr
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    assert saved["epoch"] >= 1
    steps_per_epoch = len(saved["history"]) and saved["global_step"] - saved["batches_done_in_epoch"]
    assert saved["global_step"] == saved["epoch"] * (steps_per_epoch // saved["epoch"]) + saved["batches_done_in_epoch"]

    # Resume to a near end: the interrupted epoch continues where it stopped, no batch repeated or skipped.
    target = saved["epoch"] + 2
    assert main.main(["--mode", "train", "--config", config, "--resume", *overrides(tmp_path, target)]) == 0
    final = load_checkpoint(tmp_path / "run" / "last.pt")
    per_epoch = (saved["global_step"] - saved["batches_done_in_epoch"]) // saved["epoch"]
    assert final["epoch"] == target and final["batches_done_in_epoch"] == 0
    assert final["global_step"] == target * per_epoch
    assert [record["epoch"] for record in final["history"]] == list(range(1, target + 1))


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    """Same seed, CPU, num_workers=0: the batch plan, augmentations (global RNG, saved in last.pt), stochastic
    depth, miner draws, optimiser and scheduler all continue exactly, so the weights must match. Expected
    bit-for-bit; the 1e-6 tolerance only allows for a different float reduction order between processes."""
    import torch

    config = str(REPO_ROOT / "configs" / "demo.yaml")

    def settings(folder, epochs):
        return [*overrides(tmp_path, epochs)[:-2], "data.num_workers=0", f"train.epochs={epochs}",
                f"output.dir={folder}", "wandb.mode=disabled"]

    assert main.main(["--mode", "train", "--config", config, *settings(tmp_path / "straight", 3)]) == 0

    process = subprocess.Popen([sys.executable, "main.py", "--mode", "train", "--config", config,
                                *settings(tmp_path / "interrupted", 3)],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stdout:
            if line.startswith("epoch 1:"):
                break
        time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == main.EXIT_INTERRUPTED
    interrupted_at = load_checkpoint(tmp_path / "interrupted" / "last.pt")
    assert interrupted_at["epoch"] < 3
    assert main.main(["--mode", "train", "--config", config, "--resume", *settings(tmp_path / "interrupted", 3)]) == 0

    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "interrupted" / "last.pt")
    assert resumed["global_step"] == straight["global_step"]
    for name, tensor in straight["model"].items():
        assert torch.allclose(resumed["model"][name], tensor, atol=1e-6, rtol=0), name
    for before, after in zip(straight["history"], resumed["history"]):
        assert after["val/recall@1"] == before["val/recall@1"]
        assert abs(after["val/map@r"] - before["val/map@r"]) < 1e-6
