"""A one-time downsized copy of a dataset: each image re-encoded once at about the training resolution.

JPEG decoding dominates loading. SOP's photos are about 500 px; at 256 px training resolution most of
those pixels are thrown away after decoding, every epoch. The cache decodes each image once, shrinks
its short side to `short_side` (292 for 256-px training, the evaluation resize) and stores it as a
JPEG under the same relative path, so the list files keep working with `data.root` pointed at the cache.

The cache is written by `python main.py --mode cache` and verified before use: its manifest must name
the same short side, and every image of the lists must be present.

Nothing is ever written outside the cache folder, whatever a list says. A list path that leads outside its
root as written (absolute, or `..` above it; only read with data.allow_outside_root) is cached as
`OUTSIDE_ROOT_FOLDER/<hash of its absolute path>-<file name>` instead (`cached_path`); its ImageList entry
from `use_cache` names that path. Images are written to TEMPORARY_FOLDER first and renamed into place, so a
stopped build leaves only whole images (reused by the next build) and a temporary folder it removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
from pathlib import Path

from PIL import Image

from .datasets import map_in_worker_processes
from .image_files import MAX_IMAGE_BYTES, bad_image_message, describe_image_error, is_system_error, load_rgb_image
from .image_lists import ImageList

MANIFEST = "CACHE.json"
OUTSIDE_ROOT_FOLDER = "_outside_root"
TEMPORARY_FOLDER = ".partial"  # one build at a time per cache folder: a build starts by emptying it


class CacheError(RuntimeError):
    """The cache is missing, stale or incomplete; the message says which and how to rebuild it."""


def cached_path(image_root: Path, relative: str) -> str:
    """Where the cache keeps image `relative` of a list rooted at `image_root`, relative to the cache folder.

    The same path when it stays inside the root as written; else (an absolute path, `..` above the root)
    `OUTSIDE_ROOT_FOLDER/<16 hex digits of the hash of its absolute path>-<file name>`, so two lines naming
    the same file share one cached image, and no line can name a place outside the cache folder.
    """
    normal = posixpath.normpath(relative)
    if not (posixpath.isabs(normal) or normal in (".", "..") or normal.startswith("../")):
        return relative
    absolute = os.path.normpath(os.path.join(image_root, relative))
    digest = hashlib.sha256(absolute.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{OUTSIDE_ROOT_FOLDER}/{digest}-{posixpath.basename(normal)}"


def _shrink_one(job: tuple[str, str | None, str, str, int, int, int]) -> str | None:
    """Re-encode one image; returns an error string instead of raising (reported together at the end)."""
    source, root, target, temporary_folder, short_side, quality, max_bytes = job
    try:
        image = load_rgb_image(Path(source), draft_size=short_side, root=root, max_bytes=max_bytes)
    except Exception as error:  # a bad source image: named in the report, not a crash half-way
        if is_system_error(error):
            return f"{source}: {type(error).__name__}: {error}"
        return bad_image_message(Path(source), *describe_image_error(Path(source), error))
    try:
        scale = short_side / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        temporary = os.path.join(temporary_folder, f"{os.getpid()}.jpg")  # one image at a time per process
        image.save(temporary, format="JPEG", quality=quality)
        os.replace(temporary, target)
        return None
    except Exception as error:  # e.g. a full disk: named in the report
        return f"{source}: {type(error).__name__}: {error}"


def build_cache(image_lists: list[ImageList], cache_root: Path, short_side: int, quality: int = 90,
                workers: int = 1, allow_outside_root: bool = False, max_image_bytes: int = MAX_IMAGE_BYTES) -> dict:
    """Write the downsized copy of every image in `image_lists`; skip images already cached.

    Source images are opened as the training items open them: a file whose real location leaves its list's
    root (unless `allow_outside_root`), or that is not a regular file of at most `max_image_bytes`, fails.
    Targets are `cached_path`s: always inside `cache_root`.

    Returns a summary {"written", "reused", "failed": [messages]}; the manifest is written last, and
    only when nothing failed, so an interrupted or partial build is never mistaken for a complete one.
    However the build ends (a stop signal included), no temporary file and no worker process is left.
    """
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    (cache_root / MANIFEST).unlink(missing_ok=True)
    temporary_folder = cache_root / TEMPORARY_FOLDER
    shutil.rmtree(temporary_folder, ignore_errors=True)  # left by a build that was killed
    temporary_folder.mkdir()
    jobs, reused, targets = [], 0, set()
    for image_list in image_lists:
        root = None if allow_outside_root else str(image_list.root)
        for relative in image_list.paths:
            target = cache_root / cached_path(image_list.root, relative)
            if target in targets:
                continue
            targets.add(target)
            if target.is_file():
                reused += 1
            else:
                jobs.append((str(image_list.root / relative), root, str(target), str(temporary_folder), short_side,
                             quality, max_image_bytes))
    try:
        if workers > 1 and len(jobs) > 1:
            errors = [e for e in map_in_worker_processes(_shrink_one, jobs, workers, chunksize=64) if e]
        else:
            errors = [e for e in map(_shrink_one, jobs) if e]
    finally:
        shutil.rmtree(temporary_folder, ignore_errors=True)
    summary = {"written": len(jobs) - len(errors), "reused": reused, "failed": errors}
    if not errors:
        manifest = {"short_side": short_side, "quality": quality, "num_images": len(targets)}
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
    paths = tuple(cached_path(image_list.root, relative) for relative in image_list.paths)
    missing = [p for p in paths if not (cache_root / p).is_file()]
    if missing:
        raise CacheError(f"data.cache_dir '{cache_root}' lacks {len(missing)} of this split's images "
                         f"(first: {missing[0]}); {how_to_fix}")
    return ImageList(cache_root, paths, image_list.labels, image_list.super_labels, image_list.class_names)
