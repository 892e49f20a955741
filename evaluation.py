"""Evaluation = embed -> exact kNN -> metrics. Per-epoch validation and `--mode eval` both call this."""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from metrics import relevant_counts, retrieval_metrics
from retrieval import nearest_neighbours

log = logging.getLogger("evaluation")

METRIC_KEYS_AFTER_RECALL = ("map@r", "r_precision", "mrr")


def autocast_context(device: torch.device, precision: str):
    """The one mixed-precision switch used by training and embedding: fp32 means no autocast."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.inference_mode()
def extract_embeddings(model: nn.Module, loader, device: torch.device, precision: str,
                       description: str = "embed") -> tuple[torch.Tensor, torch.Tensor]:
    """Embed every image of `loader` in order.

    Returns:
        embeddings: (N, D) float32 on the CPU, L2-normalised by the model.
        labels: (N,) int64.
    """
    was_training = model.training
    model.eval()
    embeddings, labels = [], []
    for images, batch_labels, _ in tqdm(loader, desc=description, leave=False, unit="batch"):
        with autocast_context(device, precision):
            batch_embeddings = model(images.to(device, non_blocking=True))
        embeddings.append(batch_embeddings.float().cpu())
        labels.append(batch_labels)
    model.train(was_training)
    return torch.cat(embeddings), torch.cat(labels).long()


def evaluate_embeddings(embeddings: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                        recall_ks: list[int], backend: str = "auto", device: str = "cpu") -> dict:
    """Exact kNN over all items (each query against every other item) and the retrieval metrics.

    k = max(largest recall k, largest class size - 1), capped at N - 1. When the cap applies, every
    other item is retrieved, so Recall@k for any k >= N - 1 equals Recall@(N - 1) exactly; the report
    still names it by the requested k.

    Returns:
        A report dict: `recall@k` for each k, `map@r`, `r_precision`, `mrr` (fractions in [0, 1]),
        `num_queries` (queries with at least one other item of their class), `num_queries_without_relevant`,
        `num_items`, `embedding_dim`, `knn_k`, and `seconds_search` / `seconds_metrics`.
    """
    embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if embeddings.ndim != 2 or labels.ndim != 1 or len(embeddings) != len(labels):
        raise ValueError(f"embeddings must be (N, D) and labels (N,); got {tuple(embeddings.shape)} and {tuple(labels.shape)}")
    if len(labels) < 2:
        raise ValueError("evaluation needs at least 2 items")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinite values")
    num_items = len(labels)
    largest_relevant = int(relevant_counts(labels).max())
    k = min(max(max(recall_ks), largest_relevant), num_items - 1)

    started = time.perf_counter()
    _, neighbour_indices = nearest_neighbours(embeddings, k, backend=backend, device=device)
    seconds_search = time.perf_counter() - started

    started = time.perf_counter()
    # A requested k beyond N - 1 is answered by the whole gallery (see docstring).
    effective_ks = sorted({min(requested, k) for requested in recall_ks})
    computed = retrieval_metrics(neighbour_indices, labels, recall_ks=tuple(effective_ks))
    seconds_metrics = time.perf_counter() - started

    report = {f"recall@{requested}": computed[f"recall@{min(requested, k)}"] for requested in recall_ks}
    report.update({key: computed[key] for key in METRIC_KEYS_AFTER_RECALL})
    report.update(
        num_queries=computed["num_queries"],
        num_queries_without_relevant=computed["num_queries_without_relevant"],
        num_items=num_items,
        embedding_dim=int(embeddings.shape[1]),
        knn_k=k,
        seconds_search=round(seconds_search, 4),
        seconds_metrics=round(seconds_metrics, 4),
    )
    return report


def metric_names(report: dict) -> list[str]:
    return [key for key in report if key.startswith("recall@")] + [k for k in METRIC_KEYS_AFTER_RECALL if k in report]


def markdown_table(rows: dict[str, dict]) -> str:
    """One row per named report, metrics as percentages: the table the README's results use."""
    names = metric_names(next(iter(rows.values())))
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row_name, report in rows.items():
        cells = [f"{100 * report[name]:.2f}" for name in names]
        lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(report: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    temporary.replace(path)


def is_better(candidate: float, best: float) -> bool:
    return math.isfinite(candidate) and (not math.isfinite(best) or candidate > best)
