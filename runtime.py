"""Process set-up shared by the modes: the device, its matmul precision, and the seeds."""

from __future__ import annotations

import random

import numpy as np
import torch

from errors import UsageError


def select_device(name: str, key: str = "train.device") -> torch.device:
    """`auto` = the first GPU when there is one, else the CPU; `cuda` without a GPU is a usage error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"{key}={name} but no CUDA device is available")
    return torch.device(name)


def configure_matmul_precision(device: torch.device, allow_tf32: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (Ampere and later).

    The exact kNN search turns TF32 off for itself (retrieval.py), whatever is set here.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
