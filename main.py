"""Command line: the only module that wires config -> data -> model -> objective -> trainer -> evaluation.

    python main.py --mode train [--config FILE] [--resume] [key=value ...]
    python main.py --mode eval  [--config FILE] [--checkpoint PATH|none] [--output FILE] [--visualize N] [key=value ...]
    python main.py --mode eval  --embeddings E.npy --labels L.npy [--output report.json]
    python main.py --mode demo  [key=value ...]        (configs/demo.yaml: train, then eval untrained vs trained)
    python main.py --mode cache [--config FILE] [key=value ...]   (build data.cache_dir, a downsized copy)
    python main.py --mode check [--config FILE] [key=value ...]   (every list line and image, before training)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 3  # SIGTERM/SIGINT: last.pt saved at a step boundary; a requeued job resumes with --resume
GRID_NEIGHBOURS = 8  # results per query in the --visualize grid
DEMO_PICTURE_QUERIES = 8


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


class DataCheckFailed(Exception):
    """The check before training found unreadable images (data.on_bad_image=error): one line, exit code 1."""


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fine-tune and evaluate a Swinv2 image-retrieval model (deep metric learning).",
        epilog="Trailing section.key=value pairs override the config, e.g. train.epochs=3 data.root=/data/sop",
    )
    parser.add_argument("--mode", required=True, choices=("train", "eval", "demo", "cache", "check"))
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML config (default: built-in SOP defaults; demo mode: configs/demo.yaml)")
    parser.add_argument("--checkpoint", default=None,
                        help="eval: checkpoint to evaluate (default: best.pt in output.dir); 'none' = backbone as loaded")
    parser.add_argument("--embeddings", type=Path, help="eval: precomputed (N, D) float .npy; no model, no images")
    parser.add_argument("--labels", type=Path, help="eval: (N,) integer .npy labels for --embeddings")
    parser.add_argument("--output", type=Path, help="eval: where to write the report JSON (default: output.dir/report.json)")
    parser.add_argument("--visualize", type=int, default=0, metavar="N",
                        help="eval: also draw N test queries (picked by train.seed) with their top results")
    parser.add_argument("--resume", action="store_true", help="train: continue from last.pt in output.dir")
    parser.add_argument("--overwrite", action="store_true", help="train: start afresh even if output.dir holds a run")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


# ---- data ------------------------------------------------------------------------------------------
def resolve_image_lists(config, need_train: bool, need_test: bool, ignore_cache: bool = False):
    """(train, validation, test) ImageLists from the configured format; None where not needed.

    With data.cache_dir set, the lists point into the verified cache instead of data.root.
    """
    from dataloaders import read_folder_tree, read_sop_list, split_classes
    from dataloaders.demo_data import ensure_demo_dataset

    data = config.data
    root = Path(data.root)
    if data.format == "demo":
        ensure_demo_dataset(root, data.demo_classes, data.demo_images_per_class, data.image_size, config.train.seed)
    elif not root.is_dir():
        raise UsageError(f"data.root '{root}' does not exist; point data.root at your {data.format} dataset "
                         f"(see README: 'Getting SOP'), or run the demo: python main.py --mode demo")
    train = validation = test = None
    if need_train:
        if data.format == "folder":
            full = read_folder_tree(root)
        else:
            full = read_sop_list(root / data.train_list, root)
        train_indices, val_indices = split_classes(full.labels, data.val_fraction, data.split_seed)
        train, validation = full.subset(train_indices), full.subset(val_indices)
    if need_test:
        if data.format == "folder":
            if not data.test_root:
                raise UsageError("data.test_root is empty: the folder format needs a separate folder of test classes")
            test = read_folder_tree(Path(data.test_root))
        else:
            test = read_sop_list(root / data.test_list, root)
    if data.cache_dir and not ignore_cache:
        from dataloaders.cache import use_cache
        from dataloaders.transforms import eval_resize_size

        train, validation, test = (None if image_list is None else use_cache(image_list, Path(data.cache_dir),
                                                                            eval_resize_size(data.image_size))
                                   for image_list in (train, validation, test))
    return train, validation, test


def has_test_split(config) -> bool:
    """SOP-format lists always name a test list; a folder catalogue has one only with data.test_root."""
    return config.data.format != "folder" or bool(config.data.test_root)


def worker_count(configured: int) -> int:
    return len(os.sched_getaffinity(0)) if configured == -1 else configured


def evaluation_loader(image_list, config, device):
    import torch
    from dataloaders import (ImageDataset, build_transforms, collate_skipping_bad_images, decode_size,
                             ignore_stop_signals)

    workers = worker_count(config.data.num_workers)
    size = config.data.image_size
    dataset = ImageDataset(image_list, build_transforms(size, train=False), decode_size(size, train=False),
                           skip_bad_images=config.data.on_bad_image == "skip")
    return torch.utils.data.DataLoader(dataset, batch_size=config.eval.batch_size, shuffle=False, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                       worker_init_fn=ignore_stop_signals, collate_fn=collate_skipping_bad_images)


def training_loader(image_list, config, device):
    import torch
    from dataloaders import (ImageDataset, PKBatchSampler, RandomTripletBatchSampler, build_transforms,
                             collate_skipping_bad_images, decode_size, ignore_stop_signals)

    data = config.data
    batch_images = (data.classes_per_batch * data.images_per_class if data.sampler == "pk"
                    else 3 * data.triplets_per_batch)
    if batch_images > len(image_list):
        keys = ("data.classes_per_batch x data.images_per_class" if data.sampler == "pk"
                else "3 x data.triplets_per_batch")
        raise UsageError(f"{keys} = {batch_images} images per batch, more than the {len(image_list)} images of the "
                         f"training split: lower them")
    try:
        if data.sampler == "pk":
            batch_sampler = PKBatchSampler(image_list.labels, data.classes_per_batch, data.images_per_class,
                                           config.train.seed)
        else:
            batch_sampler = RandomTripletBatchSampler(image_list.labels, data.triplets_per_batch, config.train.seed)
    except ValueError as error:  # e.g. P larger than the number of usable classes
        raise UsageError(f"training split of {len(image_list)} images: {error}") from None
    workers = worker_count(data.num_workers)
    dataset = ImageDataset(image_list, build_transforms(data.image_size, train=True, min_crop_scale=data.min_crop_scale),
                           decode_size(data.image_size, train=True, min_crop_scale=data.min_crop_scale),
                           skip_bad_images=data.on_bad_image == "skip")
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None, generator=torch.Generator(),
                                       worker_init_fn=ignore_stop_signals, collate_fn=collate_skipping_bad_images)


def startup_data_check(config, splits: dict, run_dir: Path, skip_log) -> dict:
    """Before training: check every train/validation image (data.startup_check), so damage shows now, not in hour three.

    Bad images stop the run (data.on_bad_image=error: exit 1, each named in data_check.json) or are left out
    of the lists and recorded in the skip log (skip). Returns the splits, without the bad images when skipping.
    """
    import numpy as np

    from dataloaders.checks import check_image_lists

    mode = config.data.startup_check
    if mode == "none":
        return splits
    started = time.perf_counter()
    checked = {name: image_list for name, image_list in splits.items() if len(image_list) > 0}
    report = check_image_lists(checked, workers=max(1, worker_count(config.data.num_workers)), decode=mode == "full")
    total = sum(len(image_list) for image_list in checked.values())
    print(f"data check ({'every image decoded' if mode == 'full' else 'headers only'}; data.startup_check={mode}): "
          f"{total} images, {report['num_bad_images']} bad, {time.perf_counter() - started:.1f} s")
    if report["ok"]:
        return splits
    from evaluation import write_report

    write_report(report, run_dir / "data_check.json")
    bad = [(name, item) for name, split in report["splits"].items() for item in split["bad_images"]]
    if config.data.on_bad_image == "error":
        name, first = bad[0]
        raise DataCheckFailed(f"{len(bad)} unreadable image(s) in the training data, first: "
                              f"{Path(report['splits'][name]['root']) / first['path']}: {first['reason']}; all listed "
                              f"in {run_dir / 'data_check.json'}. Fix or remove them, or set data.on_bad_image=skip")
    kept_splits = {}
    for name, image_list in splits.items():
        bad_by_path = {item["path"]: item for item in report["splits"].get(name, {}).get("bad_images", [])}
        skipped = [(index, bad_by_path[path]["reason"], bad_by_path[path]["detail"])
                   for index, path in enumerate(image_list.paths) if path in bad_by_path]
        skip_log.record(name, image_list, skipped, "startup check")
        keep = np.ones(len(image_list), dtype=bool)
        keep[[index for index, _, _ in skipped]] = False
        kept_splits[name] = image_list.subset(np.flatnonzero(keep))
    print(f"warning: skipping {len(bad)} unreadable image(s) (data.on_bad_image=skip), listed in {skip_log.path}")
    return kept_splits


def prepare_output_dir(path: Path) -> Path:
    """Create the run folder and prove it writable now, before any data or model is loaded."""
    import tempfile

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise UsageError(f"output.dir '{path}' is not a writable folder ({error.strerror or error}); "
                         f"set output.dir to a folder you can write") from None
    return path


def check_ks_fit(config, num_items: int, what: str) -> None:
    """Recall@k / mAP@k need k <= N - 1 (a query's gallery is every other item); say so before any heavy work."""
    largest = max([*config.eval.recall_ks, *config.eval.map_ks])
    if largest > num_items - 1:
        fitting = ",".join(str(k) for k in config.eval.recall_ks if k <= num_items - 1) or "1"
        raise UsageError(f"eval.recall_ks / eval.map_ks ask for k = {largest}, but the {what} has {num_items} images, "
                         f"so each query's gallery holds {num_items - 1}: use k <= {num_items - 1}, "
                         f"e.g. eval.recall_ks=[{fitting}] eval.map_ks=[]")


# ---- shared set-up -----------------------------------------------------------------------------------
def select_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"train.device={name} but no CUDA device is available")
    return torch.device(name)


def configure_matmul_precision(device, allow_tf32: bool) -> None:
    """TF32 tensor cores for fp32 matmuls and convolutions on CUDA (Ampere and later)."""
    import torch

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        torch.backends.cudnn.allow_tf32 = allow_tf32


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def print_report(title: str, report: dict) -> None:
    from evaluation import markdown_table

    print(f"\n{title} ({report['num_queries']} queries)\n")
    print(markdown_table({title: report}))
    print()


# ---- modes -----------------------------------------------------------------------------------------
def run_train(config, resume: bool, overwrite: bool) -> dict:
    from config import save_config
    from dataloaders import stop_loader_workers
    from dataloaders.skipped_images import SKIPPED_IMAGES_FILE, SkippedImageLog
    from evaluation import evaluate_embeddings, extract_embeddings, require_queries
    from model import apply_speed_options, build_embedder
    from objective import MetricLearningObjective
    from tracking import Tracker
    from trainer import Trainer, build_optimizer, warmup_cosine_schedule

    run_dir = Path(config.output.dir)
    last = run_dir / "last.pt"
    if last.exists() and not (resume or overwrite):
        raise UsageError(f"{run_dir} already holds a run (last.pt): add --resume to continue it, "
                         f"--overwrite to start afresh, or set output.dir to a new folder")
    if resume and not last.exists():
        raise UsageError(f"--resume: no {last} to resume from")
    # Checked before anything is written, so a refused resume leaves the run folder as it was.
    resumed_from = refuse_mismatched_checkpoint(last, config) if resume else None
    prepare_output_dir(run_dir)
    if not resume:  # --overwrite: a fresh run gets fresh logs
        for name in ("metrics.jsonl", SKIPPED_IMAGES_FILE, "data_check.json"):
            (run_dir / name).unlink(missing_ok=True)

    train_list, val_list, _ = resolve_image_lists(config, need_train=True, need_test=False)
    skip_log = SkippedImageLog(run_dir / SKIPPED_IMAGES_FILE)
    lists = startup_data_check(config, {"train": train_list, "validation": val_list}, run_dir, skip_log)
    train_list, val_list = lists["train"], lists["validation"]
    if resumed_from is not None:
        refuse_changed_training_list(resumed_from, train_list, last)
    device = select_device(config.train.device)
    configure_matmul_precision(device, config.train.tf32)
    # Loaders first: an impossible batch size is refused before a backbone is downloaded or built.
    # (Building a DataLoader starts no worker and draws from no global RNG.)
    train_loader = training_loader(train_list, config, device)
    val_loader = evaluation_loader(val_list, config, device) if len(val_list) >= 2 else None
    seed_everything(config.train.seed)
    model = build_embedder(config.model.backbone, config.data.image_size, config.model.embedding_dim).to(device)
    apply_speed_options(model, config.model.attention, config.train.grad_checkpointing, config.train.compile)
    print(f"train: {len(train_list)} images / {train_list.num_classes} classes; "
          f"validation: {len(val_list)} images / {val_list.num_classes} classes; "
          f"{len(train_loader)} batches per epoch; device {device}")

    validate = None
    if val_loader is not None:
        # Validation picks best.pt by Recall@1; a k beyond a small validation split's gallery is left out.
        val_recall_ks = [k for k in config.eval.recall_ks if k <= len(val_list) - 1] or [1]

        def validate(trained_model):
            embedded = extract_embeddings(trained_model, val_loader, device, config.train.precision, "validate",
                                          embedding_cuda_graph(config))
            skip_log.record("validation", val_list, embedded.skipped, "validation")
            require_queries(embedded, "validation", len(val_list), skip_log.path)
            return evaluate_embeddings(embedded.embeddings, embedded.labels, val_recall_ks, config.eval.backend,
                                       str(device), config.eval.memory_gb)
    else:
        print("no validation classes (data.val_fraction=0): best.pt will be the last epoch")

    objective = MetricLearningObjective(config.train.loss, config.train.miner, config.train.margin,
                                        config.train.contrastive_pos_margin, config.train.contrastive_neg_margin,
                                        config.train.seed)
    optimizer = build_optimizer(model, config.train.lr, config.train.head_lr_multiplier, config.train.weight_decay, device)
    total_steps = config.train.epochs * len(train_loader)
    scheduler = warmup_cosine_schedule(optimizer, total_steps, round(config.train.warmup_fraction * total_steps))

    save_config(config, run_dir / "config.yaml")
    tracker = Tracker(run_dir, config.wandb.mode, config.wandb.project, config.wandb.entity, config.wandb.run_name,
                      config.to_dict(), job_type="train")
    checkpoint_extra = {
        "config": config.to_dict(),
        "backbone_config_json": model.backbone.config.to_json_string(),
        "embedding_dim": config.model.embedding_dim,
        "normalisation": {"mean": model.input_mean, "std": model.input_std},
        "train_list": training_list_identity(train_list),
    }
    trainer = Trainer(model, objective, optimizer, scheduler, train_loader, validate, device, config.train.precision,
                      config.train.grad_clip, config.train.epochs, config.train.patience, run_dir, tracker,
                      config.train.seed, checkpoint_extra, skip_log=skip_log)
    if resumed_from is not None:
        trainer.resume(resumed_from, last)
    try:
        summary = trainer.fit()
    finally:
        tracker.finish()
        stop_loader_workers(train_loader, val_loader)
    if trainer.is_main:
        from visualize import plot_validation_curve

        curve = plot_validation_curve(trainer.history, run_dir / "validation_curve.png")
        if curve is not None:
            print(f"picture written to {curve}")
    print(f"done: best validation recall@1 {100 * summary['best_val_recall@1']:.2f}%; checkpoints in {run_dir}")
    if skip_log.count():
        print(f"warning: {skip_log.count()} unreadable image(s) were skipped {skip_log.counts_by_reason()}, "
              f"listed in {skip_log.path}")
    return summary


def refuse_mismatched_checkpoint(path: Path, config) -> dict:
    """Load `path` (weights only, onto the CPU); raise UsageError if it was trained with another model definition."""
    from config import differing_keys
    from trainer import load_checkpoint

    checkpoint = load_checkpoint(path)
    differences = differing_keys(checkpoint["config"], config.to_dict())
    if differences:
        raise UsageError(f"checkpoint {path} does not match this config ({'; '.join(differences)}): "
                         f"use the run's own config.yaml, or another output.dir")
    return checkpoint


def training_list_identity(train_list) -> dict:
    """Size and digest of the training list (paths and labels) that the epoch plans are drawn from."""
    import hashlib

    digest = hashlib.sha256("\n".join(train_list.paths).encode())
    digest.update(train_list.labels.tobytes())
    return {"num_images": len(train_list), "sha256": digest.hexdigest()}


def refuse_changed_training_list(checkpoint: dict, train_list, path: Path) -> None:
    """A resumed run must draw its batches from the list it started with, or the epoch plan breaks off."""
    saved = checkpoint.get("train_list")  # absent in checkpoints from before this check
    if saved is not None and saved != training_list_identity(train_list):
        raise UsageError(f"the training list differs from the one {path} was trained on ({saved['num_images']} "
                         f"images then, {len(train_list)} now): files changed or went bad, or data.startup_check / "
                         f"data.on_bad_image changed. Restore them to resume, or start afresh with --overwrite")


def embedding_cuda_graph(config) -> bool:
    """eval.cuda_graph, except for a compiled backbone: its forward is a few fused kernels already, and
    capturing it would mix torch.compile's own machinery into the capture."""
    return config.eval.cuda_graph and not config.train.compile


def load_model_for_eval(config, checkpoint_arg, device):
    """(model, description). `none` = the backbone as loaded (pretrained or random init)."""
    from model import apply_speed_options, build_embedder, embedder_from_backbone_config

    if checkpoint_arg == "none":
        seed_everything(config.train.seed)  # `tiny` then starts from the same random weights as training did
        model = build_embedder(config.model.backbone, config.data.image_size, config.model.embedding_dim)
        description = f"{config.model.backbone} (not fine-tuned)"
    else:
        path = Path(checkpoint_arg) if checkpoint_arg else Path(config.output.dir) / "best.pt"
        if not path.is_file():
            raise UsageError(f"checkpoint '{path}' does not exist (train first, or pass --checkpoint PATH or none)")
        checkpoint = refuse_mismatched_checkpoint(path, config)
        normalisation = checkpoint["normalisation"]
        model = embedder_from_backbone_config(json.loads(checkpoint["backbone_config_json"]),
                                              checkpoint["embedding_dim"], normalisation["mean"], normalisation["std"])
        model.load_state_dict(checkpoint["model"])  # strict: every tensor must match
        description = f"{path} (epoch {checkpoint['epoch']})"
    apply_speed_options(model, config.model.attention, compile_backbone=config.train.compile)
    return model.to(device), description


def save_pictures(run_dir: Path, prefix: str, title: str, report: dict, embeddings, labels, image_paths,
                  num_queries: int, seed: int) -> list[Path]:
    """The Recall@k curve and, when num_queries > 0, a grid of that many queries with their top results.

    (Training draws the validation curve: it has the whole history.)
    """
    from retrieval import query_neighbours
    from visualize import choose_queries, plot_recall_curve, retrieval_grid

    pictures = [plot_recall_curve(report, run_dir / f"{prefix}recall_at_k.png", title)]
    if num_queries > 0:
        queries = choose_queries(len(labels), num_queries, seed)
        scores, neighbours = query_neighbours(embeddings, queries, GRID_NEIGHBOURS)
        pictures.append(retrieval_grid(queries, neighbours.numpy(), scores.numpy(), labels.numpy(), image_paths,
                                       run_dir / f"{prefix}retrieval_examples.png"))
    for picture in pictures:
        print(f"picture written to {picture}")
    return pictures


def run_eval_embeddings(config, embeddings_path: Path, labels_path: Path, output: Path | None,
                        visualize: int = 0) -> dict:
    import numpy as np

    from evaluation import evaluate_embeddings, write_report

    if visualize:
        raise UsageError("--visualize draws the test images: it needs a model evaluation, not --embeddings")
    for path in (embeddings_path, labels_path):
        if not path.is_file():
            raise UsageError(f"'{path}' does not exist")
    embeddings = np.load(embeddings_path, allow_pickle=False)
    labels = np.load(labels_path, allow_pickle=False)
    if embeddings.ndim != 2 or not np.issubdtype(embeddings.dtype, np.floating):
        raise UsageError(f"--embeddings must be a 2-D float array; got shape {embeddings.shape}, dtype {embeddings.dtype}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(embeddings):
        raise UsageError(f"--labels must be a 1-D integer array of length {len(embeddings)}; "
                         f"got shape {labels.shape}, dtype {labels.dtype}")
    check_ks_fit(config, len(labels), "embedding set")
    # Inner product ranks like cosine only for unit vectors: normalise whatever was given.
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    embeddings = (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)
    device = select_device(config.train.device)
    report = evaluate_embeddings(embeddings, labels.astype(np.int64), config.eval.recall_ks, config.eval.backend,
                                 str(device), config.eval.memory_gb, config.eval.map_ks)
    report["source"] = str(embeddings_path)
    output = output or Path(config.output.dir) / "report.json"
    write_report(report, output)
    print_report(str(embeddings_path), report)
    print(f"report written to {output}")
    return report


def run_eval(config, checkpoint_arg, output: Path | None, visualize: int = 0) -> dict:
    entered = time.perf_counter()  # before the imports below: on a first call they are much of the setup
    import numpy as np

    from dataloaders import stop_loader_workers
    from dataloaders.skipped_images import SKIPPED_IMAGES_FILE, SkippedImageLog
    from evaluation import evaluate_embeddings, extract_embeddings, require_queries, write_report
    from tracking import Tracker

    imported = time.perf_counter()
    device = select_device(config.train.device)
    run_dir = prepare_output_dir(Path(config.output.dir))
    _, _, test_list = resolve_image_lists(config, need_train=False, need_test=True)
    check_ks_fit(config, len(test_list), "test split")
    configure_matmul_precision(device, config.train.tf32)
    listed = time.perf_counter()
    model, description = load_model_for_eval(config, checkpoint_arg, device)  # the device starts here
    loader = evaluation_loader(test_list, config, device)
    started = time.perf_counter()
    setup_parts = {"imports": imported - entered, "image_list": listed - imported, "model_and_loader": started - listed}
    try:
        embedded = extract_embeddings(model, loader, device, config.train.precision, "embed test set",
                                      embedding_cuda_graph(config))
    finally:
        stop_loader_workers(loader)
    seconds_embed = time.perf_counter() - started
    # Skipped images (data.on_bad_image=skip) are left out of the gallery and the queries: every row below
    # is one image that was read, and `evaluated` maps the rows back to the test list.
    evaluated = embedded.indices.numpy()
    embeddings, labels = embedded.embeddings, embedded.labels
    prefix = "untrained_" if checkpoint_arg == "none" else ""
    skip_log = SkippedImageLog(run_dir / SKIPPED_IMAGES_FILE)
    if embedded.skipped:
        skip_log.record("test", test_list, embedded.skipped, f"{prefix}eval")
    require_queries(embedded, "test", len(test_list), skip_log.path)
    if embedded.skipped:
        beyond_gallery = sorted(k for k in {*config.eval.recall_ks, *config.eval.map_ks} if k > len(labels) - 1)
        whole_gallery_note = (f"; k = {', '.join(map(str, beyond_gallery))} now reach past the {len(labels) - 1} "
                              f"other images, so those metrics cover the whole gallery" if beyond_gallery else "")
        print(f"warning: {len(embedded.skipped)} of {len(test_list)} test images could not be read and were left out "
              f"(data.on_bad_image=skip; listed in {skip_log.path}): the metrics cover the other {len(labels)}"
              f"{whole_gallery_note}", file=sys.stderr)
    super_labels = test_list.super_labels[evaluated] if config.data.format != "folder" else None
    report = evaluate_embeddings(embeddings, labels, config.eval.recall_ks, config.eval.backend, str(device),
                                 config.eval.memory_gb, config.eval.map_ks, super_labels)
    # seconds_setup: imports, device start, model load, image list; for telling a slow start from a slow loop.
    report.update(seconds_setup=round(started - entered, 3),
                  seconds_setup_parts={part: round(seconds, 3) for part, seconds in setup_parts.items()},
                  seconds_embed=round(seconds_embed, 3),
                  seconds_embed_waiting_for_images=round(embedded.seconds_waiting_for_images, 3),
                  seconds_embed_to_first_batch=round(embedded.seconds_to_first_batch, 3),
                  seconds_embed_on_device=(None if embedded.seconds_on_device is None
                                           else round(embedded.seconds_on_device, 3)),
                  model=description, split="test",
                  num_images_listed=len(test_list), num_images_skipped=len(embedded.skipped))

    # Row i of the embeddings is image i of test_paths.txt: kept together so the index can be served later.
    np.save(run_dir / f"{prefix}test_embeddings.npy", embeddings.numpy())
    np.save(run_dir / f"{prefix}test_labels.npy", labels.numpy())
    evaluated_paths = [test_list.paths[index] for index in evaluated]
    (run_dir / f"{prefix}test_paths.txt").write_text("".join(f"{path}\n" for path in evaluated_paths))
    output = output or run_dir / f"{prefix}report.json"
    write_report(report, output)
    print_report(f"test: {description}", report)
    print(f"report written to {output}")
    pictures = save_pictures(run_dir, prefix, f"test: {description}", report, embeddings, labels,
                             [test_list.root / path for path in evaluated_paths], visualize, config.train.seed)
    tracker = Tracker(run_dir, config.wandb.mode, config.wandb.project, config.wandb.entity, config.wandb.run_name,
                      config.to_dict(), job_type="eval")
    scalars = {f"test/{k}": v for k, v in report.items() if isinstance(v, (int, float))}
    tracker.log(scalars, step=0)
    tracker.summary(scalars)
    for picture in pictures:
        tracker.log_image(f"test/{picture.stem}", picture, step=0)
    tracker.finish()
    return report


def run_cache(config) -> dict:
    """Build data.cache_dir: every train and test image once, short side = the evaluation resize."""
    from dataloaders.cache import build_cache
    from dataloaders.transforms import eval_resize_size

    if not config.data.cache_dir:
        raise UsageError("set data.cache_dir=FOLDER to say where the cache goes")
    lists = [l for l in resolve_image_lists(config, need_train=True, need_test=has_test_split(config), ignore_cache=True)
             if l is not None]
    short_side = eval_resize_size(config.data.image_size)
    started = time.perf_counter()
    summary = build_cache(lists, Path(config.data.cache_dir), short_side, workers=worker_count(config.data.num_workers))
    print(f"cache {config.data.cache_dir}: {summary['written']} images written, {summary['reused']} reused, "
          f"{len(summary['failed'])} failed, short side {short_side} px, {time.perf_counter() - started:.1f} s")
    if summary["failed"]:
        for message in summary["failed"][:20]:
            print(f"  {message}", file=sys.stderr)
        raise UsageError(f"{len(summary['failed'])} images could not be cached (listed above); the cache is not marked complete")
    return summary


def run_check(config) -> dict:
    """Open and decode every image of every split; report counts, class sizes and every bad item."""
    from dataloaders.checks import check_image_lists, format_check_report
    from evaluation import write_report

    train, validation, test = resolve_image_lists(config, need_train=True, need_test=has_test_split(config))
    splits = {name: image_list for name, image_list in (("train", train), ("validation", validation), ("test", test))
              if image_list is not None and len(image_list) > 0}
    run_dir = prepare_output_dir(Path(config.output.dir))
    report = check_image_lists(splits, workers=max(1, worker_count(config.data.num_workers)))
    print(format_check_report(report))
    report_path = run_dir / "data_check.json"
    write_report(report, report_path)
    print(f"report written to {report_path}")
    return report


def run_demo(config) -> dict:
    from evaluation import markdown_table, write_report

    run_train(config, resume=False, overwrite=True)
    untrained = run_eval(config, "none", None, visualize=DEMO_PICTURE_QUERIES)
    trained = run_eval(config, None, None, visualize=DEMO_PICTURE_QUERIES)
    table = markdown_table({"untrained (random init)": untrained, "trained (best.pt)": trained})
    summary = {"untrained": untrained, "trained": trained,
               "recall@1_gain_points": round(100 * (trained["recall@1"] - untrained["recall@1"]), 2)}
    write_report(summary, Path(config.output.dir) / "demo_report.json")
    print("\nDemo, test split (classes never seen in training):\n")
    print(table)
    print(f"\nRecall@1 gain from training: {summary['recall@1_gain_points']:+.2f} points")
    return summary


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from config import ConfigError, load_config

    try:
        config_path = arguments.config or (DEMO_CONFIG if arguments.mode == "demo" else None)
        config = load_config(config_path, arguments.overrides)
        if arguments.mode == "train":
            run_train(config, arguments.resume, arguments.overwrite)
        elif arguments.mode == "demo":
            run_demo(config)
        elif arguments.mode == "cache":
            run_cache(config)
        elif arguments.mode == "check":
            return 0 if run_check(config)["ok"] else 1
        elif arguments.embeddings or arguments.labels:
            if not (arguments.embeddings and arguments.labels):
                raise UsageError("--embeddings and --labels go together")
            run_eval_embeddings(config, arguments.embeddings, arguments.labels, arguments.output, arguments.visualize)
        else:
            run_eval(config, arguments.checkpoint, arguments.output, arguments.visualize)
    except (ConfigError, UsageError) as error:
        if arguments.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as error:  # known data/model errors carry one-line messages
        from dataloaders import BadImageError, DataFormatError
        from dataloaders.cache import CacheError
        from evaluation import NothingToEvaluateError
        from model import BackboneLoadError
        from trainer import NonFiniteLossError, NoTrainingImagesError, TrainingInterrupted

        if isinstance(error, TrainingInterrupted):
            print(f"interrupted: {error}", file=sys.stderr)
            return EXIT_INTERRUPTED
        known = (DataFormatError, DataCheckFailed, BadImageError, BackboneLoadError, NonFiniteLossError, CacheError,
                 NoTrainingImagesError, NothingToEvaluateError)
        if arguments.debug or not isinstance(error, known):
            raise
        if isinstance(error, BadImageError):  # raised in a loader worker: its message is the worker's traceback
            print(f"error: unreadable image {error.one_line()}; run --mode check to list every bad image, "
                  f"or set data.on_bad_image=skip to leave such images out", file=sys.stderr)
        else:
            print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
