"""SOP-format lists of ../shared/data/cub100 for training on real photos: the first 50 species train (with
data.val_fraction of them held out for validation), the last 50 are the unseen test classes.

    python bench/cub100_split.py --out /tmp/cub100_lists --images-per-class 30
    python main.py --mode train --config configs/demo.yaml data.format=sop \\
        data.root=../shared/data/cub100/images data.train_list=/tmp/cub100_lists/train.txt \\
        data.test_list=/tmp/cub100_lists/test.txt train.epochs=8 output.dir=/tmp/cub100_run
    python main.py --mode eval --config configs/demo.yaml ...the same overrides...                     # trained
    python main.py --mode eval --config configs/demo.yaml --checkpoint none ...the same overrides...   # untrained

The images stay where they are: list paths are relative to the images folder. --images-per-class keeps the
first N images of each species (in file-name order; 0 = all), as the measurements in docs/training.md did.
--train-class-sizes 2,3,4,5 gives the training species these sizes in turn instead (small classes as in SOP,
which P x K fills with repeats); the test species keep --images-per-class.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.cli_runs import CUB100, all_images, class_halves, write_list  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for train.txt and test.txt")
    parser.add_argument("--cub", type=Path, default=CUB100, help="cub100's images folder")
    parser.add_argument("--images-per-class", type=int, default=30, help="first N images per species; 0 = all")
    parser.add_argument("--train-class-sizes", default="", help="e.g. 2,3,4,5: training species' sizes in turn")
    arguments = parser.parse_args(argv)
    images, _ = all_images(arguments.cub, Path("unused"), 0, 0, 0)
    for name, indices in zip(("train", "test"), class_halves(images)):
        order = sorted(indices, key=lambda i: (images.labels[i], images.paths[i]))
        labels = images.labels[order]
        rank_in_class = np.arange(len(order)) - np.searchsorted(labels, labels)
        if name == "train" and arguments.train_class_sizes:
            sizes = np.array([int(size) for size in arguments.train_class_sizes.split(",")])
            class_number = np.searchsorted(np.unique(labels), labels)
            indices = np.array(order)[rank_in_class < sizes[class_number % len(sizes)]]
        elif arguments.images_per_class:
            indices = np.array(order)[rank_in_class < arguments.images_per_class]
        path = write_list(arguments.out / f"{name}.txt", images, indices)
        print(f"{path}: {len(indices)} images of {len(np.unique(images.labels[indices]))} species")


if __name__ == "__main__":
    main()
