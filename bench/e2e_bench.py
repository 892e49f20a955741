"""End to end: embed and search an SOP-sized test set of JPEGs through `main.py --mode eval`, timed.

    python bench/e2e_bench.py --images 60502 --out e2e.json       # on a GPU machine
    python bench/e2e_bench.py --images 60502 --cache --out e2e.json  # from a --mode cache copy (292 px)
    python bench/e2e_bench.py --images 60502 --decode device         # JPEGs decoded by nvjpeg on the GPU
    python bench/e2e_bench.py --tiny                               # a CPU smoke test

It writes SOP-like synthetic JPEGs (500 x 500, quality 90; classes of 2-12 images, in SOP's list format),
saves a random Swinv2-B/256 as a local checkpoint folder, and runs the real command a user types:
`python main.py --mode eval --checkpoint none` with that folder as the backbone. The wall time covers
process start, model load, decoding, embedding, exact kNN (k = 1001) and metrics; the report's own
stage times are printed beside it.

--cache first builds the downsized copy that `python main.py --mode cache` makes (`dataloaders.cache`;
the unique JPEGs re-encoded, their hard-linked copies linked again in the cache, then verified by the
same call), untimed, and evaluates with `data.cache_dir` pointing at it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
UNIQUE_IMAGES = 2000
sys.path.insert(0, str(REPO_ROOT))

from bench.synthetic_photos import link_repeats, write_sop_like_jpegs  # noqa: E402


def sop_like_dataset(root: Path, num_images: int, size: int, workers: int) -> None:
    rng = np.random.default_rng(0)
    labels = []
    while len(labels) < num_images:
        labels.extend([len(set(labels)) + 1] * int(rng.integers(2, 13)))
    labels = labels[:num_images]
    if labels.count(labels[-1]) == 1:
        labels[-1] = labels[-2]
    (root / "images").mkdir(parents=True, exist_ok=True)
    paths = [f"images/{i:06d}.jpg" for i in range(num_images)]
    # Encoding 60k JPEGs would cost more than the measurement: draw UNIQUE_IMAGES, hard-link the rest.
    # Every file is still opened and decoded separately, which is what the loader pays for.
    write_sop_like_jpegs(root, paths, UNIQUE_IMAGES, workers, size)
    from dataloaders import write_sop_list

    write_sop_list(root / "Ebay_test.txt", paths, labels)


def downsized_cache(root: Path, cache_root: Path, image_size: int, workers: int) -> None:
    """The --mode cache copy of the test list: re-encode the unique files, link the rest, verify all."""
    from dataloaders import read_sop_list
    from dataloaders.cache import build_cache
    from dataloaders.transforms import eval_resize_size

    test = read_sop_list(root / "Ebay_test.txt", root=root)
    short_side = eval_resize_size(image_size)
    unique = min(len(test), UNIQUE_IMAGES)
    build_cache([test.subset(np.arange(unique))], cache_root, short_side, workers=workers)
    link_repeats(cache_root, list(test.paths), unique)
    summary = build_cache([test], cache_root, short_side, workers=workers)  # reuses every file, writes the manifest
    assert not summary["failed"] and summary["reused"] == len(test), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60502)
    parser.add_argument("--tiny", action="store_true", help="tiny backbone, 200 images, CPU")
    parser.add_argument("--attention", default="sdpa", choices=("eager", "sdpa", "flex"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--cache", action="store_true", help="evaluate from a downsized --mode cache copy")
    parser.add_argument("--decode", default="workers", choices=("workers", "device"),
                        help="data.eval_decode: loader workers decode, or the evaluation device (nvjpeg on CUDA)")
    parser.add_argument("--extra", default="", help="more key=value overrides, space separated")
    parser.add_argument("--out", type=Path)
    arguments = parser.parse_args()
    num_images = 200 if arguments.tiny else arguments.images

    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary) / "sop_like"
        started = time.perf_counter()
        sop_like_dataset(root, num_images, 500, arguments.workers)
        print(f"wrote {num_images} JPEGs in {time.perf_counter() - started:.1f} s", flush=True)
        if arguments.tiny:
            backbone = "tiny"
        else:
            from bench.train_bench import swinv2_base_config
            from transformers import Swinv2Model

            backbone = str(Path(temporary) / "swinv2_base_random")
            Swinv2Model(swinv2_base_config()).save_pretrained(backbone)
        image_size = 64 if arguments.tiny else 256
        cache_settings = []
        if arguments.cache:
            started = time.perf_counter()
            downsized_cache(root, Path(temporary) / "cache", image_size, arguments.workers)
            cache_settings = [f"data.cache_dir={Path(temporary) / 'cache'}"]
            print(f"built the downsized cache in {time.perf_counter() - started:.1f} s (untimed)", flush=True)
        output = Path(temporary) / "report.json"
        command = [
            sys.executable, str(REPO_ROOT / "main.py"), "--mode", "eval", "--checkpoint", "none", "--output", str(output),
            "data.format=sop", f"data.root={root}", f"model.backbone={backbone}", "model.embedding_dim=0",
            f"model.attention={arguments.attention}", f"data.num_workers={arguments.workers}",
            f"eval.batch_size={arguments.batch_size}", "wandb.mode=disabled", f"output.dir={Path(temporary) / 'run'}",
            f"data.image_size={image_size}", f"data.eval_decode={arguments.decode}", *cache_settings,
            # every k must stay below the number of test images (main.py refuses the rest)
            f"eval.recall_ks=[{','.join(str(k) for k in (1, 10, 100, 1000) if k < num_images)}]",
            f"eval.map_ks=[{','.join(str(k) for k in (1000,) if k < num_images)}]", *arguments.extra.split(),
        ]
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO_ROOT)
        wall = time.perf_counter() - started
        report = json.loads(output.read_text())
    result = {"images": num_images, "wall_seconds": round(wall, 2), "seconds_setup": report["seconds_setup"],
              "seconds_setup_parts": report["seconds_setup_parts"],
              "seconds_embed": report["seconds_embed"],
              "seconds_embed_waiting_for_images": report["seconds_embed_waiting_for_images"],
              "seconds_embed_to_first_batch": report["seconds_embed_to_first_batch"],
              "seconds_embed_on_device": report["seconds_embed_on_device"],
              "seconds_search": report["seconds_search"], "seconds_metrics": report["seconds_metrics"],
              "embed_images_per_second": round(num_images / report["seconds_embed"], 1),
              "attention": arguments.attention, "batch_size": arguments.batch_size, "workers": arguments.workers,
              "from_cache": arguments.cache, "decode": arguments.decode}
    print(json.dumps(result))
    # setup: from run_eval's start to the first batch asked for (its imports, image list, device, model load);
    # the wall time also holds the process start and main.py's imports before it, and the report, saved
    # embeddings and picture after the metrics.
    print("\n| images | from | whole eval command (s) | setup (s) | embedding (s) | of which waiting for images (s) "
          "| of which first batch (s) | device busy (s) | images/s | kNN search (s) | metrics (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    source = ("cache" if arguments.cache else "originals") + (", decoded on the device" if arguments.decode == "device"
                                                              else "")
    print(f"| {num_images} | {source} | {result['wall_seconds']} | {result['seconds_setup']} | {result['seconds_embed']} | "
          f"{result['seconds_embed_waiting_for_images']} | {result['seconds_embed_to_first_batch']} | "
          f"{result['seconds_embed_on_device']} | {result['embed_images_per_second']} | "
          f"{result['seconds_search']} | {result['seconds_metrics']} |")
    print("\nsetup: " + ", ".join(f"{part} {seconds} s" for part, seconds in result["seconds_setup_parts"].items()))
    if arguments.out:
        arguments.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
