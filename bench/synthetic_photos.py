"""SOP-like synthetic product photos for the loading benchmarks: smooth colour plus texture and noise, so a
500 x 500 JPEG at quality 90 is about the size of an SOP photo (~100 KB) and costs as much to decode."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image


def write_sop_like_jpeg(path: str, seed: int, size: int = 500, quality: int = 90) -> None:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    pattern = np.sin(x[..., None] * rng.uniform(5, 40) + y[..., None] * rng.uniform(5, 40) + rng.uniform(0, 6, 3))
    pixels = np.clip(rng.uniform(0, 255, 3) + 60 * pattern + rng.normal(0, 12, (size, size, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=quality)


def write_sop_like_jpegs(root: Path, paths: list[str], unique: int, workers: int, size: int = 500) -> None:
    """An SOP-like JPEG at root / path for every path, cheaply: drawing one costs about 30 ms, so only the
    first `unique` are drawn (seed = position, by `workers` processes) and the rest are hard links to them.
    Each link is still a file of its own that a loader opens and decodes."""
    unique = min(len(paths), unique)
    with ProcessPoolExecutor(max(1, workers)) as pool:
        list(pool.map(write_sop_like_jpeg, [str(root / path) for path in paths[:unique]], range(unique),
                      [size] * unique, chunksize=16))
    link_repeats(root, paths, unique)


def link_repeats(root: Path, paths: list[str], unique: int) -> None:
    """root / paths[i] for i >= unique becomes a hard link to root / paths[i % unique]."""
    for i in range(unique, len(paths)):
        os.link(root / paths[i % unique], root / paths[i])
