"""Shared test set-up: offline, quiet, and where the read-only real data lives."""

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # ../shared/data beside the clone; absent on users' machines

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(REPO_ROOT))


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
