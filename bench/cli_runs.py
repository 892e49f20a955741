"""What the training benchmarks share: their datasets as SOP-format lists (the real bird photos of
../shared/data/cub100 when present, otherwise or with --tiny the generated demo products), and runs of
main.py in this process with their output kept in a log file.

Lists are written beside the bench's outputs; the images stay where they are, and the lists' paths are
relative to the image root.
"""

from __future__ import annotations

import contextlib
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
CUB100 = REPO_ROOT.parent / "shared" / "data" / "cub100" / "images"


def all_images(cub: Path | None, demo_root: Path, demo_classes: int, demo_images_per_class: int, image_size: int):
    """(ImageList of every image with 1-based class ids, a description): cub100's class folders when `cub`
    is given, else the demo dataset generated at `demo_root` (its train and test lists together)."""
    from dataloaders import ImageList, read_folder_tree, read_sop_list
    from dataloaders.demo_data import ensure_demo_dataset

    if cub is not None:
        tree = read_folder_tree(cub)
        return ImageList(tree.root, tree.paths, tree.labels + 1, tree.super_labels), f"cub100 ({cub})"
    ensure_demo_dataset(demo_root, demo_classes, demo_images_per_class, image_size, seed=0)
    train, test = (read_sop_list(demo_root / name, demo_root) for name in ("Ebay_train.txt", "Ebay_test.txt"))
    images = ImageList(demo_root, train.paths + test.paths, np.concatenate([train.labels, test.labels]),
                       np.concatenate([train.super_labels, test.super_labels]))
    return images, f"generated demo products ({demo_root})"


def write_list(path: Path, images, indices) -> Path:
    from dataloaders import write_sop_list

    indices = np.asarray(indices, dtype=np.int64)
    write_sop_list(path, [images.paths[i] for i in indices], images.labels[indices])
    return path


def class_halves(images) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the images of the first and of the second half of the classes (by class id)."""
    classes = np.unique(images.labels)
    first = np.isin(images.labels, classes[: len(classes) // 2])
    return np.flatnonzero(first), np.flatnonzero(~first)


def held_out_images(images, indices: np.ndarray, test_share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: `test_share` of each class's images (at least 1, leaving at least 2) go to test."""
    generator = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(images.labels[indices]):
        members = generator.permutation(indices[images.labels[indices] == label])
        held = min(len(members) - 2, max(1, round(test_share * len(members))))
        test.extend(members[:held])
        train.extend(members[held:])
    return np.sort(train), np.sort(test)


class RunFailed(RuntimeError):
    """A main.py command of a bench exited with an error; the message names its log."""


def run_cli(words, log: Path) -> tuple[float, float]:
    """`python main.py WORDS` in this process, its output appended to `log`; returns (wall, CPU) seconds.

    On shared cores the wall time depends on the neighbours; the CPU time of this process much less.
    Raises RunFailed, naming the log, when the command fails."""
    import main

    log.parent.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    with log.open("a") as stream, contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
        print(f"\n$ python main.py {' '.join(map(str, words))}", flush=True)
        code = main.main([str(word) for word in words])
    if code != 0:
        raise RunFailed(f"main.py {' '.join(map(str, words[:2]))} ... exited with {code}; its output is in {log}")
    return time.perf_counter() - started, time.process_time() - cpu_started


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (a bench's worker processes)."""
    return sum(usage.ru_utime + usage.ru_stime
               for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def timed_in_folder(out: Path | None, prefix: str, work):
    """work(folder) in `out`, or in a temporary folder removed afterwards; returns (its result, wall s, CPU s).

    A failed run stops the bench with its one-line message (SystemExit)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as temporary:
        folder = Path(out or temporary)
        folder.mkdir(parents=True, exist_ok=True)
        started, cpu_started = time.perf_counter(), cpu_seconds()
        try:
            result = work(folder)
        except RunFailed as error:
            raise SystemExit(f"{prefix.strip('_')}: {error}") from None
        return result, time.perf_counter() - started, cpu_seconds() - cpu_started
