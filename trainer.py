"""Training: the step, the epoch loop, per-epoch validation, atomic checkpoints, resume, early stopping."""

from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from captured_step import GraphedForward
from checkpoint import model_only as model_only_state
from checkpoint import CheckpointError, save_checkpoint_atomically, weights_digest
from distributed import (SINGLE_PROCESS, Processes, any_rank, average_gradients, barrier, gather_rows,
                         mean_over_ranks, wrap_for_training)
from evaluation import autocast_context
from health import EpochSignals, collapse_warning, embedding_spread


VALIDATION_METRIC = "recall@1"


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived: last.pt holds the state at the step boundary where training stopped."""


class NoTrainingImagesError(RuntimeError):
    """A whole epoch's images were unreadable and skipped: nothing would ever be learned."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing from that step was applied or saved."""


class Trainer:
    """Owns the loop; everything it needs arrives built (model, objective, optimiser, loaders).

    Args:
        validate: model -> metrics dict with `recall@1`, run after every epoch on the held-out
            validation classes; None when there is no validation split (then last.pt is also best.pt).
        checkpoint_extra: what eval needs to rebuild the model without the hub (config, backbone config...).
        skip_log: a `dataloaders.SkippedImageLog` that records training images the loader skipped as
            unreadable (`data.on_bad_image=skip`); None when the loader never skips.
        on_epoch_end: called with each epoch's record once its checkpoints are saved; returning True stops
            training there (`--mode tune` prunes unpromising trials with it). None = never.
        processes: this process's rank among several (torchrun): the model is then trained through
            DistributedDataParallel, and only rank 0 writes checkpoints. cross_rank_mining: the miner and the
            loss see the global batch, gathered from every rank (docs/distributed.md).
        capture_step: on CUDA, the forward and its backward replay CUDA graphs captured at the first step (so
            after a resume); the rest of the step is the same code (`train.capture_step`, one process).
    """

    def __init__(self, model: nn.Module, objective, optimizer, scheduler, train_loader,
                 validate: Callable[[nn.Module], dict] | None, device: torch.device, precision: str,
                 grad_clip: float, epochs: int, patience: int, run_dir: Path, tracker, seed: int,
                 checkpoint_extra: dict, skip_log=None, on_epoch_end: Callable[[dict], bool] | None = None,
                 processes: Processes = SINGLE_PROCESS, cross_rank_mining: bool = True, capture_step: bool = False):
        self.model, self.objective = model, objective
        self.processes, self.cross_rank_mining = processes, cross_rank_mining and processes.distributed
        # What the step calls: the model itself in one process, its DDP wrapper in several.
        self.training_model = wrap_for_training(model, processes, device, self.cross_rank_mining)
        # images -> embeddings under autocast: the model as it is, or (capture_step) replayed from CUDA graphs,
        # whose capture needs autocast without its weight-cast cache.
        self.forward = GraphedForward(self.training_model,
                                      lambda: autocast_context(device, precision, cache_enabled=not capture_step),
                                      capture=capture_step and device.type == "cuda")
        self.optimizer, self.scheduler = optimizer, scheduler
        self.train_loader, self.validate = train_loader, validate
        self.device, self.precision, self.grad_clip = device, precision, grad_clip
        self.epochs, self.patience = epochs, patience
        self.run_dir, self.tracker, self.seed = Path(run_dir), tracker, seed
        self.checkpoint_extra = checkpoint_extra
        self.skip_log = skip_log
        self.on_epoch_end = on_epoch_end
        # GradScaler matters only for fp16; disabled it is a pass-through, so the step has one code path.
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.best_metric = -math.inf
        self.epochs_without_improvement = 0
        self.history: list[dict] = []
        self.batches_done_in_epoch = 0  # > 0 only in a checkpoint written mid-epoch (after a stop signal)
        self.stop_signal: str | None = None
        self.warned_collapse = False
        self.proxy_loss = next(iter(objective.parameters()), None) is not None  # it learns proxies of its own

    # ---- one optimisation step -------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor,
                   sources: torch.Tensor | None = None) -> tuple[float, dict[str, torch.Tensor]]:
        """One optimiser step. sources: each row's dataset index (to tell an image's repeats apart).

        Returns the loss and the step's signals as 0-d tensors on the device (health.EpochSignals sums them):
        tuples, loss_terms, active_terms (objective), spread, effective_rank, grad_norm (the model's, before
        clipping).
        """
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        embeddings = self.forward(images)  # (B, D) float32, unit norm
        if self.cross_rank_mining:  # the global batch, rank 0's rows first: as one process would see it
            row_ids = labels[:, None] if sources is None else torch.stack([labels, sources.to(self.device)], 1)
            embeddings, row_ids = gather_rows(embeddings, row_ids)
            labels, sources = row_ids[:, 0], (None if sources is None else row_ids[:, 1])
        # Checked before mining: a miner's argmax over NaN distances picks garbage indices, not a clear stop.
        finite = bool(torch.isfinite(embeddings).all())  # note: a CPU-GPU sync point
        if self.processes.distributed and not self.cross_rank_mining:  # every rank stops, or none
            finite = not any_rank(not finite, self.device)
        if not finite:
            raise NonFiniteLossError(self._diverged("the embeddings are NaN or infinite"))
        loss, signals = self.objective(embeddings, labels, sources)
        # Each rank's own loss is averaged for the log (and the stop); a cross-rank loss is the same everywhere.
        shown_loss = mean_over_ranks(loss) if self.processes.distributed and not self.cross_rank_mining else loss
        loss_value = shown_loss.item()  # note: a CPU-GPU sync point, needed for the finiteness check
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(self._diverged(f"the loss is {loss_value}"))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.processes.distributed and not self.cross_rank_mining:
            average_gradients(self.objective.parameters())  # proxies: DDP sees the model's parameters only
        self.scaler.unscale_(self.optimizer)
        # With grad_clip 0 this only measures the norm.
        gradient_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip or math.inf)
        # fp16's scaler skips steps with inf gradients by design; in bf16/fp32 they mean divergence.
        if not self.scaler.is_enabled() and not math.isfinite(gradient_norm.item()):
            raise NonFiniteLossError(self._diverged(f"the gradient norm is {gradient_norm.item()}"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.global_step += 1
        spread, effective_rank = embedding_spread(embeddings.detach())
        return loss_value, {**signals, "spread": spread, "effective_rank": effective_rank, "grad_norm": gradient_norm}

    def _diverged(self, what: str) -> str:
        return (f"{what} at step {self.global_step + 1} (epoch {self.epoch + 1}): training diverged; stopped without "
                f"applying the step, and the checkpoints keep their last finite state. Lower train.lr, or use "
                f"train.precision=fp32/bf16 instead of fp16.")

    # ---- epochs ------------------------------------------------------------------------------
    def train_epoch(self) -> dict:
        self.model.train()
        sampler = self.train_loader.batch_sampler
        sampler.set_epoch(self.epoch)
        start = self.batches_done_in_epoch
        sampler.set_start_batch(start)  # a run stopped mid-epoch continues with the batch after the last one
        # Seeds the workers' augmentation when they start (each epoch unless workers are persistent); each rank's
        # workers draw their own numbers (rank 0's are those of a single process).
        self.train_loader.generator.manual_seed(self.seed * 100_003 + self.epoch + 1_000_003 * self.processes.rank)
        progress = tqdm(self.train_loader, desc=f"epoch {self.epoch + 1}/{self.epochs}", unit="batch", initial=start,
                        total=len(sampler), dynamic_ncols=True, disable=not self.processes.is_main)
        total_loss, total_images, steps_run, started = 0.0, 0, 0, time.perf_counter()
        signals = EpochSignals()
        for step_in_epoch, (images, labels, sources, skipped) in enumerate(progress, start=start + 1):
            if skipped:
                self._note_skipped(skipped)
            # A batch whose every image was unreadable has nothing to learn from: no step, no log line.
            if self._every_rank_steps(images is not None):
                loss, step_signals = self.train_step(images, labels, sources)
                signals.add(step_signals)
                steps_run += 1
                total_loss += loss
                total_images += len(images)
                images_per_second = total_images / (time.perf_counter() - started)
                progress.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_second:.1f}")
                if self.global_step % 10 == 0 or step_in_epoch == len(sampler):
                    self.tracker.log({"train/loss": loss, "train/tuples": int(step_signals["tuples"]),
                                      "train/lr": self.scheduler.get_last_lr()[0],
                                      "train/images_per_second": images_per_second,
                                      "epoch": self.epoch + step_in_epoch / len(sampler)}, step=self.global_step)
            self.batches_done_in_epoch = step_in_epoch
            if self._stop_agreed():
                self.stop_at_step_boundary()
        if steps_run == 0 and len(sampler) > start:
            raise NoTrainingImagesError(f"epoch {self.epoch + 1}: no training image could be read (all skipped "
                                        f"by data.on_bad_image=skip, listed in {self.skip_log.path})")
        self.batches_done_in_epoch = 0
        seconds = time.perf_counter() - started
        repeats = {f"data/{name}": value for name, value in sampler.repeat_rates(self.epoch).items()}
        # A resumed epoch's signals cover its batches after the resume only.
        return {"train/epoch_loss": total_loss / max(1, steps_run), "train/epoch_seconds": seconds,
                "train/epoch_images_per_second": total_images / seconds if seconds > 0 else 0.0,
                **signals.summary(), **repeats}

    def _note_skipped(self, skipped: list) -> None:
        new = self.skip_log.record("train", self.train_loader.dataset.image_list, skipped, f"epoch {self.epoch + 1}")
        if new:
            tqdm.write(f"warning: skipped {new} unreadable training image(s) (data.on_bad_image=skip); "
                       f"{self.skip_log.count('train')} so far, listed in {self.skip_log.path}")

    def stop_at_step_boundary(self) -> None:
        """Save last.pt (mid-epoch position included) and raise TrainingInterrupted."""
        progress_note = f"epoch {self.epoch + 1}, batch {self.batches_done_in_epoch}, step {self.global_step}"
        self.save("last.pt", {})
        raise TrainingInterrupted(f"stopped by {self.stop_signal} after {progress_note}; "
                                  f"{self.run_dir / 'last.pt'} saved: continue with --resume")

    def _every_rank_steps(self, has_images: bool) -> bool:
        """Whether to take this step: this process has images to learn from and, with several processes, so
        has every other. The step's collectives (the gather for cross-rank mining, DDP's gradient all-reduce)
        need every rank, so a share whose every image was unreadable makes all ranks skip the step instead of
        leaving the others waiting for it. (In one process `any_rank` is the flag itself: no collective.)"""
        return not any_rank(not has_images, self.device)

    def _stop_agreed(self) -> bool:
        """Whether to stop at this step boundary: a stop signal reached this process, or (with several) any of
        them, so that every rank stops after the same step."""
        if any_rank(self.stop_signal is not None, self.device) and self.stop_signal is None:
            self.stop_signal = "a stop signal to another process"
        return self.stop_signal is not None

    def _request_stop(self, signum, frame) -> None:
        # Only a flag: the step in flight finishes, then the loop saves and stops at the boundary.
        self.stop_signal = signal.Signals(signum).name

    def fit(self) -> dict:
        """Train until `epochs` or early stopping. Returns the best validation metrics (or the last epoch's)."""
        handles_signals = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGTERM, signal.SIGINT)} \
            if handles_signals else {}
        try:
            return self._fit()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _fit(self) -> dict:
        while self.epoch < self.epochs:
            summary = self.train_epoch()
            validation = self.validate(self.model) if self.validate is not None else {}
            self.epoch += 1
            metric = validation.get(VALIDATION_METRIC, math.nan)
            improved = self.validate is None or (math.isfinite(metric) and metric > self.best_metric)
            if improved:
                self.best_metric = metric if self.validate is not None else self.best_metric
                self.epochs_without_improvement = 0
            else:
                self.epochs_without_improvement += 1
            record = {"epoch": self.epoch, **summary, **{f"val/{k}": v for k, v in validation.items()}}
            self.history.append(record)
            self.tracker.log(record, step=self.global_step)
            shown = f", val recall@1 {100 * metric:.2f}%" if validation else ""
            tqdm.write(f"epoch {self.epoch}: loss {summary['train/epoch_loss']:.4f}, "
                       f"{summary['train/epoch_images_per_second']:.1f} img/s, spread "
                       f"{summary.get('train/embedding_spread', math.nan):.3f}, "
                       f"active {100 * summary.get('train/active_fraction', math.nan):.1f}%{shown}"
                       + (" (best)" if improved and validation else ""))
            warning = collapse_warning(record, self.history[0], proxy_loss=self.proxy_loss)
            if warning and not self.warned_collapse:  # once per process: the advice does not change
                tqdm.write(warning)
                self.warned_collapse = True
            self.save("last.pt", validation)
            if improved:
                self.save("best.pt", validation, model_only=True)
            if self.on_epoch_end is not None and self.on_epoch_end(record):
                tqdm.write(f"stopped after epoch {self.epoch} by the caller (on_epoch_end)")
                break
            if self.patience and self.epochs_without_improvement >= self.patience:
                tqdm.write(f"early stopping: no better validation {VALIDATION_METRIC} for {self.patience} epochs")
                break
        return {"best_val_recall@1": self.best_metric, "epochs_completed": self.epoch}

    # ---- checkpoints ---------------------------------------------------------------------------
    def state(self, metrics: dict) -> dict:
        weights = self.model.state_dict()
        return {
            "model": weights,
            "weights_sha256": weights_digest(weights),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "objective": self.objective.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "epochs_without_improvement": self.epochs_without_improvement,
            "batches_done_in_epoch": self.batches_done_in_epoch,
            # Dropout, stochastic depth and (with num_workers=0) augmentation draw from these.
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "history": self.history,
            "metrics": metrics,
            **self.checkpoint_extra,
        }

    def save(self, name: str, metrics: dict, model_only: bool = False) -> None:
        """last.pt: the whole state, for --resume; best.pt (model_only): what evaluation needs.

        Weights that are no longer finite are never written: the previous checkpoint stays.
        """
        if not all(bool(torch.isfinite(parameter).all()) for parameter in self.model.parameters()):
            raise NonFiniteLossError(f"the weights are NaN or infinite after step {self.global_step}: not saving "
                                     f"{name}, which keeps its last finite state. Lower train.lr.")
        if self.processes.is_main:  # the ranks' weights are the same: one writes, the others wait for it
            state = self.state(metrics)
            save_checkpoint_atomically(model_only_state(state) if model_only else state, self.run_dir / name)
        barrier()

    def resume(self, checkpoint: dict, source: Path) -> None:
        """Restore model, optimiser, scheduler, scaler, RNGs, epoch (and position in it) and early-stopping state.

        With data.num_workers=0 the continued run is the uninterrupted one, step for step (tested). With
        loader workers, each worker's augmentation stream restarts when workers do, so the augmentations
        after a resume differ from those an uninterrupted run would have drawn (same distribution).
        """
        self.model.load_state_dict(checkpoint["model"])  # copies onto the model's device
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except ValueError as error:  # e.g. parameter groups of an earlier version of this program
            raise CheckpointError(f"{source}: its optimiser state does not fit this version's optimiser ({error}); "
                                  f"start a new run from its weights, or resume it with the version that wrote it") from None
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.objective.load_state_dict(checkpoint["objective"])
        self.epoch = checkpoint["epoch"]
        self.global_step = checkpoint["global_step"]
        self.best_metric = checkpoint["best_metric"]
        self.epochs_without_improvement = checkpoint["epochs_without_improvement"]
        self.batches_done_in_epoch = checkpoint["batches_done_in_epoch"]
        torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
        if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([state.cpu() for state in checkpoint["rng"]["cuda"]])
        self.history = list(checkpoint["history"])
        within = f" and {self.batches_done_in_epoch} batches of the next" if self.batches_done_in_epoch else ""
        tqdm.write(f"resumed from {source}: {self.epoch} epochs done{within}, step {self.global_step}")
