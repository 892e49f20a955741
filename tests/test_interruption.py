"""SIGTERM (SLURM pre-emption) during training: a checkpoint at a step boundary, exit code 3, and --resume
finishes the run. One real `python main.py` process is killed; the exact-continuation check runs in-process."""

import os
import signal
import subprocess
import sys

import torch

import main
from checkpoint import load_checkpoint
from conftest import DEMO_CONFIG, REPO_ROOT
from trainer import Trainer


def overrides(tmp_path, run_dir, epochs, workers):
    """8 demo classes of 6 images: 3 training classes (18 images), so 3 P x K batches of 3 x 2 per epoch."""
    return [f"data.root={tmp_path / 'demo'}", "data.demo_classes=8", "data.demo_images_per_class=6",
            "data.image_size=32", "data.val_fraction=0.25", "data.classes_per_batch=3", "data.images_per_class=2",
            f"data.num_workers={workers}", "data.startup_check=none", f"train.epochs={epochs}",
            f"output.dir={run_dir}", "wandb.mode=disabled"]


def batches_per_epoch(arguments):
    """len() of the P x K sampler over the training split these overrides give (generating the demo data)."""
    from config import load_config
    from dataloaders.loaders import resolve_image_lists
    from dataloaders.samplers import PKBatchSampler

    config = load_config(DEMO_CONFIG, arguments)
    train_list, _, _ = resolve_image_lists(config.data, config.train.seed, need_train=True, need_test=False)
    return len(PKBatchSampler(train_list.labels, config.data.classes_per_batch, config.data.images_per_class,
                              config.train.seed))


def train(*arguments):
    return main.main(["--mode", "train", "--config", str(DEMO_CONFIG), *map(str, arguments)])


def test_sigterm_to_a_real_process_saves_at_a_step_boundary_and_resume_completes(tmp_path):
    """With a loader worker, as on a cluster: the worker ignores SIGTERM, the main process stops the run."""
    run = tmp_path / "run"
    per_epoch = batches_per_epoch(overrides(tmp_path, run, 1000, workers=1))
    assert per_epoch >= 2  # so that a stop can land inside an epoch
    process = subprocess.Popen([sys.executable, "main.py", "--mode", "train", "--config", str(DEMO_CONFIG),
                                *overrides(tmp_path, run, 1000, workers=1)],
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    printed = []
    try:
        for line in process.stdout:  # wait until training is really under way: one epoch done
            printed.append(line)
            if line.startswith("epoch 1:"):
                break
        process.send_signal(signal.SIGTERM)  # lands somewhere in epoch 2 or later
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == main.EXIT_INTERRUPTED, stderr[-2000:]
    assert "SIGTERM" in stderr and "--resume" in stderr
    assert f"{per_epoch} batches per epoch" in "".join(printed)  # the run's own count is the sampler's
    saved = load_checkpoint(run / "last.pt")
    assert saved["epoch"] >= 1 and 1 <= saved["batches_done_in_epoch"] <= per_epoch
    assert saved["global_step"] == saved["epoch"] * per_epoch + saved["batches_done_in_epoch"]

    # Resume to a near end: the interrupted epoch continues where it stopped, no batch repeated or skipped,
    # and the epoch after it runs whole.
    target = saved["epoch"] + 2
    assert train("--resume", *overrides(tmp_path, run, target, workers=1)) == 0
    final = load_checkpoint(run / "last.pt")
    assert final["epoch"] == target and final["batches_done_in_epoch"] == 0
    assert final["global_step"] == target * per_epoch
    assert [record["epoch"] for record in final["history"]] == list(range(1, target + 1))


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path, monkeypatch, capsys):
    """Same seed, CPU, num_workers=0: the batch plan, augmentations (global RNG, saved in last.pt), stochastic
    depth, miner draws, optimiser and scheduler all continue exactly, so the weights match bit for bit.

    The stop comes from a real SIGTERM, sent to this process from inside a training step, in the middle of epoch 2."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    per_epoch = batches_per_epoch(overrides(tmp_path, straight, 2, workers=0))
    assert train(*overrides(tmp_path, straight, 2, workers=0)) == 0

    stop_after = per_epoch + 1
    real_train_step = Trainer.train_step

    def step_then_sigterm(self, *batch):
        result = real_train_step(self, *batch)
        if self.global_step == stop_after:
            # Only with the trainer's handler in place: the default action would end the test session.
            assert signal.getsignal(signal.SIGTERM) == self._request_stop
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_sigterm)
    capsys.readouterr()
    assert train(*overrides(tmp_path, interrupted, 2, workers=0)) == main.EXIT_INTERRUPTED
    error = capsys.readouterr().err
    assert "SIGTERM" in error and "--resume" in error
    monkeypatch.undo()
    interrupted_at = load_checkpoint(interrupted / "last.pt")
    assert (interrupted_at["epoch"], interrupted_at["batches_done_in_epoch"]) == (1, 1)
    assert interrupted_at["global_step"] == stop_after
    assert train("--resume", *overrides(tmp_path, interrupted, 2, workers=0)) == 0

    expected = load_checkpoint(straight / "last.pt")
    resumed = load_checkpoint(interrupted / "last.pt")
    assert resumed["global_step"] == expected["global_step"] == 2 * per_epoch
    for name, tensor in expected["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    assert len(resumed["history"]) == len(expected["history"]) == 2
    for before, after in zip(expected["history"], resumed["history"]):
        assert after["val/recall@1"] == before["val/recall@1"]
        assert after["val/map@r"] == before["val/map@r"]
