"""Shared test set-up: offline, quiet, and where the read-only real data lives."""

import contextlib
import io
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # ../shared/data beside the clone; absent on users' machines
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n N`: N workers share the cores, so each (and every process it starts) computes on one thread;
    # two workers of two threads each on a 2-core machine made the suite 4x slower, not 2x faster.
    os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, str(REPO_ROOT))


def load_docs_script(name: str):
    """docs/<name>.py (a script, not a package module) imported as a module, for its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def host_tensor_spy():
    """A TorchDispatchMode that lists the operations given a tensor on the host (`.host_ops`).

    With a model on 'meta' standing in for a GPU, an empty list means the forward makes no host tensor
    and copies nothing from the host: what a CUDA graph capture needs.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostTensorSpy(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.host_ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs))
            if any(isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu" for leaf in leaves):
                self.host_ops.append(str(func))
            return func(*args, **(kwargs or {}))

    return HostTensorSpy()


def tiny_demo_overrides(data_root, run_dir, **extra) -> list[str]:
    """`section.key=value` for the smallest demo run (with --config configs/demo.yaml) that still trains, validates
    and evaluates: 8 generated classes of 4 images at 32 px, i.e. 3 training classes (12 images: 2 P x K batches of
    3 x 2), 1 validation class (4 images) and 4 test classes (16 images); the tiny Swinv2 (64-d), 1 epoch, CPU."""
    values = {
        "data.root": data_root, "data.demo_classes": 8, "data.demo_images_per_class": 4, "data.image_size": 32,
        "data.val_fraction": 0.25, "data.classes_per_batch": 3, "data.images_per_class": 2, "train.epochs": 1,
        "output.dir": run_dir, "wandb.mode": "disabled",
        "eval.recall_ks": "[1,2,4]", "eval.map_ks": "[4]",  # 16 test images: every k must be <= 15
    }
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


@dataclass(frozen=True)
class TrainedRun:
    """A finished run folder (`run_dir`), its generated data (`data_root`) and what the training printed."""

    data_root: Path
    run_dir: Path
    printed: str  # stdout and stderr of the training, as the user saw them

    def overrides(self, run_dir, **extra) -> list[str]:
        """The training's own overrides, writing to `run_dir` (plus `extra`)."""
        return tiny_demo_overrides(self.data_root, run_dir, **extra)

    def copy(self, destination: Path) -> Path:
        """A private copy of the run folder, to resume, evaluate into or refuse to touch."""
        shutil.copytree(self.run_dir, destination)
        return destination

    def batches_per_epoch(self) -> int:
        """From the line the run printed before training (the sampler's len), not from its checkpoint."""
        return int(re.search(r"(\d+) batches per epoch", self.printed).group(1))


@pytest.fixture(scope="session")
def trained_demo_run(tmp_path_factory) -> TrainedRun:
    """`python main.py --mode train --config configs/demo.yaml` with `tiny_demo_overrides`, in-process, trained
    once per session and shared: read it, or `.copy()` the run folder before anything writes to it. The generated
    data are shared read-only."""
    import main

    folder = tmp_path_factory.mktemp("trained_demo_run")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
        code = main.main(["--mode", "train", "--config", str(DEMO_CONFIG),
                          *tiny_demo_overrides(folder / "demo_data", folder / "run")])
    assert code == 0, printed.getvalue()[-3000:]
    return TrainedRun(folder / "demo_data", folder / "run", printed.getvalue())
