"""Where one training step's time goes: GPU kernel time by kind, the GPU's idle share, the top kernels.

    python bench/profile_step.py --out profile.json            # Swinv2-B/256, our step, on CUDA
    python bench/profile_step.py --tiny                        # a CPU smoke test (operator times, no compile)

It profiles `trainer.Trainer.train_step` exactly as bench/train_bench.py builds it (compiled unless
--no-compile) over a few steps after warm-up, and prints:
- wall time per step against the union of kernel intervals (the share of wall time the GPU was busy);
- kernel time grouped as matrix products, attention, inductor-generated (fused elementwise / norms),
  copies and other;
- the slowest kernels.
--batches 128,256 profiles each batch size in turn (each a fresh compile).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_bench import our_step_runner, swinv2_base_config, synchronize  # noqa: E402
from model import tiny_backbone_config  # noqa: E402

KINDS = (  # (kind, substrings of the kernel name), first match wins
    # inductor's template kernels: flex_attention's (matrix products use cuBLAS unless max-autotune is on)
    ("attention", ("triton_tem_",)),
    ("inductor (fused)", ("triton_",)),  # inductor names its kernels after the operators they fuse
    ("attention", ("fmha", "attention", "flash")),
    ("matrix product", ("gemm", "xmma", "cutlass", "cublas", "nvjet", "matmul", "::mm", "addmm", "bmm")),
    ("copy / fill", ("copy", "memcpy", "memset", "fill")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other"


def busy_microseconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def profile_steps(step, device: torch.device, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        wall_us = (time.perf_counter() - started) * 1e6
    events = profiler.events()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        durations = [(e.name, e.time_range.end - e.time_range.start) for e in kernels]
        busy_us = busy_microseconds([(e.time_range.start, e.time_range.end) for e in kernels])
    else:  # the CPU has no kernels: every operator's own (self) time stands in, and they add up
        durations = [(e.name, e.self_cpu_time_total) for e in events]
        busy_us = sum(duration for _, duration in durations)
    by_kind: dict[str, float] = {}
    by_name: dict[str, list[float]] = {}
    for name, duration in durations:
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + duration
        by_name.setdefault(name, []).append(duration)
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:20]
    return {
        "wall_ms_per_step": wall_us / steps / 1e3,
        "busy_ms_per_step": busy_us / steps / 1e3,
        "kernels_per_step": len(durations) / steps,
        "ms_per_step_by_kind": {k: v / steps / 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top": [{"name": name[:110], "calls_per_step": len(times) / steps, "ms_per_step": sum(times) / steps / 1e3}
                for name, times in top],
    }


def print_profile(title: str, result: dict) -> None:
    wall, busy = result["wall_ms_per_step"], result["busy_ms_per_step"]
    print(f"\n### {title}\n")
    print(f"wall {wall:.1f} ms/step, kernels busy {busy:.1f} ms/step ({100 * busy / wall:.0f}%), "
          f"{result['kernels_per_step']:.0f} kernels/step, {result['images_per_second']:.1f} images/s\n")
    print("| kind | ms/step | share of busy |\n|---|---|---|")
    for kind, ms in result["ms_per_step_by_kind"].items():
        print(f"| {kind} | {ms:.2f} | {100 * ms / busy:.1f}% |")
    print("\n| kernel | calls/step | ms/step |\n|---|---|---|")
    for row in result["top"]:
        print(f"| `{row['name']}` | {row['calls_per_step']:.0f} | {row['ms_per_step']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU, not compiled: a smoke test")
    parser.add_argument("--batches", default="128", help="comma-separated P x K batch sizes (K = 4)")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "flex", "eager"])
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    arguments = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not arguments.tiny else "cpu")
    config = tiny_backbone_config(64) if arguments.tiny else swinv2_base_config()
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    compiled = not (arguments.no_compile or arguments.tiny)  # inductor takes minutes on a CPU
    results = []
    for batch in (int(b) for b in arguments.batches.split(",")):
        step, images_per_step = our_step_runner(config, device, batch, "bf16", arguments.attention, False, compiled,
                                                True)
        result = profile_steps(step, device, arguments.warmup, arguments.steps)
        result.update(device=device_name, torch=torch.__version__, batch=images_per_step, compiled=compiled,
                      attention=arguments.attention,
                      images_per_second=images_per_step / result["wall_ms_per_step"] * 1e3)
        results.append(result)
        print_profile(f"{device_name}, batch {images_per_step}, {arguments.attention}"
                      f"{' + torch.compile' if compiled else ''} (profiled, so a little slower than the bench)", result)
        if arguments.out:
            arguments.out.write_text(json.dumps(results, indent=2))
        step = None
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
