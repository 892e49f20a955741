"""Training-step time with several processes (torch.distributed): without and with the DistributedDataParallel
wrapper, and with and without cross-rank mining, at one global batch.

    python bench/ddp_bench.py --tiny                 # CPU, 2 gloo processes, tiny Swinv2 at 32 px: under a minute
    python bench/ddp_bench.py                        # Swinv2-B/256, global batch 128; on a GPU when present
    python bench/ddp_bench.py --processes 8          # one process per GPU (NCCL), 8 GPUs

Each row is one torchrun launch (`--standalone`) of this file; every process runs `Trainer.train_step` on synthetic
uint8 images and P x K labels (K = 4), its share of the global batch, and rank 0 times the steps. Rows:
- 1 process, plain: the model itself, as a plain launch trains it.
- 1 process, DDP wrapper: the same model wrapped in DistributedDataParallel in a world of one (what the wrapper
  alone costs; the program never wraps at world size 1).
- N processes, cross-rank mining: each embeds global / N images, the embeddings are gathered, the miner and the
  loss see the global batch, gradients summed (the default with several processes).
- N processes, own-share mining: `train.cross_rank_mining=false`: each mines its share, gradients averaged.
On one GPU only the 1-process rows run (NCCL takes one GPU per process). On the CPU every process has one thread
(OMP_NUM_THREADS=1), so N processes use N cores against the 1-process rows' one.
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

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def worker(arguments) -> None:
    """One process of a row: build the step, time it, rank 0 writes {seconds_per_step, ...} to --result."""
    import torch
    import torch.distributed as dist
    from transformers import Swinv2Model

    from bench.train_bench import swinv2_base_config
    from distributed import Processes
    from model import Embedder, apply_speed_options, tiny_backbone_config
    from objective import MetricLearningObjective
    from optimization import build_optimizer, warmup_cosine_schedule
    from trainer import Trainer

    processes = Processes(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    on_gpu = torch.cuda.is_available() and not arguments.cpu
    device = torch.device("cuda", processes.local_rank) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_gpu else "gloo")
    config = tiny_backbone_config(32) if arguments.tiny else swinv2_base_config()
    torch.manual_seed(0)
    model = apply_speed_options(Embedder(Swinv2Model(config), 64 if arguments.tiny else 512).to(device), "sdpa")
    optimizer = build_optimizer(model, 2e-5, 10.0, 0.05, device)
    scheduler = warmup_cosine_schedule(optimizer, 10_000, 100)
    objective = MetricLearningObjective("triplet", "batchhard", config_values={"train.margin": 0.1})
    # "wrapped": what the program never does, DDP in a world of one. Told it is one of 2 processes, the Trainer
    # wraps the model; its collectives are no-ops in a world of one.
    told = Processes(0, 2, processes.local_rank) if arguments.row == "wrapped" else processes
    trainer = Trainer(model, objective, optimizer, scheduler, None, None, device, "bf16" if on_gpu else "fp32", 1.0,
                      1, 0, Path("."), None, 0, {}, processes=told, cross_rank_mining=arguments.row == "cross_rank")
    assert (trainer.training_model is model) == (arguments.row == "plain")
    share = arguments.batch // processes.world_size
    labels = torch.arange(arguments.batch // 4).repeat_interleave(4)[processes.rank * share:(processes.rank + 1) * share]
    images = torch.randint(0, 256, (share, 3, config.image_size, config.image_size), dtype=torch.uint8)
    images, labels = images.to(device), labels.to(device)

    def synchronize():
        if on_gpu:
            torch.cuda.synchronize()
        dist.barrier()

    for _ in range(arguments.warmup):
        trainer.train_step(images, labels)
    synchronize()
    started = time.perf_counter()
    for _ in range(arguments.steps):
        trainer.train_step(images, labels)
    synchronize()
    seconds = (time.perf_counter() - started) / arguments.steps
    if processes.is_main:
        Path(arguments.result).write_text(json.dumps({
            "seconds_per_step": seconds, "images_per_second": arguments.batch / seconds,
            "device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "processes": processes.world_size}))
    dist.destroy_process_group()


ROWS = {  # name: (processes: 1 or N, what the table says)
    "plain": (1, "1 process, no wrapper (the program at world size 1)"),
    "wrapped": (1, "1 process, DDP wrapper"),
    "cross_rank": (None, "{n} processes, DDP, cross-rank mining (default)"),
    "own_share": (None, "{n} processes, DDP, own-share mining"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny Swinv2 at 32 px, global batch 32, on the CPU")
    parser.add_argument("--processes", type=int, default=2, help="N of the N-process rows (default 2)")
    parser.add_argument("--batch", type=int, default=None, help="global batch (default 128; --tiny 32)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20; --tiny 10)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU (gloo) even with a GPU")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here too")
    parser.add_argument("--row", choices=tuple(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    arguments.batch = arguments.batch or (32 if arguments.tiny else 128)
    arguments.steps = arguments.steps or (10 if arguments.tiny else 20)
    arguments.cpu = arguments.cpu or arguments.tiny
    if arguments.row:
        worker(arguments)
        return

    import torch

    gpus = 0 if arguments.cpu else torch.cuda.device_count()
    rows = []
    for name, (count, title) in ROWS.items():
        count = count or arguments.processes
        if gpus and count > gpus:
            print(f"skipped: {title.format(n=count)} (needs {count} GPUs, {gpus} here)")
            continue
        with tempfile.TemporaryDirectory() as folder:
            result = Path(folder) / "row.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                       f"--nproc-per-node={count}", __file__, "--row", name, "--result", str(result),
                       "--batch", str(arguments.batch), "--steps", str(arguments.steps),
                       "--warmup", str(arguments.warmup), *(["--tiny"] if arguments.tiny else []),
                       *(["--cpu"] if arguments.cpu else [])]
            environment = {**os.environ, "OMP_NUM_THREADS": "1"} if arguments.cpu else dict(os.environ)
            done = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=600)
            if done.returncode != 0:
                print(f"failed: {title.format(n=count)}\n{done.stderr[-3000:]}")
                continue
            row = json.loads(result.read_text())
        rows.append({"row": title.format(n=count), **row})
        print(f"{rows[-1]['row']}: {1000 * row['seconds_per_step']:.1f} ms/step", flush=True)
    shape = "tiny Swinv2, 32 px" if arguments.tiny else "Swinv2-B, 256 px"
    print(f"\n{shape}, global batch {arguments.batch} (P x 4), {arguments.steps} timed steps after "
          f"{arguments.warmup}; device {rows[0]['device'] if rows else '?'}\n")
    print("| row | ms per step | global images/s | x plain |")
    print("|---|---|---|---|")
    plain = next((row["seconds_per_step"] for row in rows if row["row"].startswith("1 process, no")), None)
    for row in rows:
        ratio = f"{plain / row['seconds_per_step']:.2f}" if plain else "-"
        print(f"| {row['row']} | {1000 * row['seconds_per_step']:.1f} | {row['images_per_second']:.1f} | {ratio} |")
    if arguments.out:
        arguments.out.write_text(json.dumps({"shape": shape, "batch": arguments.batch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
