"""The catalogue's model: a checkpoint whose weights hash the index records, and one-off images to vectors.

The catalogue is embedded by `build.py` through the project's loader; queries and added images come here,
read and transformed exactly as the loader reads them (`load_rgb_tensor` + the evaluation transforms), so an
image of the catalogue searched by its file finds itself first.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .store import CatalogueError


class ModelMismatchError(CatalogueError):
    """Vectors or a checkpoint from another model than the index's: one line, exit code 1."""


def preprocessing(checkpoint: dict) -> dict:
    """What turns an image file into the model's input, as a manifest and an export record it."""
    from dataloaders.transforms import eval_resize_size

    image_size = int(checkpoint["config"]["data"]["image_size"])
    return {"image_size": image_size, "resize_short_side": eval_resize_size(image_size), "crop": "centre",
            "interpolation": "bilinear, antialiased", "mean": list(checkpoint["normalisation"]["mean"]),
            "std": list(checkpoint["normalisation"]["std"])}


def output_size(checkpoint: dict) -> int:
    """The embedding size of a checkpoint's model: its projection's, or the backbone's pooled output's."""
    import json

    return int(checkpoint["embedding_dim"]) or int(json.loads(checkpoint["backbone_config_json"])["hidden_size"])


def model_record(checkpoint: dict, path: Path, precision: str) -> dict:
    return {"checkpoint": str(Path(path).resolve()), "weights_sha256": checkpoint["weights_sha256"],
            "epoch": checkpoint.get("epoch"), "backbone": checkpoint["config"]["model"]["backbone"],
            "embedding_dim": output_size(checkpoint), "precision": precision}


def require_same_model(checkpoint: dict, path: Path, manifest: dict) -> None:
    expected = manifest["model"]["weights_sha256"]
    if checkpoint.get("weights_sha256") != expected:
        raise ModelMismatchError(f"checkpoint {path} is not the model index {manifest['model']['checkpoint']} was "
                                 f"built with (weights sha256 {str(checkpoint.get('weights_sha256'))[:12]}... vs "
                                 f"{expected[:12]}...): its vectors are not comparable; use that checkpoint, or "
                                 f"build a new index")


class ImageEmbedder:
    """A checkpoint's model on `device`, embedding images one batch at a time.

    embed(images): images are paths (read as the loader reads them, at most max_image_bytes) or PIL images
    (taken as they are: apply EXIF rotation first, e.g. `PIL.ImageOps.exif_transpose`); returns (Q, D) float32
    unit vectors.
    """

    def __init__(self, checkpoint: dict, device: str = "cpu", precision: str = "fp32", attention: str = "sdpa",
                 max_image_bytes: int = 100_000_000) -> None:
        from checkpoint import embedder_from_checkpoint
        from dataloaders.transforms import build_transforms, decode_size
        from model import apply_speed_options

        self.device = torch.device(device)
        self.precision = precision
        self.max_image_bytes = max_image_bytes
        self.weights_sha256 = checkpoint["weights_sha256"]
        self.preprocessing = preprocessing(checkpoint)
        image_size = self.preprocessing["image_size"]
        self.transform = build_transforms(image_size, train=False)
        self.decode_size = decode_size(image_size, train=False)
        self.model = apply_speed_options(embedder_from_checkpoint(checkpoint), attention).to(self.device).eval()

    def picture(self, image) -> torch.Tensor:
        from dataloaders.image_files import load_rgb_tensor

        if isinstance(image, (str, Path)):
            image = load_rgb_tensor(Path(image), self.decode_size, max_bytes=self.max_image_bytes)
        return self.transform(image)

    @torch.inference_mode()
    def embed(self, images, batch_size: int = 32) -> np.ndarray:
        from dataloaders.datasets import stack_pictures
        from evaluation import autocast_context

        rows = []
        for start in range(0, len(images), batch_size):
            batch = stack_pictures([self.picture(image) for image in images[start:start + batch_size]])
            with autocast_context(self.device, self.precision):
                rows.append(self.model(batch.to(self.device)).float().cpu())  # (B, D)
        if not rows:
            return np.empty((0, self.model.embedding_dim), np.float32)
        return torch.cat(rows).numpy()
