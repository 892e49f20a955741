"""Swinv2 window attention: transformers' eager module vs `swinv2_attention.use_sdpa_attention`.

Random weights, random pixels, one process, one device; the two models share their initial weights.

    python bench/attention_bench.py --out attention_bench.json     # Swinv2-B/256 shape, CUDA + bf16 if present
    python bench/attention_bench.py --tiny                         # seconds on a CPU: a smoke test

Rows: a training step (forward + backward of mean(pooled ** 2), no optimiser) and an embedding forward
(eval, no_grad), each for eager and SDPA: the median of --repeats calls, the variants taking turns. On
CUDA both run under bf16 autocast, on the CPU in float32. "peak GiB" is CUDA memory at its highest in a call.
"max |Δ pooled|" is the largest difference of the SDPA pooled output from eager's on the same batch (eval).
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
from swinv2_attention import use_sdpa_attention  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CUDA, 2 on the CPU")
    parser.add_argument("--warmup", type=int, default=None, help="default: 3 on CUDA, 1 on the CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 10 on CUDA, 5 on the CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny test backbone at 64 px, batch 4")
    parser.add_argument("--out", type=Path)
    arguments = parser.parse_args()
    device = torch.device(arguments.device)
    on_cuda = device.type == "cuda"
    batch_size = arguments.batch_size or (4 if arguments.tiny else 32 if on_cuda else 2)
    warmup = arguments.warmup if arguments.warmup is not None else (3 if on_cuda else 1)
    repeats = arguments.repeats or (10 if on_cuda else 5)
    if arguments.tiny:
        shape, config = "tiny 64 px", tiny_backbone_config(64)
    else:
        shape, config = "Swinv2-B/256 (window 16)", swinv2_base_config()
    precision = "bf16 autocast" if on_cuda else "fp32"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else nullcontext()

    torch.manual_seed(0)
    eager = Swinv2Model(config).to(device)
    sdpa = copy.deepcopy(eager)
    use_sdpa_attention(sdpa)
    pixels = torch.randn(batch_size, 3, config.image_size, config.image_size, device=device)

    with torch.no_grad(), autocast:
        eager.eval(), sdpa.eval()
        max_difference = (eager(pixel_values=pixels).pooler_output.float()
                          - sdpa(pixel_values=pixels).pooler_output.float()).abs().max().item()

    models = {"eager": eager, "sdpa": sdpa}

    def train_step(model):
        model.zero_grad(set_to_none=True)
        with autocast:
            pooled = model(pixel_values=pixels).pooler_output
        pooled.float().square().mean().backward()

    def embed(model):
        with torch.no_grad(), autocast:
            model(pixel_values=pixels)

    rows = []
    for task, step, training in (("train step (fwd+bwd)", train_step, True), ("embed (fwd, no_grad)", embed, False)):
        for model in models.values():
            model.train(training)
        calls = {name: partial(step, model) for name, model in models.items()}
        timings = median_seconds(calls, warmup, repeats, device)
        for variant, (seconds, peak) in timings.items():
            rows.append({"task": task, "variant": variant, "ms": round(1000 * seconds, 1),
                         "images_per_second": round(batch_size / seconds, 1), "peak_gib": peak,
                         "speedup": round(timings["eager"][0] / seconds, 2)})
            print(json.dumps(rows[-1]), flush=True)

    device_name = torch.cuda.get_device_name(device) if on_cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n### Swinv2 attention, {shape}, batch {batch_size}, {precision}, {device_name}; "
          f"torch {torch.__version__}; max |Δ pooled| sdpa vs eager: {max_difference:.2e}\n")
    print("| task | attention | ms / call | images/s | peak GiB | speed-up |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['task']} | {row['variant']} | {row['ms']} | {row['images_per_second']} | "
              f"{row['peak_gib'] if row['peak_gib'] is not None else '-'} | {row['speedup']}x |")
    if arguments.out:
        summary = {"shape": shape, "batch_size": batch_size, "precision": precision, "device": device_name,
                   "torch": torch.__version__, "max_abs_pooled_difference": max_difference,
                   "warmup": warmup, "repeats": repeats, "rows": rows}
        arguments.out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
