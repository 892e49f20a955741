"""Which objective to try first: every SOP recipe (configs/sop_*.yaml) trained on real photos with the tiny
backbone on the CPU, with the same budget and seeds, scored on classes it never saw.

    python bench/recipe_bench.py                    # cub100's bird photos, 3 seeds: under 30 minutes on 2 cores
    python bench/recipe_bench.py --budget-seconds 60 --seeds 0,1,2,3,4
    python bench/recipe_bench.py --tiny             # generated demo products, 32 px, one seed: a smoke test

The data is ../shared/data/cub100 cut as tests/test_cub100.py cuts it: the first 50 species train (a fifth of
them held out for validation, which picks best.pt), the last 50 test. Images are read from a downsized copy
(`--mode cache`) built once in the output folder.

A recipe brings what defines its objective: train.loss, its loss_params, train.miner and miner_params, the
margins, data.sampler and K (images per class). The rest is configs/demo.yaml's tiny-model CPU setting
(Swinv2 `tiny` from random init, 64 px, its learning rate and schedule), the same for every recipe, and the
batch holds --batch-images images (P = that / K). Equal budget: every run trains the same number of epochs,
as many as --budget-seconds of CPU time allow by a one-epoch run of the first recipe (CPU time, because on
shared cores the wall time is whatever the neighbours leave); the table shows what each run took. Runs go
--jobs at a time (default 2, one per core), each in its own process with --threads torch threads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import statistics
import sys
from pathlib import Path

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.cli_runs import CUB100, all_images, class_halves, run_cli, timed_in_folder, write_list  # noqa: E402

# What a recipe contributes; everything else comes from the base config (configs/demo.yaml).
RECIPE_KEYS = ("train.loss", "train.loss_params", "train.miner", "train.miner_params", "train.margin",
               "train.contrastive_pos_margin", "train.contrastive_neg_margin", "train.loss_lr", "data.sampler",
               "data.images_per_class")


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", type=Path,
                        default=sorted((REPO_ROOT / "configs").glob("sop_*.yaml")), help="recipe files")
    parser.add_argument("--base", type=Path, default=REPO_ROOT / "configs" / "demo.yaml",
                        help="the tiny-model CPU setting every recipe is adapted to (default configs/demo.yaml)")
    parser.add_argument("--cub", type=Path, default=CUB100, help="cub100's images folder (else the demo data)")
    parser.add_argument("--seeds", default="0,1,2", help="train.seed values, comma-separated")
    parser.add_argument("--budget-seconds", type=float, default=60.0,
                        help="CPU seconds of training per run (about its time on an idle core), as whole epochs")
    parser.add_argument("--epochs", type=int, default=0,
                        help="epochs per run, instead of timing one (0 = from --budget-seconds)")
    parser.add_argument("--batch-images", type=int, default=64, help="images per batch, for every recipe")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each in its own process")
    parser.add_argument("--out", type=Path, default=None, help="runs, cache and logs (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="over the base config for every run (a recipe's own keys still win)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on shared cores a second thread made the tiny model's "
                             "steps about 20x slower, docs/recipes.md)")
    parser.add_argument("--tiny", action="store_true", help="demo products, 32 px, one seed, one epoch")
    arguments = parser.parse_args(argv)
    if arguments.tiny:
        arguments.seeds, arguments.image_size, arguments.batch_images, arguments.jobs = "0", 32, 8, 1
    return arguments


def recipe_overrides(path: Path, batch_images: int) -> list[str]:
    """The recipe's objective keys as key=value words, and P x K for a batch of `batch_images`."""
    sections = yaml.safe_load(path.read_text()) or {}
    words = []
    for key in RECIPE_KEYS:
        section, name = key.split(".")
        if name in (sections.get(section) or {}):
            value = sections[section][name]
            words.append(f"{key}={json.dumps(value) if isinstance(value, dict) else value}")
    k = (sections.get("data") or {}).get("images_per_class", 4)
    return [*words, f"data.images_per_class={k}", f"data.classes_per_batch={max(2, batch_images // k)}"]


def dataset_overrides(arguments, out: Path) -> list[str]:
    """SOP-format lists of cub100 (50 training species, 50 unseen test species) or of the demo products."""
    use_cub = not arguments.tiny and arguments.cub.is_dir()
    images, described = all_images(arguments.cub if use_cub else None, out / "demo_data", 16, 6, arguments.image_size)
    train, test = class_halves(images)
    train_list = write_list(out / "lists" / "train.txt", images, train)
    test_list = write_list(out / "lists" / "test.txt", images, test)
    print(f"{described}: {len(train)} training images of {len(set(images.labels[train]))} classes, "
          f"{len(test)} test images of {len(set(images.labels[test]))} unseen classes")
    words = ["data.format=sop", f"data.root={images.root}", f"data.train_list={train_list}",
             f"data.test_list={test_list}", f"data.image_size={arguments.image_size}", "data.val_fraction=0.2",
             "data.startup_check=none", "train.patience=0", "wandb.mode=disabled", "eval.recall_ks=[1]",
             "eval.map_ks=[]"]
    if use_cub:  # decoding 500-px JPEGs would cost more than the tiny model: read a 73-px copy, built once
        words.append(f"data.cache_dir={out / 'cache'}")
        run_cli(["--mode", "cache", "--config", arguments.base, *words], out / "logs" / "cache.log")
    return words


def summary(values: list[float]) -> str:
    mean = statistics.fmean(values)
    spread = f" ± {statistics.stdev(values):.1f} ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else ""
    return f"{mean:.1f}{spread}"


def epochs_in_budget(arguments, base: list, out: Path) -> int:
    """The epochs of --budget-seconds, from the CPU time of a one-epoch run of the first recipe (seed 0)."""
    calibration = out / "calibration"
    _, cpu = run_cli(["--mode", "train", *base, *recipe_overrides(arguments.recipes[0], arguments.batch_images),
                      "train.epochs=1", f"output.dir={calibration}", "--overwrite"], out / "logs" / "calibration.log")
    epochs = max(1, round(arguments.budget_seconds / cpu))
    print(f"a one-epoch run of {arguments.recipes[0].stem} took {cpu:.0f} s of CPU time: {epochs} epochs per run "
          f"for a budget of {arguments.budget_seconds:.0f} s", flush=True)
    return epochs


def train_and_test(job: dict) -> dict:
    """One run, in a worker process: train (unless job["train"] is None), then score on the test split."""
    log = Path(job["log"])
    wall, cpu = run_cli(job["train"], log) if job["train"] else (0.0, 0.0)
    run_cli(job["eval"], log)
    return {**job, **json.loads(Path(job["report"]).read_text()), "wall": wall, "cpu": cpu}


def run(arguments, out: Path) -> list[dict]:
    seeds = [int(seed) for seed in arguments.seeds.split(",")]
    frozen_base = out / "base.yaml"  # a copy: an edit of the base during the bench cannot reach half of its runs
    frozen_base.write_text(arguments.base.read_text())
    arguments.base = frozen_base
    data = dataset_overrides(arguments, out)
    base = ["--config", frozen_base, *data, *arguments.overrides]
    epochs = 1 if arguments.tiny else arguments.epochs or epochs_in_budget(arguments, base, out)

    jobs = []
    for recipe in [None, *arguments.recipes]:  # None: the untrained model
        words = recipe_overrides(recipe, arguments.batch_images) if recipe else []
        for seed in seeds:
            name = f"{recipe.stem if recipe else 'untrained'}_seed{seed}"
            # A report folder per run: an evaluation holds its output folder, and runs go in parallel.
            run_dir, report = out / "runs" / name, out / "reports" / name / "report.json"
            train = ["--mode", "train", *base, *words, f"train.seed={seed}", f"train.epochs={epochs}",
                     f"output.dir={run_dir}", "--overwrite"] if recipe else None
            jobs.append({"recipe": recipe.stem if recipe else "untrained (random init)", "seed": seed,
                         "log": str(out / "logs" / f"{name}.log"), "report": str(report), "train": train,
                         "eval": ["--mode", "eval", *base, f"train.seed={seed}", "--checkpoint",
                                  run_dir / "best.pt" if recipe else "none", "--output", report]})
    print(f"{len(jobs)} runs of {epochs} epochs, {arguments.jobs} at a time; their output in {out / 'logs'}",
          flush=True)
    results = []
    with contextlib.ExitStack() as stack:
        if arguments.jobs > 1:  # spawn: a fresh interpreter per worker, no forked torch threads
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(
                arguments.jobs, initializer=torch.set_num_threads, initargs=(arguments.threads,)))
        for result in pool.imap_unordered(train_and_test, jobs) if arguments.jobs > 1 else map(train_and_test, jobs):
            results.append(result)
            print(f"  {result['recipe']} seed {result['seed']}: test recall@1 {100 * result['recall@1']:.1f}%, "
                  f"map@r {100 * result['map@r']:.1f}% (training {result['wall']:.0f} s, CPU {result['cpu']:.0f} s)",
                  flush=True)
    order = [job["recipe"] for job in jobs]
    return [{"recipe": recipe, "runs": [r for r in results if r["recipe"] == recipe]}
            for recipe in dict.fromkeys(order)]


def table(rows: list[dict]) -> str:
    lines = ["| recipe | test Recall@1 (%) | test MAP@R (%) | training s per run (CPU s) |", "|---|---|---|---|"]
    ranked = rows[:1] + sorted(rows[1:], key=lambda row: -statistics.fmean(r["recall@1"] for r in row["runs"]))
    for row in ranked:
        runs = row["runs"]
        wall, cpu = (statistics.fmean(r[key] for r in runs) for key in ("wall", "cpu"))
        lines.append(f"| {row['recipe']} | {summary([100 * r['recall@1'] for r in runs])} | "
                     f"{summary([100 * r['map@r'] for r in runs])} | {wall:.0f} ({cpu:.0f}) |")
    return "\n".join(lines)


def main_bench(argv=None) -> list[dict]:
    arguments = parse_arguments(argv)
    torch.set_num_threads(arguments.threads)
    rows, wall, cpu = timed_in_folder(arguments.out, "recipe_bench_", lambda out: run(arguments, out))
    print(f"\nTest split: classes never trained on. Mean ± standard deviation (min-max) over seeds {arguments.seeds}; "
          f"{wall:.0f} s in all, {cpu:.0f} s of CPU time.\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main_bench()
