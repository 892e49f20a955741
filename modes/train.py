"""`--mode train`: data -> model -> objective -> Trainer, with per-epoch validation and atomic checkpoints."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from distributed import SINGLE_PROCESS, Processes
from errors import UsageError

# Written into the run folder by rank 0 when a stop signal ended training: with several processes torchrun
# exits 1 whatever its workers' exit code, so run.sh reads this to exit 3 (interrupted, resumable) itself.
INTERRUPTED_MARKER = "interrupted.txt"


def validation_function(val_list, val_loader, recall_ks, config, device, skip_log):
    """model -> validation metrics: the same embed -> kNN -> metrics as `--mode eval`, on the held-out classes.

    With several processes, each embeds its shard (`val_loader`), rank 0 searches and scores, every rank gets
    its metrics."""
    from distributed import broadcast_from_main, is_main_process
    from evaluation import evaluate_embeddings, extract_embeddings, gather_embedded, require_queries
    from modes.evaluate import embedding_cuda_graph

    def validate(trained_model) -> dict:
        embedded = gather_embedded(extract_embeddings(
            trained_model, val_loader, device, config.train.precision, "validate",
            embedding_cuda_graph(config.eval.cuda_graph, config.train.compile)))
        if is_main_process():
            skip_log.record("validation", val_list, embedded.skipped, "validation")
        require_queries(embedded, "validation", len(val_list), skip_log.path)
        metrics = evaluate_embeddings(embedded.embeddings, embedded.labels, recall_ks, config.eval.backend,
                                      str(device), config.eval.memory_gb) if is_main_process() else None
        return broadcast_from_main(metrics)

    return validate


def run_from_arguments(config, arguments) -> None:
    from distributed import launched_processes

    with launched_processes(config.train.device) as processes:  # one, or those torchrun started
        run_train(config, arguments.resume, arguments.overwrite, arguments.init_from, processes=processes)


def run_train(config, resume: bool, overwrite: bool, init_from: Path | None = None, on_epoch_end=None,
              processes: Processes = SINGLE_PROCESS) -> dict:
    """Train into output.dir, which this process (rank 0 of several) holds exclusively until it returns.

    init_from: a checkpoint whose model weights start this new run (--init-from).
    on_epoch_end: called with each epoch's record (`epoch`, `val/recall@1`, ...); True stops training there.
    processes: this process's rank among those torchrun started (docs/distributed.md).
    """
    from objective import resolve_objective_config
    from run_folder import run_folder_lock

    config = resolve_objective_config(config)  # train.loss_params / miner_params checked before any data is read
    if resume and overwrite:
        raise UsageError("--resume continues the run in output.dir and --overwrite starts it afresh: pass one of them")
    if resume and init_from is not None:
        raise UsageError("--resume continues the run in output.dir from its own last.pt; --init-from starts a new run "
                         "from another checkpoint's weights: pass one of them")
    if processes.distributed and config.train.capture_step:
        raise UsageError("train.capture_step runs in one process (DistributedDataParallel's gradient hooks are not "
                         "captured): set train.capture_step=false under torchrun")
    if processes.distributed and (on_epoch_end is not None or init_from is not None):
        raise UsageError("--init-from and --mode tune run in one process: start them without torchrun")
    # The other ranks write nothing into the folder: rank 0's hold covers them.
    with run_folder_lock(Path(config.output.dir), "train") if processes.is_main else nullcontext():
        return train_in_locked_folder(config, resume, overwrite, init_from, on_epoch_end, processes)


def starting_checkpoint(config, path: Path):
    """--init-from: (config with the checkpoint's model keys, the checkpoint, where its weights came from).

    Only the model weights carry over; the optimiser, schedule, epochs and the loss's own parameters (say,
    proxies of other classes) start afresh, so the new run may train on other classes.
    """
    from checkpoint import load_checkpoint, weights_digest
    from modes.evaluate import config_of_checkpoint

    checkpoint = load_checkpoint(path)
    source = {"path": str(Path(path).resolve()), "epoch": checkpoint["epoch"],
              "weights_sha256": checkpoint.get("weights_sha256") or weights_digest(checkpoint["model"])}
    return config_of_checkpoint(config, checkpoint, path, f"start from {path}"), checkpoint, source


def train_in_locked_folder(config, resume: bool, overwrite: bool, init_from: Path | None = None,
                           on_epoch_end=None, processes: Processes = SINGLE_PROCESS) -> dict:
    from checkpoint import (embedder_from_checkpoint, refuse_changed_training_list, refuse_mismatched_checkpoint,
                            remove_stale_temporaries, training_list_identity)
    from config import save_config
    from dataloaders import SkippedImageLog, stop_loader_workers
    from dataloaders.loaders import evaluation_loader, resolve_image_lists, training_loader
    from dataloaders.skipped_images import SKIPPED_IMAGES_FILE
    from distributed import barrier, broadcast_from_main, main_process_first, shard_of_batches
    from model import apply_speed_options, build_embedder
    from modes.data import check_before_training
    from objective import loss_learning_rate, objective_from_config
    from optimization import build_optimizer, warmup_cosine_schedule
    from run_folder import remove_previous_outputs
    from runtime import configure_matmul_precision, seed_everything, select_device
    from tracking import Tracker
    from trainer import Trainer, TrainingInterrupted

    run_dir = Path(config.output.dir)
    last = run_dir / "last.pt"
    if processes.is_main:
        remove_stale_temporaries(run_dir)  # left by a kill or a full disk; nobody else writes here now
    if last.exists() and not (resume or overwrite):
        raise UsageError(f"{run_dir} already holds a run (last.pt): add --resume to continue it, "
                         f"--overwrite to start afresh, or set output.dir to a new folder")
    if resume and not last.exists():
        raise UsageError(f"--resume: no {last} to resume from")
    # Checked before anything is written, so a refused resume leaves the run folder as it was.
    resumed_from = refuse_mismatched_checkpoint(last, config) if resume else None
    # Loaded before --overwrite clears the folder, which may hold it.
    config, starting_from, init_source = (starting_checkpoint(config, init_from) if init_from is not None
                                          else (config, None, None))
    if processes.is_main:
        if not resume:  # a fresh run: nothing of an earlier one may pass for this one's
            remove_previous_outputs(run_dir)
        (run_dir / INTERRUPTED_MARKER).unlink(missing_ok=True)

    with main_process_first():  # rank 0 generates the demo data, if any, before the others read it
        train_list, val_list, _ = resolve_image_lists(config.data, config.train.seed, need_train=True,
                                                      need_test=False)
    skip_log = SkippedImageLog(run_dir / SKIPPED_IMAGES_FILE)
    # Rank 0 checks the images; every rank then trains on the lists it kept.
    lists = (check_before_training(config.data, {"train": train_list, "validation": val_list}, run_dir, skip_log)
             if processes.is_main else None)
    lists = broadcast_from_main(lists)
    train_list, val_list = lists["train"], lists["validation"]
    if resumed_from is not None:
        refuse_changed_training_list(resumed_from, train_list, last)
    device = processes.device(select_device(config.train.device))
    configure_matmul_precision(device, config.train.tf32)
    # Loaders first: an impossible batch size is refused before a backbone is downloaded or built.
    # (Building a DataLoader starts no worker and draws from no global RNG.)
    train_loader = training_loader(train_list, config.data, config.train.seed, device, processes.rank,
                                   processes.world_size)
    val_shard = shard_of_batches(len(val_list), config.eval.batch_size, processes)
    val_loader = (evaluation_loader(val_list, config.data, config.eval.batch_size, device, val_shard)
                  if len(val_list) >= 2 else None)
    seed_everything(config.train.seed)
    if starting_from is not None:  # the checkpoint's architecture and weights (strict), no download
        model = embedder_from_checkpoint(starting_from).to(device)
        starting_from = None  # the run keeps only the model's copy of the weights
        print(f"starting from the weights of {init_source['path']} (epoch {init_source['epoch']}, "
              f"sha256 {init_source['weights_sha256'][:12]})")
    else:
        model = build_embedder(config.model.backbone, config.data.image_size, config.model.embedding_dim).to(device)
    apply_speed_options(model, config.model.attention, config.train.grad_checkpointing, config.train.compile)
    processes_note = (f" x {processes.world_size} processes (cross-rank mining "
                      f"{'on' if config.train.cross_rank_mining else 'off'})" if processes.distributed else "")
    print(f"train: {len(train_list)} images / {train_list.num_classes} classes; "
          f"validation: {len(val_list)} images / {val_list.num_classes} classes; "
          f"{len(train_loader)} batches per epoch; device {device}{processes_note}")

    validate = None
    if val_loader is not None:
        # Validation picks best.pt by Recall@1; a k beyond a small validation split's gallery is left out.
        val_recall_ks = [k for k in config.eval.recall_ks if k <= len(val_list) - 1] or [1]
        validate = validation_function(val_list, val_loader, val_recall_ks, config, device, skip_log)
    else:
        print("no validation classes (data.val_fraction=0): best.pt will be the last epoch")

    objective = objective_from_config(config.train, config.data.repeat_positives, train_list.labels,
                                      model.embedding_dim).to(device)
    optimizer = build_optimizer(model, config.train.lr, config.train.head_lr_multiplier, config.train.weight_decay,
                                device, objective.parameters(), loss_learning_rate(config.train))
    total_steps = config.train.epochs * len(train_loader)
    scheduler = warmup_cosine_schedule(optimizer, total_steps, round(config.train.warmup_fraction * total_steps))

    if processes.is_main:
        save_config(config, run_dir / "config.yaml")
    # Where the weights started: this run's --init-from, or (on resume) the one its last.pt recorded.
    init_source = init_source or (resumed_from or {}).get("init_from")
    # A resumed run continues its wandb run rather than starting another.
    tracker = Tracker(run_dir, config.wandb.mode, config.wandb.project, config.wandb.entity, config.wandb.run_name,
                      {**config.to_dict(), **({"init_from": init_source} if init_source else {})}, job_type="train",
                      enabled=processes.is_main, resume_id=(resumed_from or {}).get("wandb_run_id", ""))
    if init_source and resumed_from is None:
        tracker.log({"init_from": init_source["path"], "init_from_weights_sha256": init_source["weights_sha256"]},
                    step=0)
    checkpoint_extra = {
        "config": config.to_dict(),
        "backbone_config_json": model.backbone.config.to_json_string(),
        "embedding_dim": config.model.embedding_dim,
        "normalisation": {"mean": model.input_mean, "std": model.input_std},
        "train_list": training_list_identity(train_list),
        "wandb_run_id": tracker.run_id,
        **({"init_from": init_source} if init_source else {}),
    }
    trainer = Trainer(model, objective, optimizer, scheduler, train_loader, validate, device, config.train.precision,
                      config.train.grad_clip, config.train.epochs, config.train.patience, run_dir, tracker,
                      config.train.seed, checkpoint_extra, skip_log=skip_log, on_epoch_end=on_epoch_end,
                      processes=processes, cross_rank_mining=config.train.cross_rank_mining,
                      capture_step=config.train.capture_step)
    if resumed_from is not None:
        trainer.resume(resumed_from, last)
    try:
        summary = trainer.fit()
    except TrainingInterrupted as stop:
        if processes.is_main:
            (run_dir / INTERRUPTED_MARKER).write_text(f"{stop}\n")
        barrier()  # written before any process exits, so that run.sh on every node finds it
        raise
    finally:
        tracker.finish()
        stop_loader_workers(train_loader, val_loader)
    from visualize import plot_validation_curve

    if not processes.is_main:
        return summary
    curve = plot_validation_curve(trainer.history, run_dir / "validation_curve.png")
    if curve is not None:
        print(f"picture written to {curve}")
    if validate is not None:
        print(f"done: best validation recall@1 {100 * summary['best_val_recall@1']:.2f}%; checkpoints in {run_dir}")
    else:
        print(f"done: {summary['epochs_completed']} epochs, no validation split (best.pt is the last epoch); "
              f"checkpoints in {run_dir}")
    if skip_log.count():
        print(f"warning: {skip_log.count()} unreadable image(s) were skipped {skip_log.counts_by_reason()}, "
              f"listed in {skip_log.path}")
    return summary
