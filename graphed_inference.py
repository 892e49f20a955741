"""Embedding forwards replayed from one CUDA graph instead of launched kernel by kernel.

The eager Swinv2-B forward is about 2,000 small operations. In `main.py --mode eval` on an H200 machine
(60,502 JPEGs, 16 loader workers on its 16 cores) each 256-image batch kept the GPU 161-172 ms, where the
same forward on synthetic tensors alone takes 123 ms (bench/train_bench.py): the GPU stalled inside the
forward, most likely on the host (transformers' per-layer host mask copy, see
swinv2_attention.CachedMaskSwinv2Layer, and launches from a main thread sharing the cores with the
workers). A captured graph launches the whole forward at once.

`inference_forward` chooses: the graph on CUDA when asked (falling back to the plain forward, with a
warning, if the capture fails or the graph's embeddings of the first batch differ from the plain
forward's), the plain forward elsewhere. A graph is captured at one batch shape; shorter
batches (the last one, or one that lost skipped images) are padded with black images to that shape and
the padding's rows dropped. In eval mode every row of a batch is computed independently, so the padding
changes nothing for the real rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn


class PaddedBatches:
    """Calls `forward_full()`, which reads `static_input` (capacity rows), for batches of up to that many rows.

    Each batch is copied into the front of `static_input` (from the host or the device), the rest is
    zeroed, and the batch's own output rows are returned as a new tensor (the next call overwrites the
    one `forward_full` returns). Batches of another image shape, layout aside, or with more rows than
    `static_input` go to `fallback`.
    """

    def __init__(self, static_input: torch.Tensor, forward_full: Callable[[], torch.Tensor],
                 fallback: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.static_input, self.forward_full, self.fallback = static_input, forward_full, fallback

    def fits(self, images: torch.Tensor) -> bool:
        return (images.shape[1:] == self.static_input.shape[1:] and images.dtype == self.static_input.dtype
                and images.shape[0] <= self.static_input.shape[0])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not self.fits(images):
            return self.fallback(images)
        rows = images.shape[0]
        self.static_input[:rows].copy_(images, non_blocking=True)
        if rows < self.static_input.shape[0]:
            self.static_input[rows:].zero_()
        return self.forward_full()[:rows].clone()


def static_batch_like(images: torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """Zeros of shape (rows, *images.shape[1:]) on `device`, laid out like `images` where that is
    channels-last (the loaders' layout), so filling it from a batch is one plain copy."""
    static = torch.zeros((rows, *images.shape[1:]), dtype=images.dtype, device=device)
    if images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
        static = static.contiguous(memory_format=torch.channels_last)
    return static


def capture_forward(model: nn.Module, static_input: torch.Tensor, autocast: Callable) -> Callable[[], torch.Tensor]:
    """Capture model(static_input) under `autocast()` as a CUDA graph; returns a function that replays it.

    Two warm-up forwards on a side stream first (PyTorch's recipe): library handles, workspaces and kernel
    choices are made outside the capture. Call under torch.inference_mode(); the graph keeps reading the
    model's parameters where they are, so it is for one evaluation pass, not across optimiser steps.
    The warm-up and the capture cost about three forwards, and torch.cuda.graph empties the allocator's cache.
    """
    with torch.cuda.device(static_input.device):  # the capture stream belongs to the current device
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(2):
                with autocast():
                    model(static_input)
        torch.cuda.current_stream().wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the loader's pin-memory thread keeps allocating pinned memory during the capture,
        # which the default ("global") mode forbids, failing both the capture and that thread.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"), autocast():
            static_output = model(static_input)

    def replay() -> torch.Tensor:
        graph.replay()
        return static_output

    return replay


# Fewer batches than this in a pass: the warm-up and capture (about three forwards) would not pay off.
MIN_BATCHES_FOR_A_GRAPH = 4


def inference_forward(model: nn.Module, first_batch: torch.Tensor, batch_rows: int, device: torch.device,
                      autocast: Callable, cuda_graph: bool, num_batches: int | None = None,
                      ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function that embeds each batch (host or device tensor) of one evaluation pass.

    autocast: a zero-argument factory of the mixed-precision context (a fresh one per forward).
    With cuda_graph on a CUDA device and at least MIN_BATCHES_FOR_A_GRAPH batches (num_batches, when
    known): one graph for batches of up to `batch_rows` images shaped like `first_batch` (larger ones, or
    other shapes, take the plain forward); otherwise, and if the capture fails, the plain forward.
    """

    def plain(images: torch.Tensor) -> torch.Tensor:
        with autocast():
            return model(images.to(device, non_blocking=True))

    if not cuda_graph or device.type != "cuda" or (num_batches is not None and num_batches < MIN_BATCHES_FOR_A_GRAPH):
        return plain
    static_input = static_batch_like(first_batch, max(batch_rows, first_batch.shape[0]), device)
    try:
        replay = capture_forward(model, static_input, autocast)
    except Exception as error:  # noqa: BLE001 - any capture failure: the plain forward gives the same embeddings
        warnings.warn(f"eval.cuda_graph: capturing the embedding forward failed ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); embedding without it", stacklevel=2)
        torch.cuda.synchronize(device)
        return plain
    return checked_against_plain(PaddedBatches(static_input, replay, plain), plain, first_batch)


# The first batch through the graph must match the plain forward row by row: bf16 runs of one forward give
# cosines above 0.9999 on unit embeddings. The cosine alone misses a graph whose rows come out rescaled, so
# every entry must also stay within an absolute bound that unit-norm rows of a faithful replay never reach.
GRAPH_MIN_COSINE = 0.999
GRAPH_MAX_ABS_DIFFERENCE = 1e-2


def checked_against_plain(graphed: Callable, plain: Callable, first_batch: torch.Tensor) -> Callable:
    """`graphed` if it embeds `first_batch` as `plain` does, else `plain` with a warning: a graph that
    replays wrongly must not turn into wrong metrics. Costs a plain forward and a replay, once per pass."""
    expected = plain(first_batch).float()
    replayed = graphed(first_batch).float()
    cosine = torch.nn.functional.cosine_similarity(replayed, expected, dim=1).min().item()
    difference = (replayed - expected).abs().max().item()
    if cosine > GRAPH_MIN_COSINE and difference <= GRAPH_MAX_ABS_DIFFERENCE:  # False for NaN too
        return graphed
    warnings.warn(f"eval.cuda_graph: the captured forward differs from the plain one on the first batch (lowest "
                  f"row cosine {cosine:.6f}, largest difference {difference:.3g}); embedding without it", stacklevel=3)
    return plain
