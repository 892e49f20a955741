"""Fine-tuning on new classes, and what it costs the old ones: train on classes A, fine-tune on new classes B
(`--init-from`), with and without replaying a fraction of A's images (`data.replay_list`).

    python bench/continual_bench.py                      # cub100's bird photos (when present), a few minutes
    python bench/continual_bench.py --fractions 0.1,0.3  # replay fractions to compare (no replay is always run)
    python bench/continual_bench.py train.loss=proxy_anchor train.miner=none  # another objective
    python bench/continual_bench.py --tiny               # generated demo products, 32 px, seconds

The classes are cut in two halves, A and B; a third of every class's images is held out for testing, so
"A test" asks: given a new photo of a product the model was trained on, does its nearest neighbour show
the same product? Each model is scored on A's and B's held-out images (every image a query against the
rest of its half): the untrained model, the model trained on A, and the A model fine-tuned on B with each
replay fraction. A's drop after fine-tuning is the forgetting. Every run goes through the same CLI a user
types (`--config`, default configs/demo.yaml: its recipe, with the data keys replaced), in this process.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.cli_runs import (CUB100, all_images, class_halves, held_out_images, run_cli,  # noqa: E402
                            timed_in_folder, write_list)


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "demo.yaml",
                        help="recipe (default configs/demo.yaml); its data keys are replaced")
    parser.add_argument("--cub", type=Path, default=CUB100, help="cub100's images folder (else the demo data)")
    parser.add_argument("--fractions", default="0.1,0.3", help="replay fractions of A's training images")
    parser.add_argument("--epochs", type=int, default=8, help="epochs on A")
    parser.add_argument("--finetune-epochs", type=int, default=4, help="epochs on B (+ replay)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="the held-out images and train.seed")
    parser.add_argument("--out", type=Path, default=None, help="run folders and reports (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="for every run, over --config")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on shared cores a second thread made the tiny model's "
                             "steps about 20x slower, docs/recipes.md)")
    parser.add_argument("--tiny", action="store_true", help="demo products, 32 px, one epoch each: a smoke test")
    arguments = parser.parse_args(argv)
    if arguments.tiny:
        arguments.epochs = arguments.finetune_epochs = 1
        arguments.image_size, arguments.fractions = 32, "0.5"
    return arguments


def run(arguments, out: Path) -> list[dict]:
    frozen_config = out / "recipe.yaml"  # a copy: an edit of the recipe during the bench cannot reach half of its runs
    frozen_config.write_text(arguments.config.read_text())
    arguments.config = frozen_config
    use_cub = not arguments.tiny and arguments.cub.is_dir()
    images, described = all_images(arguments.cub if use_cub else None, out / "demo_data", 8, 9, arguments.image_size)
    a, b = class_halves(images)
    (a_train, a_test), (b_train, b_test) = (held_out_images(images, half, 1 / 3, arguments.seed) for half in (a, b))
    lists = {name: write_list(out / "lists" / f"{name}.txt", images, indices)
             for name, indices in (("A_train", a_train), ("A_test", a_test), ("B_train", b_train), ("B_test", b_test))}
    print(f"{described}: A = {len(a_train)} training / {len(a_test)} test images, "
          f"B = {len(b_train)} / {len(b_test)}")
    common = ["data.format=sop", f"data.root={images.root}", f"data.image_size={arguments.image_size}",
              "data.val_fraction=0", "data.startup_check=none", f"train.seed={arguments.seed}", "wandb.mode=disabled",
              "eval.recall_ks=[1]", "eval.map_ks=[]"]
    if arguments.tiny:
        common += ["data.classes_per_batch=2", "data.images_per_class=2", "model.embedding_dim=16"]
    common += arguments.overrides

    def cli(*words) -> tuple[float, float]:
        return run_cli(["--config", arguments.config, *common, *words], out / "runs.log")

    if use_cub:  # decoding 500-px JPEGs would cost more than the tiny model: read a 73-px copy, built once
        common.append(f"data.cache_dir={out / 'cache'}")
        for half in ("A", "B"):
            cli("--mode", "cache", f"data.train_list={lists[f'{half}_train']}",
                f"data.test_list={lists[f'{half}_test']}")

    def scores(checkpoint: str, name: str) -> dict:
        recall = {}
        for half in ("A", "B"):
            report = out / "reports" / f"{name}_{half}.json"
            cli("--mode", "eval", "--checkpoint", checkpoint, f"data.test_list={lists[f'{half}_test']}",
                "--output", report, f"output.dir={out / 'untrained'}")
            recall[half] = json.loads(report.read_text())["recall@1"]
        return recall

    def train(name: str, epochs: int, *words) -> tuple[Path, dict]:
        print(f"training {name} ...", flush=True)
        wall, cpu = cli("--mode", "train", f"output.dir={out / name}", f"train.epochs={epochs}", *words)
        return out / name / "best.pt", {"wall": wall, "cpu": cpu}

    rows = [{"model": "untrained (random init)", **scores("none", "untrained"), "wall": 0.0, "cpu": 0.0}]
    a_model, seconds = train("A", arguments.epochs, f"data.train_list={lists['A_train']}")
    rows.append({"model": f"trained on A ({arguments.epochs} epochs)", **scores(str(a_model), "A"), **seconds})
    for fraction in [0.0, *(float(f) for f in arguments.fractions.split(",") if f)]:
        name = f"B_replay_{fraction:g}"
        replay = [f"data.replay_list={lists['A_train']}", f"data.replay_fraction={fraction}"] if fraction else []
        model, seconds = train(name, arguments.finetune_epochs, f"data.train_list={lists['B_train']}",
                               "--init-from", a_model, *replay)
        what = f"+ replay {fraction:.0%} of A" if fraction else "no replay"
        rows.append({"model": f"A, then B ({arguments.finetune_epochs} epochs), {what}", **scores(str(model), name),
                     **seconds})
    return rows


def table(rows: list[dict]) -> str:
    after_a = rows[1]["A"]
    lines = ["| model | Recall@1 A test | Recall@1 B test | A change since trained on A | training s (CPU s) |",
             "|---|---|---|---|---|"]
    for i, row in enumerate(rows):
        change = f"{100 * (row['A'] - after_a):+.1f}" if i >= 2 else ""
        lines.append(f"| {row['model']} | {100 * row['A']:.1f} | {100 * row['B']:.1f} | {change} | "
                     f"{row['wall']:.0f} ({row['cpu']:.0f}) |")
    return "\n".join(lines)


def main_bench(argv=None) -> list[dict]:
    arguments = parse_arguments(argv)
    torch.set_num_threads(arguments.threads)
    rows, wall, cpu = timed_in_folder(arguments.out, "continual_bench_", lambda out: run(arguments, out))
    print(f"\nRecall@1 (%) on held-out images of A's and B's classes; {wall:.0f} s in all, {cpu:.0f} s of CPU time\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main_bench()
