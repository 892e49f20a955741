"""A one-time downsized copy of a dataset: each image re-encoded once at about the training resolution.

JPEG decoding dominates loading. SOP's photos are about 500 px; at 256 px training resolution most of
those pixels are thrown away after decoding, every epoch. The cache decodes each image once, shrinks
its short side to `short_side` (292 for 256-px training, the evaluation resize) and stores it as a
JPEG under the same relative path, so the list files keep working with `data.root` pointed at the cache.

The cache is written by `python main.py --mode cache` and verified before use: its manifest must name
the same short side, and every image of the lists must be present.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from .image_files import load_rgb_image
from .image_lists import ImageList

MANIFEST = "CACHE.json"


class CacheError(RuntimeError):
    """The cache is missing, stale or incomplete; the message says which and how to rebuild it."""


def _shrink_one(job: tuple[str, str, int, int]) -> str | None:
    """Re-encode one image; returns an error string instead of raising (reported together at the end)."""
    source, target, short_side, quality = job
    try:
        image = load_rgb_image(Path(source), draft_size=short_side)
        scale = short_side / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        temporary = f"{target}.tmp{os.getpid()}"
        image.save(temporary, format="JPEG", quality=quality)
        os.replace(temporary, target)
        return None
    except Exception as error:  # a bad source image: named in the report, not a crash half-way
        return f"{source}: {type(error).__name__}: {error}"


def build_cache(image_lists: list[ImageList], cache_root: Path, short_side: int, quality: int = 90,
                workers: int = 1) -> dict:
    """Write the downsized copy of every image in `image_lists`; skip images already cached.

    Returns a summary {"written", "reused", "failed": [messages]}; the manifest is written last, and
    only when nothing failed, so an interrupted or partial build is never mistaken for a complete one.
    """
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    (cache_root / MANIFEST).unlink(missing_ok=True)
    jobs, reused, all_paths = [], 0, set()
    for image_list in image_lists:
        for relative in image_list.paths:
            if relative in all_paths:
                continue
            all_paths.add(relative)
            target = cache_root / relative
            if target.is_file():
                reused += 1
            else:
                jobs.append((str(image_list.root / relative), str(target), short_side, quality))
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as pool:
            errors = [e for e in pool.map(_shrink_one, jobs, chunksize=64) if e]
    else:
        errors = [e for e in map(_shrink_one, jobs) if e]
    summary = {"written": len(jobs) - len(errors), "reused": reused, "failed": errors}
    if not errors:
        manifest = {"short_side": short_side, "quality": quality, "num_images": len(all_paths)}
        (cache_root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return summary


def use_cache(image_list: ImageList, cache_root: Path, short_side: int) -> ImageList:
    """The same list read from the cache; raises CacheError unless the cache is complete and current."""
    cache_root = Path(cache_root)
    how_to_fix = "build it with: python main.py --mode cache (same config)"
    manifest_path = cache_root / MANIFEST
    if not manifest_path.is_file():
        raise CacheError(f"data.cache_dir '{cache_root}' holds no complete cache; {how_to_fix}")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("short_side") != short_side:
        raise CacheError(f"data.cache_dir '{cache_root}' was built for a short side of {manifest.get('short_side')} px, "
                         f"this config needs {short_side}; {how_to_fix}")
    missing = [p for p in image_list.paths if not (cache_root / p).is_file()]
    if missing:
        raise CacheError(f"data.cache_dir '{cache_root}' lacks {len(missing)} of this split's images "
                         f"(first: {missing[0]}); {how_to_fix}")
    return ImageList(cache_root, image_list.paths, image_list.labels, image_list.super_labels, image_list.class_names)
