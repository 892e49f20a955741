"""Check a dataset before training: every listed image exists and decodes, and every class can form a pair.

`check_image_lists` opens and fully decodes each image of each split and returns a JSON-serialisable
report; `format_check_report` turns that report into text for a terminal or a report file. Nothing here
prints, exits or writes files: `main.py --mode check` does that.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import ImageFile

from .datasets import map_in_worker_processes
from .image_files import MAX_IMAGE_BYTES, describe_image_error, load_rgb_image
from .image_lists import ImageList

MAX_LISTED_BAD_IMAGES = 50  # per split, in format_check_report


def check_image(path: Path, decode: bool = True, root: Path | None = None,
                max_bytes: int = MAX_IMAGE_BYTES) -> tuple[str, str] | None:
    """Open (and with decode=True fully decode) one image file; None when it is fine, else (reason, detail).

    The reasons are those of `image_files.describe_image_error`: missing, not_a_file, outside_root (the
    file's real location leaves `root`; None: no such check), empty, not_an_image, too_large (above
    max_bytes, or too many pixels), truncated, corrupt. decode=False reads only the header: it finds every
    problem but truncated or corrupt pixel data, in a fraction of the time.

    Corner case: `ImageFile.LOAD_TRUNCATED_IMAGES = True` would make PIL fill a cut-off image with grey
    instead of failing; `check_image_lists` refuses to run then rather than change PIL's global state.
    """
    try:
        load_rgb_image(Path(path), decode=decode, root=root, max_bytes=max_bytes)
    except Exception as error:  # noqa: BLE001 - a damaged file can make any decoder raise; report it, do not crash
        return describe_image_error(Path(path), error)
    return None


def _check_images(job: tuple[list[tuple[str, str | None]], bool, int]) -> list[tuple[str, str] | None]:
    """`check_image` over a chunk of (path, root or None) pairs; the unit of work sent to a pool process."""
    chunk, decode, max_bytes = job
    return [check_image(Path(path), decode, root, max_bytes) for path, root in chunk]


def check_image_lists(image_lists: dict[str, ImageList], workers: int = 1, decode: bool = True,
                      allow_outside_root: bool = False, max_image_bytes: int = MAX_IMAGE_BYTES) -> dict:
    """Decode every image of every named split and summarise classes; returns a JSON-serialisable report.

    Args:
        image_lists: split name (e.g. "train", "test") -> ImageList. An image listed in several splits
            (same file on disk) is decoded once and reported in each.
        workers: processes decoding images; 1 runs in this process, more uses a process pool with
            chunks of paths.
        decode: False reads headers only (see `check_image`).
        allow_outside_root: False reports files whose real location leaves their list's root (a symlink
            out of it) as "outside_root", without opening them.
        max_image_bytes: larger files, and anything but regular files, are reported without being read.

    Returns:
        {"ok": True iff no split has a bad image,
         "num_bad_images": bad entries summed over splits,
         "warnings": [text, ...]  (classes with fewer than 2 images: no positive pair, not an error),
         "splits": {name: {"root": str, "num_images": int, "num_classes": int,
                           "class_size_histogram": {"<images per class>": <number of classes>, ...}
                               (keys in increasing numeric order),
                           "classes_with_fewer_than_2_images": [class id, ...] (sorted),
                           "num_bad_images": int,
                           "bad_images": [{"path": path relative to root, "reason": str, "detail": str},
                                          ...] (sorted by path)}}}

    Raises:
        RuntimeError: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set, so truncated images would pass.
        ValueError: workers < 1.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set, so truncated images would decode without error; "
            "the data check refuses to run with it (unset it before checking)"
        )
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def job_of(image_list: ImageList, relative_path: str) -> tuple[str, str | None]:
        return str(image_list.root / relative_path), None if allow_outside_root else str(image_list.root)

    # An image listed in several splits is read once (per root it must stay inside).
    unique = sorted({job_of(il, p) for il in image_lists.values() for p in il.paths})
    if workers == 1 or len(unique) < 2:
        results = _check_images((unique, decode, max_image_bytes))
    else:
        # A few chunks per worker: big enough to amortise inter-process traffic, small enough to balance.
        chunk_size = max(1, math.ceil(len(unique) / (4 * workers)))
        jobs = [(unique[i : i + chunk_size], decode, max_image_bytes) for i in range(0, len(unique), chunk_size)]
        results = [result for chunk in map_in_worker_processes(_check_images, jobs, workers) for result in chunk]
    problem_by_path = dict(zip(unique, results))

    splits, report_warnings = {}, []
    for name, image_list in image_lists.items():
        bad_images = []
        for relative_path in sorted(set(image_list.paths)):
            problem = problem_by_path[job_of(image_list, relative_path)]
            if problem is not None:
                bad_images.append({"path": relative_path, "reason": problem[0], "detail": problem[1]})
        class_ids, class_sizes = np.unique(image_list.labels, return_counts=True)
        histogram = Counter(class_sizes.tolist())
        small_classes = class_ids[class_sizes < 2].tolist()
        splits[name] = {
            "root": str(image_list.root),
            "num_images": len(image_list),
            "num_classes": int(class_ids.size),
            "class_size_histogram": {str(size): histogram[size] for size in sorted(histogram)},
            "classes_with_fewer_than_2_images": small_classes,
            "num_bad_images": len(bad_images),
            "bad_images": bad_images,
        }
        if small_classes:
            shown = ", ".join(map(str, small_classes[:20])) + (", ..." if len(small_classes) > 20 else "")
            report_warnings.append(
                f"{name}: {len(small_classes)} class(es) with fewer than 2 images (no positive pair): {shown}"
            )

    num_bad = sum(split["num_bad_images"] for split in splits.values())
    return {"ok": num_bad == 0, "num_bad_images": num_bad, "warnings": report_warnings, "splits": splits}


def format_check_report(report: dict) -> str:
    """The report of `check_image_lists` as text: per split counts, class-size table, bad images, warnings.

    At most `MAX_LISTED_BAD_IMAGES` bad images are listed per split, then "... and N more".
    """
    verdict = "OK" if report["ok"] else f"FAILED: {report['num_bad_images']} bad image(s)"
    lines = [f"Data check: {verdict}"]
    for name, split in report["splits"].items():
        lines += ["", f"[{name}] {split['num_images']} images, {split['num_classes']} classes in {split['root']}"]
        width = max(len("images/class"), *(len(size) for size in split["class_size_histogram"]))
        lines.append(f"  {'images/class':>{width}}  classes")
        for size, count in split["class_size_histogram"].items():
            lines.append(f"  {size:>{width}}  {count:>7}")
        bad_images = split["bad_images"]
        if bad_images:
            lines.append(f"  bad images ({len(bad_images)}):")
            for item in bad_images[:MAX_LISTED_BAD_IMAGES]:
                lines.append(f"    {item['path']}  {item['reason']}  ({item['detail']})")
            if len(bad_images) > MAX_LISTED_BAD_IMAGES:
                lines.append(f"    ... and {len(bad_images) - MAX_LISTED_BAD_IMAGES} more")
        else:
            lines.append("  bad images: none")
    if report["warnings"]:
        lines.append("")
    lines += [f"warning: {warning}" for warning in report["warnings"]]
    return "\n".join(lines) + "\n"
