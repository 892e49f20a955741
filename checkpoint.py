"""Checkpoints: one dict per file, written atomically, loaded without running code, checked before use.

`last.pt` holds everything a resume needs (model, optimiser, scheduler, scaler, RNGs, position in the
epoch); `best.pt` holds only what evaluation needs (`MODEL_ONLY_KEYS`): the weights, the configuration,
the epoch and the validation metrics. Both rebuild their model without the hub (`embedder_from_checkpoint`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import zipfile
from pathlib import Path

import torch

from config import differing_keys
from errors import UsageError

# What evaluation needs from a checkpoint; `best.pt` holds these and nothing else.
MODEL_ONLY_KEYS = ("model", "weights_sha256", "config", "epoch", "metrics", "backbone_config_json", "embedding_dim",
                   "normalisation", "wandb_run_id", "init_from")

# Keys whose change mid-run would break the run's promises (the epoch plan, the optimiser's state, the model):
# --resume refuses them. Every other key takes effect on resume (see docs/troubleshooting.md).
FIXED_ON_RESUME = (
    "model.backbone", "model.embedding_dim", "data.image_size", "data.format", "data.train_list",
    "data.val_fraction", "data.split_seed", "data.sampler", "data.classes_per_batch", "data.images_per_class",
    "data.triplets_per_batch", "data.min_crop_scale", "data.repeat_positives", "train.seed", "train.loss",
    "train.miner", "train.loss_params", "train.miner_params", "train.margin", "train.contrastive_pos_margin",
    "train.contrastive_neg_margin", "train.lr", "train.loss_lr", "train.head_lr_multiplier", "train.weight_decay",
    "train.warmup_fraction", "train.precision",
)


class CheckpointError(Exception):
    """A checkpoint file that cannot be used or written: one line naming the file, exit code 1."""


def weights_digest(state_dict: dict) -> str:
    """sha256 over the names and raw bytes of every tensor, in name order: changes with any flipped bit."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def save_checkpoint_atomically(state: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as stream:
            torch.save(state, stream)
            stream.flush()
            os.fsync(stream.fileno())
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        temporary.unlink(missing_ok=True)
        full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) or "space" in str(error)
        raise CheckpointError(f"could not write {path}: {'no space left on the device' if full else error}; the "
                              f"previous {path.name}, if any, is intact. Free space (or fix the folder) and continue "
                              f"with --resume") from None
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete `.NAME.PID.tmp` files that a kill or a full disk left behind (call while holding the run's lock)."""
    stale = sorted(Path(folder).glob(".*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint without running any code from the file (`weights_only=True`), and verify its weights.

    Raises CheckpointError (one line naming the file) for a missing, truncated or foreign file, a plain
    state_dict, and weights whose content hash differs from the one stored when the file was written.
    """
    path = Path(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as error:
        first_line = (str(error).splitlines() or [type(error).__name__])[0][:200]
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, damaged or another kind of file: "
                              f"{first_line}); use a best.pt or last.pt written by --mode train") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        plain = isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values())
        what = "a plain state_dict (tensor names only)" if plain else "no model and configuration"
        raise CheckpointError(f"{path} holds {what}, not a checkpoint of this project; use a best.pt or last.pt "
                              f"written by --mode train (its configuration rebuilds the model)")
    stored = checkpoint.get("weights_sha256")
    if stored is not None and weights_digest(checkpoint["model"]) != stored:
        raise CheckpointError(f"{path}: the weights differ from the content hash stored when it was written (the file "
                              f"is damaged); use another copy, or last.pt / best.pt of the run")
    return checkpoint


def model_only(state: dict) -> dict:
    """The part of a full training state that `best.pt` keeps."""
    return {key: state[key] for key in MODEL_ONLY_KEYS if key in state}


def embedder_from_checkpoint(checkpoint: dict):
    """The checkpoint's model with its weights, on the CPU; no download (the checkpoint carries the backbone's config)."""
    from model import embedder_from_backbone_config

    normalisation = checkpoint["normalisation"]
    model = embedder_from_backbone_config(json.loads(checkpoint["backbone_config_json"]), checkpoint["embedding_dim"],
                                          normalisation["mean"], normalisation["std"])
    model.load_state_dict(checkpoint["model"])  # strict: every tensor must match
    return model


def refuse_mismatched_checkpoint(path: Path, config) -> dict:
    """Load `path` (onto the CPU) for --resume; raise UsageError if it was trained with another model definition,
    or if a key that cannot change mid-run (FIXED_ON_RESUME) differs."""
    checkpoint = load_checkpoint(path)
    differences = differing_keys(checkpoint["config"], config.to_dict())
    if differences:
        raise UsageError(f"checkpoint {path} does not match this config ({'; '.join(differences)}): "
                         f"use the run's own config.yaml, or another output.dir")
    changed = differing_keys(checkpoint["config"], config.to_dict(), FIXED_ON_RESUME)
    if changed:
        raise UsageError(f"--resume cannot change {'; '.join(changed)}: these keys fix the run's batches, optimiser "
                         f"or model. Resume with the run's values, or start a new run (another output.dir, or "
                         f"--overwrite); docs/troubleshooting.md lists the keys that may change on resume")
    return checkpoint


def training_list_identity(train_list) -> dict:
    """Size and digest of the training list (paths and labels) that the epoch plans are drawn from."""
    digest = hashlib.sha256("\n".join(train_list.paths).encode())
    digest.update(train_list.labels.tobytes())
    return {"num_images": len(train_list), "sha256": digest.hexdigest()}


def refuse_changed_training_list(checkpoint: dict, train_list, path: Path) -> None:
    """A resumed run must draw its batches from the list it started with, or the epoch plan breaks off."""
    saved = checkpoint.get("train_list")  # absent in checkpoints from before this check
    if saved is not None and saved != training_list_identity(train_list):
        raise UsageError(f"the training list differs from the one {path} was trained on ({saved['num_images']} "
                         f"images then, {len(train_list)} now): files changed or went bad, or data.startup_check / "
                         f"data.on_bad_image changed. Restore them to resume, or start afresh with --overwrite")
