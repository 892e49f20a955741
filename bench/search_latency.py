"""Search latency of one query image, end to end on this machine: load the index, load the model, embed, search.

    python bench/search_latency.py                      # tiny (64 px) and Swinv2-B (256 px), 100,000 items
    python bench/search_latency.py --models tiny --items 10000 --repeats 5
    python bench/search_latency.py --threads 1       # torch and faiss on one thread (a busy shared machine)

Each model is a random checkpoint (Swinv2-B built from its config and saved with save_pretrained: no
download); the index is a flat one over random unit vectors (search time depends on the count, not on where
the vectors came from); the query is an SOP-like 500 x 500 JPEG. In-process times come from the Python API
(`catalogue.Catalogue`); the command line's wall time (`main.py --mode search`, process start and imports
included) is the median of three runs. CPU columns are the process's CPU seconds: on one thread, about
what the step takes on an idle core however busy the machine is. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

MODELS = {"tiny": (64, 64), "base": (256, 512)}  # name: (image size, embedding size)


def random_checkpoint(name: str, folder: Path) -> Path:
    """A checkpoint as training writes it, with random weights; Swinv2-B from its config, saved locally."""
    import torch
    from transformers import Swinv2Model

    from bench.train_bench import swinv2_base_config
    from checkpoint import save_checkpoint_atomically, weights_digest
    from config import load_config
    from model import build_embedder

    image_size, dim = MODELS[name]
    backbone = "tiny"
    if name == "base":
        backbone = str(folder / "swinv2_base_random")
        Swinv2Model(swinv2_base_config()).save_pretrained(backbone)
    config = load_config(None, [f"model.backbone={backbone}", f"model.embedding_dim={dim}",
                                f"data.image_size={image_size}", "train.precision=fp32"])
    torch.manual_seed(0)
    model = build_embedder(backbone, image_size, dim)
    weights = model.state_dict()
    path = folder / f"{name}.pt"
    save_checkpoint_atomically({"model": weights, "weights_sha256": weights_digest(weights), "config": config.to_dict(),
                                "epoch": 0, "metrics": {}, "backbone_config_json": model.backbone.config.to_json_string(),
                                "embedding_dim": dim, "normalisation": {"mean": model.input_mean, "std": model.input_std},
                                "wandb_run_id": None}, path)
    return path


def random_index(checkpoint_path: Path, folder: Path, items: int) -> Path:
    from catalogue.build import build_from_vectors
    from checkpoint import load_checkpoint
    from config import load_config

    checkpoint = load_checkpoint(checkpoint_path)
    dim = checkpoint["embedding_dim"]
    vectors = np.random.default_rng(0).normal(size=(items, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [{"id": row, "path": f"/catalogue/{row}.jpg", "label": None, "sha256": f"{row:064x}"} for row in range(items)]
    parameters = load_config().to_dict()["index"]
    parameters.pop("type")
    build_from_vectors(folder, vectors, rows, checkpoint, checkpoint_path, "flat", parameters, "fp32",
                       {"kind": "random vectors"})
    return folder


def measure(name: str, folder: Path, items: int, repeats: int, environment: dict) -> dict:
    from bench.synthetic_photos import write_sop_like_jpeg
    from catalogue import Catalogue

    checkpoint = random_checkpoint(name, folder)
    index = random_index(checkpoint, folder / f"{name}_index", items)
    query = folder / "query.jpg"
    write_sop_like_jpeg(str(query), seed=1)
    started = time.perf_counter()
    catalogue = Catalogue.load(index)
    loaded = time.perf_counter()
    catalogue.embedder  # noqa: B018 - the checkpoint read and the model built, as the first query does
    model_loaded = time.perf_counter()
    vectors = catalogue.embed_images([query])
    embedded = time.perf_counter()
    catalogue.search_vectors(vectors, k=10)
    searched = time.perf_counter()
    embed_times, search_times, embed_cpu = [], [], []
    for _ in range(repeats):
        began, began_cpu = time.perf_counter(), time.process_time()
        vectors = catalogue.embed_images([query])
        middle, middle_cpu = time.perf_counter(), time.process_time()
        catalogue.search_vectors(vectors, k=10)
        embed_times.append(middle - began)
        embed_cpu.append(middle_cpu - began_cpu)
        search_times.append(time.perf_counter() - middle)
    command = [sys.executable, str(REPO_ROOT / "main.py"), "--mode", "search", "--index", str(index), "--query",
               str(query), "--top-k", "10"]
    walls, cpus = [], []
    for _ in range(3):
        began, began_cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(command, check=True, capture_output=True, env=environment)
        walls.append(time.perf_counter() - began)
        ended_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(ended_cpu.ru_utime + ended_cpu.ru_stime - began_cpu.ru_utime - began_cpu.ru_stime)
    return {"model": name, "items": items, "load index": loaded - started, "load model": model_loaded - loaded,
            "first embed": embedded - model_loaded, "first search": searched - embedded,
            "embed (median)": statistics.median(embed_times), "embed CPU (median)": statistics.median(embed_cpu),
            "search (median)": statistics.median(search_times), "one query, cold": searched - started,
            "CLI wall (median)": statistics.median(walls), "CLI CPU (median)": statistics.median(cpus)}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch and faiss threads (default: theirs)")
    arguments = parser.parse_args()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if arguments.threads:
        import faiss

        torch.set_num_threads(arguments.threads)
        faiss.omp_set_num_threads(arguments.threads)
        environment["OMP_NUM_THREADS"] = str(arguments.threads)
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        for name in arguments.models:
            rows.append(measure(name, Path(temporary), arguments.items, arguments.repeats, environment))
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; seconds\n")
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(f"{row[key]:.3f}" if isinstance(row[key], float) else str(row[key]) for key in keys)
              + " |")


if __name__ == "__main__":
    main()
