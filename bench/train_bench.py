"""Training-step and embedding throughput for the Swinv2-B/256 shape, our way vs the reference's way.

Random weights and synthetic tensors (no data loading: bench/data_bench.py measures that), so the numbers
are the model step alone. Everything runs in one process on one device, so the ratios hold.

    python bench/train_bench.py --out train_bench.json            # real shape, on CUDA if present
    python bench/train_bench.py --tiny                            # seconds on a CPU: a smoke test

Rows:
- reference: fp32, three separate forward passes of 16 anchors / 16 positives / 16 negatives,
  TripletMarginLoss(margin=1) on the unnormalised pooled output, AdamW(amsgrad=True): the original code.
- ours: `trainer.Trainer.train_step` itself (one forward over the P x K batch, batch-hard triplet loss on
  L2-normalised embeddings, fused AdamW on CUDA), with the switches named in the row.
- captured: `captured_step.CapturedTrainStep` on the same compiled model as the `+ torch.compile` row of its
  attention: `whole` (one CUDA graph for forward, loss, backward and AdamW; the loss is the static-shape
  `batch_hard_triplet_loss`), `split` (forward and backward graphs, the PML objective eagerly between them), and
  the same step uncaptured. Each call reads the loss back once, as the trainer's finiteness check does.
- batch sweep (--sweep 96,128,256): our step at each batch size, images/s and peak memory.
Rows that name one attention and torch.compile share one compiled model (a Swinv2-B compile takes about two
minutes), so keep them together in --only; the embedding rows with torch.compile use it too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from functools import partial
from pathlib import Path

import torch
from transformers import Swinv2Config, Swinv2Model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captured_step import CapturedTrainStep, batch_hard_triplet_loss  # noqa: E402
from evaluation import autocast_context  # noqa: E402
from graphed_inference import PaddedBatches, inference_forward  # noqa: E402
from model import Embedder, apply_speed_options, tiny_backbone_config  # noqa: E402
from objective import MetricLearningObjective  # noqa: E402
from optimization import build_optimizer, warmup_cosine_schedule  # noqa: E402
from trainer import Trainer  # noqa: E402


def swinv2_base_config() -> Swinv2Config:
    """microsoft/swinv2-base-patch4-window16-256's architecture (1024-d pooled output, ~22 GMACs/image)."""
    return Swinv2Config(image_size=256, patch_size=4, embed_dim=128, depths=[2, 2, 18, 2],
                        num_heads=[4, 8, 16, 32], window_size=16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None


def timed_steps(step, warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds of the first call, mean seconds per call after `warmup` calls)."""
    synchronize(device)
    started = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - started
    for _ in range(max(0, warmup - 1)):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return first, (time.perf_counter() - started) / steps


def reference_step_runner(config: Swinv2Config, device: torch.device, triplets: int):
    """The original pipeline's step: fp32, 3 forward passes, margin-1 triplet loss, AdamW(amsgrad)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = Swinv2Model(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, amsgrad=True)
    loss_function = torch.nn.TripletMarginLoss(margin=1.0)
    size = config.image_size
    anchors, positives, negatives = (torch.randn(triplets, 3, size, size, device=device) for _ in range(3))

    def step():
        optimizer.zero_grad()
        loss = loss_function(model(pixel_values=anchors).pooler_output, model(pixel_values=positives).pooler_output,
                             model(pixel_values=negatives).pooler_output)
        loss.backward()
        optimizer.step()

    return step, 3 * triplets


# The one model kept between rows: {(attention, compiled): Embedder}.
_shared_model: dict = {}


def shared_model(config: Swinv2Config, device: torch.device, attention: str, compile_backbone: bool,
                 compile_backend: str = "inductor") -> Embedder:
    """The model for (attention, compiled), built (and compiled) once while rows ask for it; another pair frees it."""
    key = (attention, compile_backbone)
    if key not in _shared_model:
        _shared_model.clear()
        reset_peak(device)
        torch.manual_seed(0)
        _shared_model[key] = apply_speed_options(Embedder(Swinv2Model(config), 512).to(device), attention,
                                                 compile_backbone=compile_backbone, compile_backend=compile_backend)
    return _shared_model[key]


def pk_batch(config: Swinv2Config, device: torch.device, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and P x K labels (K = 4) on the device."""
    images_per_class = 4
    labels = torch.arange(batch // images_per_class).repeat_interleave(images_per_class)
    images = torch.randint(0, 256, (len(labels), 3, config.image_size, config.image_size), dtype=torch.uint8)
    return images.to(device), labels.to(device)


def our_step_runner(config: Swinv2Config, device: torch.device, batch: int, precision: str, attention: str,
                    grad_checkpointing: bool, compile_backbone: bool, tf32: bool, compile_backend: str = "inductor",
                    shared: bool = False, capture_step: bool = False):
    """shared: train the shared model of (attention, compile_backbone) instead of a fresh one.
    capture_step: the trainer's forward and backward from CUDA graphs (`train.capture_step`)."""
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if shared:
        model = shared_model(config, device, attention, compile_backbone, compile_backend).train()
    else:
        model = Embedder(Swinv2Model(config), 512).to(device)
        apply_speed_options(model, attention, grad_checkpointing, compile_backbone, compile_backend)
    optimizer = build_optimizer(model, 2e-5, 10.0, 0.05, device)
    scheduler = warmup_cosine_schedule(optimizer, 10_000, 100)
    objective = MetricLearningObjective("triplet", "batchhard", config_values={"train.margin": 0.1})
    trainer = Trainer(model, objective, optimizer, scheduler, None, None, device, precision, 1.0, 1, 0,
                      Path("."), None, 0, {}, capture_step=capture_step)
    images, labels = pk_batch(config, device, batch)
    return (lambda: trainer.train_step(images, labels)), len(labels)


def captured_step_runner(config: Swinv2Config, device: torch.device, batch: int, precision: str, attention: str,
                         strategy: str, loss: str, capture: bool | None = None, compile_backend: str = "inductor"):
    """CapturedTrainStep on the shared compiled model. loss: `static` (batch_hard_triplet_loss, margin 0.1) or
    `pml` (the objective of the `ours` rows). capture: None = on CUDA; False = the same step without graphs."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = shared_model(config, device, attention, True, compile_backend).train()
    optimizer = build_optimizer(model, 2e-5, 10.0, 0.05, device)
    scheduler = warmup_cosine_schedule(optimizer, 10_000, 100)
    if loss == "static":
        loss_fn = partial(batch_hard_triplet_loss, margin=0.1)
    else:
        objective = MetricLearningObjective("triplet", "batchhard", config_values={"train.margin": 0.1})
        loss_fn = objective.__call__  # (embeddings, labels) -> (loss, signals)
    autocast = partial(autocast_context, device, precision, cache_enabled=False)
    # One warm-up step (the model is compiled already, or compiles in it), then the capture: the bench's
    # warm-up calls (at least 3 for these rows) hold both.
    step = CapturedTrainStep(model, loss_fn, optimizer, autocast, grad_clip=1.0, strategy=strategy, capture=capture,
                             warmup_steps=1)
    images, labels = pk_batch(config, device, batch)

    def run():
        result = step(images, labels)
        if not math.isfinite(result.loss.item()):  # note: a CPU-GPU sync point, the trainer's one per step
            raise FloatingPointError(f"the loss is {result.loss.item()}")
        scheduler.step()

    run.graphs = lambda: step.capture  # False after a capture that failed (it warns)
    return run, len(labels)


def embed_runner(config: Swinv2Config, device: torch.device, batch: int, attention: str, compile_backbone: bool,
                 channels_last: bool = False, compile_backend: str = "inductor"):
    """channels_last: the batch laid out as the loader's collate hands it over (B, H, W, 3 in memory).
    Compiled: the shared model of (attention, compiled)."""
    if compile_backbone:
        model = shared_model(config, device, attention, True, compile_backend).eval()
    else:
        model = apply_speed_options(Embedder(Swinv2Model(config), 512).to(device).eval(), attention)
    images = torch.randint(0, 256, (batch, 3, config.image_size, config.image_size), dtype=torch.uint8, device=device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        with torch.inference_mode(), autocast:
            model(images)

    return step, batch


def graphed_embed_runner(config: Swinv2Config, device: torch.device, batch: int, compile_backbone: bool = False,
                         compile_backend: str = "inductor"):
    """SDPA embedding through `inference_forward` with eval.cuda_graph on (on CUDA: one captured graph), of the
    shared compiled model when compile_backbone.

    Checks the graph against the plain forward first, for a full batch and a padded short one, and prints
    the largest difference.
    """
    if compile_backbone:
        model = shared_model(config, device, "sdpa", True, compile_backend).eval()
    else:
        model = apply_speed_options(Embedder(Swinv2Model(config), 512).to(device).eval(), "sdpa")
    images = torch.randint(0, 256, (batch, 3, config.image_size, config.image_size), dtype=torch.uint8,
                           device=device).contiguous(memory_format=torch.channels_last)

    def autocast():  # as extract_embeddings makes it
        return autocast_context(device, "bf16", cache_enabled=False)

    with torch.inference_mode():
        with autocast():
            plain = model(images)
        embed = inference_forward(model, images, batch, device, autocast, cuda_graph=True)
        short = max(1, batch // 3)
        difference = max((embed(images) - plain).abs().max().item(), (embed(images[:short]) - plain[:short]).abs().max().item())
    print(json.dumps({"check": "CUDA graph vs plain forward", "graph": isinstance(embed, PaddedBatches),
                      "max_abs_difference": difference}), flush=True)

    def step():
        with torch.inference_mode():
            embed(images)

    return step, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model, CPU-sized batches: a smoke test")
    parser.add_argument("--batch", type=int, default=128, help="our P x K batch (default 32 x 4)")
    parser.add_argument("--embed-batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--only", default="",
                        help="comma-separated parts of row names: the rows naming any of them run (default: all)")
    parser.add_argument("--reference-again", action="store_true",
                        help="time the reference row once more after the others; ratios use the mean of both")
    parser.add_argument("--sweep", default="", help="comma-separated batch sizes: a row of our step for each")
    parser.add_argument("--sweep-attention", default="sdpa", choices=["sdpa", "flex", "eager"])
    parser.add_argument("--sweep-compile", action="store_true",
                        help="sweep the shared compiled model (after the first size, one more compile with a dynamic "
                             "batch) instead of uncompiled fresh ones")
    parser.add_argument("--embed-sweep", default="",
                        help="comma-separated batch sizes: a row of the SDPA CUDA-graph embedding for each")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    arguments = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not arguments.tiny else "cpu")
    config = tiny_backbone_config(64) if arguments.tiny else swinv2_base_config()
    batch = 16 if arguments.tiny else arguments.batch
    embed_batch = 16 if arguments.tiny else arguments.embed_batch
    steps, warmup = (2, 1) if arguments.tiny else (arguments.steps, arguments.warmup)
    precision = "bf16"
    # inductor's code generation takes minutes on a CPU: --tiny checks the compile path with dynamo alone
    backend = "eager" if arguments.tiny else "inductor"
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {device_name}; torch {torch.__version__}; model: {'tiny' if arguments.tiny else 'Swinv2-B/256'}",
          flush=True)

    sweep_rows = [(f"batch sweep: {arguments.sweep_attention}{' + torch.compile' if arguments.sweep_compile else ''}, "
                   f"batch {size}", "train",
                   partial(our_step_runner, config, device, size, precision, arguments.sweep_attention, False,
                           arguments.sweep_compile, True, backend, shared=arguments.sweep_compile))
                  for size in (int(b) for b in arguments.sweep.split(",") if b)]
    rows = [
        ("reference (fp32, 3 x 16 passes, amsgrad)", "train", lambda: reference_step_runner(config, device, 4 if arguments.tiny else 16)),
        ("ours: bf16, one pass, fused AdamW, eager attention", "train",
         lambda: our_step_runner(config, device, batch, precision, "eager", False, False, True)),
        ("ours: + SDPA attention", "train",
         lambda: our_step_runner(config, device, batch, precision, "sdpa", False, False, True)),
        ("ours: + SDPA + grad checkpointing", "train",
         lambda: our_step_runner(config, device, batch, precision, "sdpa", True, False, True)),
        ("ours: + flex attention (kernel compiled alone)", "train",
         lambda: our_step_runner(config, device, batch, precision, "flex", False, False, True)),
        *(sweep_rows if not (arguments.sweep_compile and arguments.sweep_attention in ("sdpa", "flex")) else []),
        ("embed bf16: eager attention", "embed", lambda: embed_runner(config, device, embed_batch, "eager", False)),
        ("embed bf16: SDPA attention", "embed", lambda: embed_runner(config, device, embed_batch, "sdpa", False)),
        ("embed bf16: SDPA attention, channels-last batch as the loader gives", "embed",
         lambda: embed_runner(config, device, embed_batch, "sdpa", False, channels_last=True)),
        ("embed bf16: SDPA + CUDA graph (eval.cuda_graph), channels-last batch", "embed",
         lambda: graphed_embed_runner(config, device, embed_batch)),
        *[(f"embed sweep: SDPA + CUDA graph, channels-last, batch {size}", "embed",
           partial(graphed_embed_runner, config, device, size))
          for size in (int(b) for b in arguments.embed_sweep.split(",") if b)],
        # From here on, rows share one compiled model per attention (shared_model), in this order.
        ("ours: + SDPA + torch.compile", "train",
         lambda: our_step_runner(config, device, batch, precision, "sdpa", False, True, True, backend, shared=True)),
        ("uncaptured step (static batch-hard loss): SDPA + torch.compile", "train",
         lambda: captured_step_runner(config, device, batch, precision, "sdpa", "whole", "static", False, backend)),
        ("captured whole step (one CUDA graph; static batch-hard loss): SDPA + torch.compile", "train",
         lambda: captured_step_runner(config, device, batch, precision, "sdpa", "whole", "static", None, backend)),
        ("captured split step (forward and backward graphs; PML objective): SDPA + torch.compile", "train",
         lambda: captured_step_runner(config, device, batch, precision, "sdpa", "split", "pml", None, backend)),
        ("captured trainer step (train.capture_step: forward and backward graphs; PML objective): "
         "SDPA + torch.compile", "train",
         lambda: our_step_runner(config, device, batch, precision, "sdpa", False, True, True, backend, shared=True,
                                 capture_step=True)),
        *(sweep_rows if arguments.sweep_compile and arguments.sweep_attention == "sdpa" else []),
        ("embed bf16: SDPA + torch.compile", "embed",
         lambda: embed_runner(config, device, embed_batch, "sdpa", True, compile_backend=backend)),
        ("embed bf16: SDPA + torch.compile + CUDA graph, channels-last batch", "embed",
         lambda: graphed_embed_runner(config, device, embed_batch, True, backend)),
        ("ours: + flex + torch.compile", "train",
         lambda: our_step_runner(config, device, batch, precision, "flex", False, True, True, backend, shared=True)),
        ("uncaptured step (static batch-hard loss): flex + torch.compile", "train",
         lambda: captured_step_runner(config, device, batch, precision, "flex", "whole", "static", False, backend)),
        ("captured whole step (one CUDA graph; static batch-hard loss): flex + torch.compile", "train",
         lambda: captured_step_runner(config, device, batch, precision, "flex", "whole", "static", None, backend)),
        ("embed bf16: flex + torch.compile", "embed",
         lambda: embed_runner(config, device, embed_batch, "flex", True, compile_backend=backend)),
        *(sweep_rows if arguments.sweep_compile and arguments.sweep_attention == "flex" else []),
    ]
    if arguments.skip_compile:
        rows = [row for row in rows if "compile" not in row[0]]
    if arguments.only:
        wanted = {name.strip() for name in arguments.only.split(",")}
        rows = [row for row in rows if any(w in row[0] for w in wanted)]
    if arguments.reference_again and rows and rows[0][0].startswith("reference"):
        # One H200 gave the reference 134 images/s in one process and 103 in the next: time it at both ends.
        rows.append(("reference, again after the other rows", *rows[0][1:]))

    results = []
    for name, kind, build in rows:
        reset_peak(device)
        try:
            step, images_per_step = build()
            # A captured step warms up for one call and captures in the next: those stay out of the timing.
            first, per_step = timed_steps(step, max(warmup, 3) if name.startswith("captured") else warmup, steps,
                                          device)
            result = {"row": name, "kind": kind, "images_per_step": images_per_step,
                      "images_per_second": round(images_per_step / per_step, 1), "first_call_seconds": round(first, 2),
                      "peak_gib": peak_gib(device)}
            if hasattr(step, "graphs"):
                result["graphs"] = step.graphs()
        except Exception as error:  # keep measuring the other rows; an OOM is a result too
            traceback.print_exc()
            result = {"row": name, "kind": kind, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        finally:
            step = None
            for model in _shared_model.values():
                model.zero_grad(set_to_none=True)  # a captured step's gradients live in its graph's memory
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(result)
        print(json.dumps(result), flush=True)
        if arguments.out:
            arguments.out.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": results}, indent=2))

    reference_rates = [r["images_per_second"] for r in results if r["row"].startswith("reference") and "error" not in r]
    reference = sum(reference_rates) / len(reference_rates) if reference_rates else None
    if len(reference_rates) > 1:
        print(f"\nx reference = images/s / {reference:.1f}, the mean of the {len(reference_rates)} reference rows")
    print(f"\n### Training step and embedding throughput ({device_name}, {'tiny model' if arguments.tiny else 'Swinv2-B/256'}, synthetic tensors)\n")
    print("| row | images/step | images/s | x reference | first call (s) | peak GiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['row']} | | {r['error']} | | | |")
            continue
        ratio = f"{r['images_per_second'] / reference:.2f}" if reference and r["kind"] == "train" else ""
        print(f"| {r['row']} | {r['images_per_step']} | {r['images_per_second']} | {ratio} | "
              f"{r['first_call_seconds']} | {r['peak_gib'] if r['peak_gib'] is not None else 'n/a'} |")


if __name__ == "__main__":
    main()
