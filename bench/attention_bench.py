"""Swinv2 window attention: transformers' eager module vs `swinv2_attention`'s SDPA and flex_attention paths.

Random weights, random pixels, one process, one device; all variants share their initial weights.

    python bench/attention_bench.py --out attention_bench.json     # Swinv2-B/256 shape, CUDA + bf16 if present
    python bench/attention_bench.py --scope module --variants sdpa,flex,flex-gathered   # the kernels alone
    python bench/attention_bench.py --tiny                         # seconds on a CPU: a smoke test

Variants: eager (transformers'), sdpa, flex (the bias read from the offsets table inside the kernel),
flex-gathered (the bias gathered to (heads, T, T) first). flex runs its kernel compiled on its own (the
model is not compiled): the first calls compile it, before the timing.
Scopes: `model`: a training step (forward + backward of mean(pooled ** 2), no optimiser) and an embedding
forward (eval, no_grad) of the whole backbone at --batch-size; `module`: one attention module of a shifted
stage-1 block (masked) and of a stage-3 block (unmasked), forward + backward (input and parameter gradients)
and forward alone, on the windows of --module-batch images. The median of --repeats calls, the variants taking
turns. On CUDA under bf16 autocast, on the CPU in float32 (where torch has no flex backward: those rows fall
back to SDPA, with a warning). "peak GiB": CUDA memory at its highest in a call. "max |Δ|": the largest
difference from the first variant's output on the same input (eval for the model).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
from transformers import Swinv2Model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_bench import swinv2_base_config, synchronize  # noqa: E402
from model import tiny_backbone_config  # noqa: E402
from swinv2_attention import cache_shift_masks, use_flex_attention, use_sdpa_attention  # noqa: E402

VARIANTS = {"eager": lambda model: model, "sdpa": use_sdpa_attention, "flex": use_flex_attention,
            "flex-gathered": partial(use_flex_attention, bias_layout="gathered")}


def median_seconds(calls: dict[str, Callable[[], None]], warmup: int, repeats: int,
                   device: torch.device) -> dict[str, tuple[float, float | None]]:
    """{name: (median seconds per call, peak GiB or None)}, timed round-robin so that load from other
    processes (a shared CPU) falls on every variant alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    peaks = dict.fromkeys(calls, 0.0)
    for _ in range(repeats):
        for name, call in calls.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            synchronize(device)
            started = time.perf_counter()
            call()
            synchronize(device)  # note: a CPU-GPU sync point; without it we would time kernel launches
            times[name].append(time.perf_counter() - started)
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated() / 2**30)
    return {name: (statistics.median(times[name]), round(peaks[name], 2) if device.type == "cuda" else None)
            for name in calls}


def model_rows(models: dict, pixels: torch.Tensor, autocast, warmup: int, repeats: int, device: torch.device) -> list:
    """Whole-backbone training step and embedding forward, per variant."""
    reference = None
    differences = {}
    with torch.no_grad(), autocast:
        for name, model in models.items():
            pooled = model.eval()(pixel_values=pixels).pooler_output.float()
            reference = pooled if reference is None else reference
            differences[name] = (pooled - reference).abs().max().item()

    def train_step(model):
        model.zero_grad(set_to_none=True)
        with autocast:
            pooled = model(pixel_values=pixels).pooler_output
        pooled.float().square().mean().backward()

    def embed(model):
        with torch.no_grad(), autocast:
            model(pixel_values=pixels)

    rows = []
    for task, step, training in (("model: train step (fwd+bwd)", train_step, True),
                                 ("model: embed (fwd, no_grad)", embed, False)):
        for model in models.values():
            model.train(training)
        calls = {name: partial(step, model) for name, model in models.items()}
        timings = median_seconds(calls, warmup, repeats, device)
        rows += timing_rows(task, timings, len(pixels), differences)
    return rows


def module_rows(models: dict, images: int, stages: list[int], autocast, warmup: int, repeats: int,
                device: torch.device) -> list:
    """One attention module per variant and stage: stage 1's shifted block (with its mask), stage 3's first block."""
    rows = []
    first = next(iter(models.values()))
    blocks = {1: (0, 1, "stage 1, shifted"), 3: (2, 0, "stage 3")}
    for stage, block_index, label in (blocks[s] for s in stages if blocks[s][0] < len(first.encoder.layers)):
        block = first.encoder.layers[stage].blocks[block_index]
        mask = block.get_attn_mask(*block.shift_mask_key[:2], torch.float32) if block.shift_size > 0 else None
        windows = mask.shape[0] if mask is not None else (block.input_resolution[0] // block.window_size) ** 2
        tokens, channels = block.window_size ** 2, block.attention.self.all_head_size
        hidden = torch.randn(images * windows, tokens, channels, device=device, requires_grad=True)
        modules = {name: model.encoder.layers[stage].blocks[block_index].attention.self
                   for name, model in models.items()}
        with torch.no_grad(), autocast:
            outputs = {name: module(hidden, mask)[0].float() for name, module in modules.items()}
        reference = next(iter(outputs.values()))
        differences = {name: (output - reference).abs().max().item() for name, output in outputs.items()}

        def forward_backward(module):
            module.zero_grad(set_to_none=True)
            hidden.grad = None
            with autocast:
                context = module(hidden, mask)[0]
            context.float().square().mean().backward()

        def forward(module):
            with torch.no_grad(), autocast:
                module(hidden, mask)

        task_size = f"{label}: {images * windows} windows of {tokens} tokens"
        for task, step in ((f"module {task_size}, fwd+bwd", forward_backward), (f"module {task_size}, fwd", forward)):
            timings = median_seconds({name: partial(step, module) for name, module in modules.items()}, warmup,
                                     repeats, device)
            rows += timing_rows(task, timings, images, differences)
    return rows


def timing_rows(task: str, timings: dict, images: int, differences: dict) -> list:
    first = next(iter(timings))
    rows = []
    for variant, (seconds, peak) in timings.items():
        rows.append({"task": task, "variant": variant, "ms": round(1000 * seconds, 2),
                     "images_per_second": round(images / seconds, 1), "peak_gib": peak,
                     "speedup": round(timings[first][0] / seconds, 2), "max_abs_difference": differences[variant]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=None, help="model scope; default: 32 on CUDA, 2 on the CPU")
    parser.add_argument("--module-batch", type=int, default=None,
                        help="module scope: images whose windows are attended; default: 128 on CUDA, 2 on the CPU")
    parser.add_argument("--variants", default="eager,sdpa,flex",
                        help=f"comma-separated, of {', '.join(VARIANTS)}; the first is the speed-up's base")
    parser.add_argument("--scope", default="model,module", help="model, module or both")
    parser.add_argument("--module-stages", default="1,3", help="module scope: stage 1 (shifted), stage 3, or both")
    parser.add_argument("--warmup", type=int, default=None, help="default: 3 on CUDA, 1 on the CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 10 on CUDA, 5 on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny test backbone at 64 px, batch 4")
    parser.add_argument("--out", type=Path)
    arguments = parser.parse_args()
    device = torch.device(arguments.device)
    on_cuda = device.type == "cuda"
    variants = arguments.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; the variants are {', '.join(VARIANTS)}")
    batch_size = arguments.batch_size or (4 if arguments.tiny else 32 if on_cuda else 2)
    module_batch = arguments.module_batch or (4 if arguments.tiny else 128 if on_cuda else 2)
    warmup = arguments.warmup if arguments.warmup is not None else (3 if on_cuda else 1)
    repeats = arguments.repeats or (10 if on_cuda else 5)
    if arguments.tiny:
        shape, config = "tiny 64 px", tiny_backbone_config(64)
    else:
        shape, config = "Swinv2-B/256 (window 16)", swinv2_base_config()
    precision = "bf16 autocast" if on_cuda else "fp32"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()

    torch.manual_seed(0)
    base = Swinv2Model(config).to(device)
    cache_shift_masks(base)
    models = {}
    for name in variants:
        models[name] = copy.deepcopy(base)
        VARIANTS[name](models[name])
    del base
    device_name = torch.cuda.get_device_name(device) if on_cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}; torch {torch.__version__}; {shape}; {precision}", flush=True)

    rows = []
    if "model" in arguments.scope:
        pixels = torch.randn(batch_size, 3, config.image_size, config.image_size, device=device)
        rows += model_rows(models, pixels, autocast, warmup, repeats, device)
    if "module" in arguments.scope:
        stages = [int(s) for s in arguments.module_stages.split(",")]
        rows += module_rows(models, module_batch, stages, autocast, warmup, repeats, device)

    print(f"\n### Swinv2 attention, {shape}, {precision}, {device_name}; torch {torch.__version__}; model batch "
          f"{batch_size}, module batch {module_batch} images\n")
    print(f"| task | attention | ms / call | images/s | peak GiB | speed-up over {variants[0]} | max abs Δ |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['task']} | {row['variant']} | {row['ms']} | {row['images_per_second']} | "
              f"{row['peak_gib'] if row['peak_gib'] is not None else '-'} | {row['speedup']}x | "
              f"{row['max_abs_difference']:.2e} |")
    if arguments.out:
        summary = {"shape": shape, "batch_size": batch_size, "module_batch": module_batch, "precision": precision,
                   "device": device_name, "torch": torch.__version__, "warmup": warmup, "repeats": repeats,
                   "rows": rows}
        arguments.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
