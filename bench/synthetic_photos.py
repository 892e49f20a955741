"""SOP-like synthetic product photos for the loading benchmarks: smooth colour plus texture and noise, so a
500 x 500 JPEG at quality 90 is about the size of an SOP photo (~100 KB) and costs as much to decode."""

from __future__ import annotations

import numpy as np
from PIL import Image


def write_sop_like_jpeg(path: str, seed: int, size: int = 500, quality: int = 90) -> None:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    pattern = np.sin(x[..., None] * rng.uniform(5, 40) + y[..., None] * rng.uniform(5, 40) + rng.uniform(0, 6, 3))
    pixels = np.clip(rng.uniform(0, 255, 3) + 60 * pattern + rng.normal(0, 12, (size, size, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=quality)
