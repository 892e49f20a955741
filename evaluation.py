"""Evaluation = embed -> exact kNN -> metrics. Per-epoch validation and `--mode eval` both call this."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from distributed import gather_objects, is_main_process
from graphed_inference import inference_forward
from metrics import relevant_counts, retrieval_metrics
from retrieval import nearest_neighbours

METRIC_KEYS_AFTER_RECALL = ("map@r", "r_precision", "mrr")


def autocast_context(device: torch.device, precision: str, cache_enabled: bool = True):
    """The one mixed-precision switch used by training and embedding: fp32 means no autocast.

    cache_enabled=False: no reuse of a weight's cast within the context, as CUDA graph capture needs.
    """
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)


class Embedded(NamedTuple):
    """What `extract_embeddings` returns: row i of each tensor belongs to the same image."""

    embeddings: torch.Tensor  # (N', D) float32 on the CPU, L2-normalised by the model
    labels: torch.Tensor  # (N',) int64
    indices: torch.Tensor  # (N',) int64: position of each row's image in the loader's dataset
    skipped: list  # [(dataset index, reason, detail), ...]: images that could not be read (skip mode)
    # Seconds the loop spent waiting for the loader's next batch. Batches are not synchronised with the
    # device, so when the GPU is the limit the loop waits in kernel launches instead, and this stays small.
    seconds_waiting_for_images: float = 0.0
    seconds_to_first_batch: float = 0.0  # of the wait above: worker start and the first batch
    # CUDA only (None elsewhere): the device's own time from each batch's copy to the end of its forward,
    # summed. Near the embedding time, the GPU was the limit; well below it, the GPU sat idle between batches.
    seconds_on_device: float | None = None


class DeviceSpans:
    """Sums the device time of marked spans on the current CUDA stream, without synchronising per span."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.spans: list[tuple] = []

    def begin(self):
        if not self.enabled:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def end(self, began) -> None:
        if self.enabled:
            ended = torch.cuda.Event(enable_timing=True)
            ended.record()
            self.spans.append((began, ended))

    def total_seconds(self) -> float | None:
        """Waits for the last span; None off CUDA."""
        if not self.enabled:
            return None
        if self.spans:
            self.spans[-1][1].synchronize()
        return sum(began.elapsed_time(ended) for began, ended in self.spans) / 1000


def graph_rows(loader, first_batch_rows: int) -> int:
    """Rows of the CUDA graph's static batch: the loader's batch size, or the whole dataset when it is
    smaller; the first batch's size for a loader without a fixed batch size."""
    rows = getattr(loader, "batch_size", None) or first_batch_rows
    dataset = getattr(loader, "dataset", None)
    return min(rows, len(dataset)) if hasattr(dataset, "__len__") else rows


@torch.inference_mode()
def extract_embeddings(model: nn.Module, loader, device: torch.device, precision: str,
                       description: str = "embed", cuda_graph: bool = False) -> Embedded:
    """Embed every image of `loader` in order.

    The loader yields `(images, labels, indices, skipped)` batches (`collate_skipping_bad_images`);
    N' = N minus the skipped images, and `indices` says which images the rows are; with every image
    skipped, N' = 0 and the embeddings are an empty (0, 0) tensor. cuda_graph: on CUDA, replay the
    forward from one captured graph (graphed_inference.py; eval.cuda_graph).
    """
    was_training = model.training
    model.eval()
    embeddings, labels, indices, skipped = [], [], [], []
    device_spans = DeviceSpans(device)
    embed = None  # chosen at the first batch, whose shape a CUDA graph is captured at

    def autocast():
        return autocast_context(device, precision, cache_enabled=False)
    waited, first_wait, asked = 0.0, None, time.perf_counter()
    for images, batch_labels, batch_indices, batch_skipped in tqdm(loader, desc=description, leave=False, unit="batch",
                                                                   disable=not is_main_process()):
        waited += time.perf_counter() - asked
        first_wait = waited if first_wait is None else first_wait
        skipped += batch_skipped
        if images is not None:
            if embed is None:
                embed = inference_forward(model, images, graph_rows(loader, len(images)), device, autocast,
                                          cuda_graph, len(loader) if hasattr(loader, "__len__") else None)
            began = device_spans.begin()
            batch_embeddings = embed(images)
            device_spans.end(began)
            embeddings.append(batch_embeddings.float())  # stays on the device: no sync per batch
            labels.append(batch_labels)
            indices.append(batch_indices)
        asked = time.perf_counter()
    model.train(was_training)
    timing = {"seconds_waiting_for_images": waited, "seconds_to_first_batch": first_wait or 0.0,
              "seconds_on_device": device_spans.total_seconds()}
    if not embeddings:  # every image skipped; `require_queries` turns this into a one-line error
        empty = torch.empty(0, dtype=torch.long)
        return Embedded(torch.empty(0, 0), empty, empty, skipped, **timing)
    return Embedded(torch.cat(embeddings).cpu(), torch.cat(labels).long(), torch.cat(indices).long(), skipped, **timing)


def gather_embedded(embedded: Embedded) -> Embedded:
    """Every process's shard (`distributed.shard_of_batches`, rank order = list order) joined into the whole
    split's Embedded, on every process; the shard itself in one process. Timings are rank 0's own."""
    shards = gather_objects((embedded.embeddings, embedded.labels, embedded.indices, embedded.skipped))
    if len(shards) == 1:
        return embedded
    kept = [shard for shard in shards if len(shard[1])]  # a shard whose images were all skipped adds none
    skipped = [item for shard in shards for item in shard[3]]
    if not kept:
        empty = torch.empty(0, dtype=torch.long)
        return embedded._replace(embeddings=torch.empty(0, 0), labels=empty, indices=empty, skipped=skipped)
    return embedded._replace(embeddings=torch.cat([shard[0] for shard in kept]),
                             labels=torch.cat([shard[1] for shard in kept]),
                             indices=torch.cat([shard[2] for shard in kept]), skipped=skipped)


class NothingToEvaluateError(ValueError):
    """The images of a split that were embedded leave no query: no class has two of them."""


def require_queries(embedded: Embedded, split: str, num_listed: int, skip_list: Path) -> None:
    """Raise NothingToEvaluateError, in one line naming the split (and where skipped images are listed),
    unless some class has at least two embedded images: a query needs another image of its class."""
    _, class_sizes = torch.unique(embedded.labels, return_counts=True)
    if bool((class_sizes >= 2).any()):
        return
    read = len(embedded.labels)
    if embedded.skipped:
        raise NothingToEvaluateError(
            f"{split}: only {read} of {num_listed} images could be read ({len(embedded.skipped)} skipped by "
            f"data.on_bad_image=skip, listed in {skip_list}) and no class has two of them; evaluation needs a "
            f"query with another image of its class")
    raise NothingToEvaluateError(f"{split}: no class has two of its {read} images; evaluation needs a query with "
                                 f"another image of its class")


def evaluate_embeddings(embeddings: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray,
                        recall_ks: list[int], backend: str = "auto", device: str = "cpu", memory_gb: float | None = None,
                        map_ks: Sequence[int] = (), super_labels: torch.Tensor | np.ndarray | None = None) -> dict:
    """Exact kNN over all items (each query against every other item) and the retrieval metrics.

    k = max(largest recall or mAP k, largest class size - 1), capped at N - 1. When the cap applies, every
    other item is retrieved, so Recall@k and mAP@k for any k >= N - 1 equal those at N - 1 exactly (mAP@k
    divides by min(k, R) = R either way); the report still names them by the requested k.

    Args:
        embeddings: (N, D) float, L2-normalised. labels: (N,) int class of each item.
        recall_ks: the k of Recall@k. map_ks: the k of mAP@k (`metrics.map_at_k`), none by default.
        backend, device: of `retrieval.nearest_neighbours`.
        memory_gb: the search's working-memory budget in GB (see `retrieval.nearest_neighbours`); None or 0:
            1 GB on the CPU, sized to the card on CUDA. The (N, k) neighbour matrix (12 bytes per entry) comes
            on top. On a CUDA device the neighbours stay there and the metrics are computed there.
        super_labels: (N,) int super class of each item (SOP's super_class_id), or None.

    Returns:
        A report dict: `recall@k` for each k, `map@k` for each of `map_ks`, `map@r`, `r_precision`, `mrr`
        (fractions in [0, 1]); with `super_labels`, `recall@1_by_super_class`: {str(super class): Recall@1
        over that super class's queries} (a super class whose items are all alone in their classes has no
        query and no entry); then `num_queries` (queries with at least one other item of their class),
        `num_queries_without_relevant`, `num_items`, `embedding_dim`, `knn_k`, and `seconds_search` /
        `seconds_metrics`.
    """
    embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if embeddings.ndim != 2 or labels.ndim != 1 or len(embeddings) != len(labels):
        raise ValueError(f"embeddings must be (N, D) and labels (N,); got {tuple(embeddings.shape)} and {tuple(labels.shape)}")
    if super_labels is not None:
        super_labels = torch.as_tensor(super_labels, dtype=torch.long)
        if super_labels.shape != labels.shape:
            raise ValueError(f"super_labels must be (N,) like labels; got {tuple(super_labels.shape)}")
    if len(labels) < 2:
        raise ValueError("evaluation needs at least 2 items")
    if min([*recall_ks, *map_ks]) < 1:
        raise ValueError(f"recall and mAP ks must be >= 1; got {list(recall_ks)} and {list(map_ks)}")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinite values")
    num_items = len(labels)
    largest_relevant = int(relevant_counts(labels).max())
    k = min(max(*recall_ks, *map_ks, largest_relevant), num_items - 1)

    started = time.perf_counter()
    # On CUDA the neighbours stay on the card and the metrics run there: no (N, k) copy back, no CPU pass over it.
    metrics_device = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
    # Only the indices are used: dropping the scores at once frees (N, k) float32 before the metrics.
    neighbour_indices = nearest_neighbours(embeddings, k, backend=backend, device=device, memory_gb=memory_gb or None,
                                           result_device=metrics_device)[1]
    labels = labels.to(metrics_device)
    super_labels = None if super_labels is None else super_labels.to(metrics_device)
    if metrics_device.type == "cuda":
        torch.cuda.synchronize(metrics_device)  # the search's time is its own, not the metrics'
    seconds_search = time.perf_counter() - started

    started = time.perf_counter()
    # A requested k beyond N - 1 is answered by the whole gallery (see docstring).
    computed = retrieval_metrics(neighbour_indices, labels, recall_ks=sorted({min(r, k) for r in recall_ks}),
                                 map_ks=sorted({min(m, k) for m in map_ks}), groups=super_labels)
    report = {f"recall@{requested}": computed[f"recall@{min(requested, k)}"] for requested in recall_ks}
    report.update({f"map@{requested}": computed[f"map@{min(requested, k)}"] for requested in map_ks})
    report.update({key: computed[key] for key in METRIC_KEYS_AFTER_RECALL})
    if super_labels is not None:
        report["recall@1_by_super_class"] = {str(group): value
                                             for group, value in computed["recall@1_by_group"].items()}
    seconds_metrics = time.perf_counter() - started

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
    """The scalar metrics of a report in table order: recall@k, map@k, then map@r, r_precision, mrr."""
    at_k = [key for key, value in report.items() if key.startswith(("recall@", "map@")) and isinstance(value, float)
            and key not in METRIC_KEYS_AFTER_RECALL]
    return at_k + [key for key in METRIC_KEYS_AFTER_RECALL if key in report]


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

