"""Loader throughput: decode + augment + collate, our way vs the reference's way, in one run.

    python bench/data_bench.py                        # cub100 photos (if present) + synthetic 500x500 JPEGs
    python bench/data_bench.py --tiny                 # a few seconds: a smoke test
    python bench/data_bench.py --workers 16 --out data_bench.json

- reference: PIL open, then a transformers image processor (ViTImageProcessor, as the Swinv2 hub
  checkpoints use) called per item inside `__getitem__`, float32 tensors out.
- ours: `dataloaders.ImageDataset` with `build_transforms(train=True)` and reduced-size JPEG decoding
  (`decode_size`), uint8 tensors out (normalisation happens later, on the device).
- ours, eval transforms: the same for `build_transforms(train=False)` (embedding the test set).
- ours, from the cache: the train transforms reading `--mode cache`'s downsized copy (short side 292 for
  256 px); the one-time build is timed too.
Both go through the same DataLoader settings (workers, batch size, persistent workers; ours with the
project's collate, as main.py uses it), so images/s per worker compare. Each rate is the steady state
(after one untimed pass, as in every training epoch after the first): the median of --repeats rounds in
which every loader makes one pass in turn; "x reference" is the median of the within-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic_photos import write_sop_like_jpegs  # noqa: E402
from dataloaders import (ImageDataset, ImageList, build_transforms, collate_skipping_bad_images,  # noqa: E402
                         decode_size, read_folder_tree)
from dataloaders.cache import build_cache, use_cache  # noqa: E402
from dataloaders.datasets import stop_loader_workers  # noqa: E402
from dataloaders.transforms import eval_resize_size  # noqa: E402
from model import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

CUB = Path(__file__).resolve().parents[2] / "shared" / "data" / "cub100" / "images"
UNIQUE_JPEGS = 1000


class ReferenceDataset(torch.utils.data.Dataset):
    """The original pipeline's loading: PIL open, then an image processor call per item."""

    def __init__(self, image_list: ImageList, image_size: int):
        from transformers import ViTImageProcessor

        self.image_list = image_list
        self.processor = ViTImageProcessor(size={"height": image_size, "width": image_size},
                                           image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))

    def __len__(self):
        return len(self.image_list)

    def __getitem__(self, index):
        image = Image.open(self.image_list.root / self.image_list.paths[index]).convert("RGB")
        pixels = self.processor(image, return_tensors="pt")["pixel_values"][0]
        return pixels, int(self.image_list.labels[index]), index


def synthetic_jpegs(folder: Path, count: int, workers: int) -> ImageList:
    """`count` SOP-like 500 x 500 JPEGs in one class folder, UNIQUE_JPEGS of them drawn and the rest hard
    links (`synthetic_photos.write_sop_like_jpegs`)."""
    (folder / "c").mkdir(parents=True, exist_ok=True)
    paths = [f"c/{i:05d}.jpg" for i in range(count)]
    write_sop_like_jpegs(folder, paths, UNIQUE_JPEGS, workers)
    return ImageList(folder, tuple(paths), np.zeros(count, dtype=np.int64), np.zeros(count, dtype=np.int64))


def warm_loader(dataset, workers: int, batch_size: int, limit: int, collate_fn=None):
    """A loader over the first `limit` items with persistent workers, after one untimed pass: the workers
    are started and the page cache is warm, as in every training epoch after the first."""
    subset = torch.utils.data.Subset(dataset, list(range(min(limit, len(dataset)))))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=workers, shuffle=False,
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                                         collate_fn=collate_fn)
    for _ in loader:
        pass
    return loader


def images_per_second(loader) -> float:
    started = time.perf_counter()
    seen = sum(len(batch[0]) for batch in loader)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=2000, help="images per measurement")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of timed passes; medians are reported")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path)
    arguments = parser.parse_args()
    limit = 64 if arguments.tiny else arguments.images
    workers = min(arguments.workers, 2) if arguments.tiny else arguments.workers
    size = arguments.image_size
    torch.set_num_threads(1)  # the workers do the work; keep the main process from competing

    with tempfile.TemporaryDirectory() as temporary:
        sources = {}
        if CUB.is_dir():
            sources["cub100 photos (227 px)"] = read_folder_tree(CUB)
        sources["synthetic 500x500 JPEG q90"] = synthetic_jpegs(Path(temporary) / "synthetic", limit, workers)
        results = []
        for source_name, image_list in sources.items():
            image_list = image_list.subset(np.arange(min(limit, len(image_list))))
            cache_root = Path(temporary) / f"cache{len(results)}"
            started = time.perf_counter()
            build_cache([image_list], cache_root, eval_resize_size(size), workers=workers)
            cache_build_rate = len(image_list) / (time.perf_counter() - started)
            cached = use_cache(image_list, cache_root, eval_resize_size(size))
            variants = {
                "reference: PIL + image processor per item": ReferenceDataset(image_list, size),
                "ours: train transforms, uint8, reduced decode": ImageDataset(
                    image_list, build_transforms(size, train=True), decode_size(size, train=True)),
                "ours: eval transforms, uint8, reduced decode": ImageDataset(
                    image_list, build_transforms(size, train=False), decode_size(size, train=False)),
                "ours: train transforms, from the cache": ImageDataset(
                    cached, build_transforms(size, train=True), decode_size(size, train=True)),
            }
            loaders = {name: warm_loader(dataset, workers, arguments.batch_size, limit,
                                         collate_skipping_bad_images if isinstance(dataset, ImageDataset) else None)
                       for name, dataset in variants.items()}
            # Rounds of one pass per loader, in turn: this machine's speed drifts by several percent over a
            # minute, and a ratio taken within a round is not moved by that drift.
            rates = {name: [] for name in loaders}
            for _ in range(1 if arguments.tiny else arguments.repeats):
                for name, loader in loaders.items():
                    rates[name].append(images_per_second(loader))
            stop_loader_workers(*loaders.values())
            reference_rates = rates[next(iter(rates))]
            for variant_name, variant_rates in rates.items():
                rate = statistics.median(variant_rates)
                ratio = statistics.median(r / ref for r, ref in zip(variant_rates, reference_rates))
                row = {"source": source_name, "variant": variant_name, "workers": workers,
                       "cache_build_images_per_second": round(cache_build_rate, 1),
                       "images_per_second": round(rate, 1), "per_worker": round(rate / max(1, workers), 1),
                       "x_reference": round(ratio, 2), "rounds": [round(r, 1) for r in variant_rates]}
                results.append(row)
                print(json.dumps(row), flush=True)

    print(f"\n### Loader throughput, {workers} worker processes, {size} px output, {limit} images each\n")
    print("| images | loader | images/s | per worker | x reference |")
    print("|---|---|---|---|---|")
    for row in results:
        print(f"| {row['source']} | {row['variant']} | {row['images_per_second']} | {row['per_worker']} | {row['x_reference']} |")
    for source in dict.fromkeys(row["source"] for row in results):
        rate = next(row["cache_build_images_per_second"] for row in results if row["source"] == source)
        print(f"\nOne-time cache build, {source}: {rate} images/s with {workers} workers.")
    if arguments.out:
        arguments.out.write_text(json.dumps({"workers": workers, "rows": results}, indent=2))


if __name__ == "__main__":
    main()
