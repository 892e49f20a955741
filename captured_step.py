"""One training step (forward, loss, backward, gradient clipping, AdamW) launched from CUDA graphs.

With the step compiled, an H200 still waits for kernel launches 17% of a Swinv2-B step (docs/performance.md).
A CUDA graph launches a captured sequence of kernels at once. A capture records kernels on fixed buffers, so
nothing inside it may read a value back to the host or size a tensor by a value: a miner's index tuples
(`nonzero`, `torch.where(mask)`), `.item()`, a Python `if` on a tensor. pytorch-metric-learning's miners and
reducers do all of these. Hence two strategies:

- `whole`: forward, loss, backward, clipping and the fused AdamW step as one graph. The loss must have fixed
  shapes and no host sync: `batch_hard_triplet_loss` below, losses over all-pairs masks, or proxy losses so
  written.
- `split`: the model's forward and its backward as two graphs (`torch.cuda.make_graphed_callables`); the loss
  and its mining run eagerly between them on the (batch, dim) embeddings, then clipping and AdamW run eagerly
  (a few fused launches each). Any loss.

The step is one function, `step_body`, captured or not: on a device other than CUDA (the CPU tests), or with
`capture=False`, it runs as it is. A non-finite loss or gradient norm leaves weights and optimiser state as
they were: the fused AdamW kernel skips its update where `found_inf` is 1, which needs no host sync.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from graphed_inference import static_batch_like

STRATEGIES = ("whole", "split")


class StepResult(NamedTuple):
    """One step's outputs, on the device, detached; reading them (e.g. `.item()`) is the caller's sync."""

    loss: torch.Tensor  # 0-d
    grad_norm: torch.Tensor  # 0-d: the total gradient norm before clipping
    embeddings: torch.Tensor  # (B, D)
    extras: dict  # what loss_fn returned beside the loss ({} when it returned the loss alone)


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """pytorch-metric-learning's TripletMarginLoss(margin) over its BatchHardMiner's triplets, without index tuples.

    embeddings (B, D), any scale (rows are L2-normalised here, as PML's LpDistance does); labels (B,).
    For each anchor: its farthest positive and nearest negative by Euclidean distance; the loss is the mean of
    relu(d(a, p) - d(a, n) + margin) over the anchors where it is above 0 (PML's AvgNonZeroReducer), 0 if none.
    Corner cases: an anchor without a positive or without a negative adds nothing (PML drops it); ties go to
    the lowest index (torch.max and torch.min, as in PML). Fixed shapes, no host sync: capturable.
    """
    embeddings = F.normalize(embeddings, dim=-1)
    distances = torch.cdist(embeddings, embeddings)  # (B, B)
    same = labels[:, None] == labels[None, :]
    positive = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    hardest_positive = distances.masked_fill(~positive, -math.inf).max(dim=1).values  # -inf: no positive
    hardest_negative = distances.masked_fill(same, math.inf).min(dim=1).values  # inf: no negative
    losses = F.relu(hardest_positive - hardest_negative + margin)  # (B,)
    return losses.sum() / (losses > 0).sum().clamp_min(1)


class _AutocastForward(nn.Module):
    """model(images) under autocast: the step's forward, and the module make_graphed_callables captures."""

    def __init__(self, model: nn.Module, autocast: Callable[[], AbstractContextManager]):
        super().__init__()
        self.model, self.autocast = model, autocast

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(images)


class CapturedTrainStep:
    """`step(images, labels) -> StepResult`: one optimiser step, from CUDA graphs on CUDA.

    Args:
        model: images -> embeddings (e.g. model.Embedder), in training mode.
        loss_fn: (embeddings, labels) -> loss, or (loss, extras dict). For `whole`, capturable (see the module
            docstring) and extras are tensors.
        optimizer: its param groups' lr may change between steps (a scheduler): the graph reads it from a
            device tensor refreshed before each replay. `whole` needs a fused AdamW (build_optimizer's on CUDA).
        autocast: zero-argument factory of the mixed-precision context, made with cache_enabled=False
            (`partial(evaluation.autocast_context, device, precision, cache_enabled=False)`); fp16's
            GradScaler cannot be captured, so bf16 or fp32.
        grad_clip: max global gradient norm, 0 = no clipping (the norm is still returned).
        strategy: `whole` or `split`.
        capture: None = on CUDA only; False runs `step_body` without a graph.
        warmup_steps: real steps run before capturing (`whole`, on a side stream as PyTorch's recipe does, so
            that lazy initialisation, kernel choices and a torch.compile happen outside the capture), or the
            forward+backward rehearsals of make_graphed_callables (`split`; these change no weight).

    Graphs are made for the first batch's shape after the warm-up; a batch of another shape (one that lost
    skipped images) runs the same step without a graph, with its own memory beside the graph's. A capture that
    fails warns once and the step runs without graphs from then on. Build the step after resuming: the graph
    keeps the optimiser state tensors it was captured with.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                 autocast: Callable[[], AbstractContextManager], grad_clip: float = 0.0, strategy: str = "split",
                 capture: bool | None = None, warmup_steps: int = 3):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {strategy!r}")
        self.model, self.loss_fn, self.optimizer, self.autocast = model, loss_fn, optimizer, autocast
        # Clipped as the trainer clips: the model's parameters (a loss's own, say proxies, are not).
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = grad_clip or math.inf
        self.strategy, self.warmup_steps = strategy, warmup_steps
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.fused = all(group.get("fused") for group in optimizer.param_groups)
        # float32 0-d, 1 where the step must not apply: what the fused kernel reads (as GradScaler's found_inf)
        self.found_inf = torch.zeros((), device=self.device) if self.fused else None
        self.steps_before_capture = 0
        self.graph = None  # whole: the captured step
        self.static_images = self.static_labels = self.static_result = None
        self.lr_tensors: list[torch.Tensor] = []
        self.graphed_forward = None  # split: the captured forward (and its backward)
        self.forward = _AutocastForward(model, autocast)

    # ---- the step, captured or not ----------------------------------------------------------------------
    def step_body(self, images: torch.Tensor, labels: torch.Tensor, forward: Callable) -> StepResult:
        """Forward, loss, backward, clipping and AdamW, with no host sync where the optimizer is fused.
        The gradients must be None (the eager step) or the graph's own (a replay overwrites them)."""
        embeddings = forward(images)
        returned = self.loss_fn(embeddings, labels)
        loss, extras = returned if isinstance(returned, tuple) else (returned, {})
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_norm)
        finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
        if self.fused:
            self.found_inf.copy_(~finite)
            self.optimizer.found_inf = self.found_inf  # read by AdamW.step (as GradScaler passes it)
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif bool(finite):  # note: a CPU-GPU sync point (free on the CPU; never inside a capture)
            self.optimizer.step()
        return StepResult(loss.detach(), grad_norm.detach(), embeddings.detach(), extras)

    def eager_step(self, images: torch.Tensor, labels: torch.Tensor, forward: Callable | None = None) -> StepResult:
        self.optimizer.zero_grad(set_to_none=True)
        return self.step_body(images, labels, forward or self.forward)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if not self.capture:
            return self.eager_step(images, labels)
        if self.strategy == "split":
            return self.split_step(images, labels)
        return self.whole_step(images, labels)

    # ---- whole: one graph ----------------------------------------------------------------------------
    def whole_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        if self.graph is None:
            if self.steps_before_capture < self.warmup_steps:
                self.steps_before_capture += 1
                return on_side_stream(lambda: self.eager_step(images, labels))
            if not self.capture_whole_step(images, labels):
                return self.eager_step(images, labels)
        if not fits(self.static_images, images) or labels.shape != self.static_labels.shape:
            return self.eager_step(images, labels)
        self.static_images.copy_(images, non_blocking=True)
        self.static_labels.copy_(labels, non_blocking=True)
        for lr, group in zip(self.lr_tensors, self.optimizer.param_groups, strict=True):
            lr.fill_(group["lr"])  # the scheduler's latest value
        self.graph.replay()
        loss, grad_norm, embeddings, extras = self.static_result
        # Copies: the next replay overwrites the graph's outputs.
        return StepResult(loss.clone(), grad_norm.clone(), embeddings.clone(),
                          {name: value.clone() if torch.is_tensor(value) else value for name, value in extras.items()})

    def capture_whole_step(self, images: torch.Tensor, labels: torch.Tensor) -> bool:
        """Capture step_body on static copies of this batch; False (with a warning) if it cannot be."""
        if not self.fused:
            return self.give_up("the whole-step graph needs a fused AdamW (the skip of a non-finite step reads "
                                "the loss on the host otherwise)")
        self.static_images = static_batch_like(images, images.shape[0], self.device).copy_(images)
        self.static_labels = labels.clone()
        groups = self.optimizer.param_groups
        saved = [(group["lr"], group["capturable"]) for group in groups]
        self.lr_tensors = [torch.tensor(float(group["lr"]), device=self.device) for group in groups]
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the backward allocates the gradients in the graph's pool
        try:
            for group, lr in zip(groups, self.lr_tensors):
                group["lr"], group["capturable"] = lr, True  # a tensor lr: read by every replay, not baked in
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.static_result = self.step_body(self.static_images, self.static_labels, self.forward)
        except Exception as error:  # noqa: BLE001 - e.g. a host sync in loss_fn: the same step runs uncaptured
            torch.cuda.synchronize(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            return self.give_up(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        finally:
            for group, (lr, capturable) in zip(groups, saved):
                group["lr"], group["capturable"] = lr, capturable
        self.graph = graph
        return True

    # ---- split: forward and backward graphs, the loss between them --------------------------------------
    def split_step(self, images: torch.Tensor, labels: torch.Tensor) -> StepResult:
        if self.graphed_forward is None:
            self.graphed_forward = GraphedForward(self.model, self.autocast, self.warmup_steps)
        result = self.eager_step(images, labels, self.graphed_forward)
        self.capture = self.graphed_forward.capture  # False once a capture failed
        return result

    def give_up(self, why: str) -> bool:
        warnings.warn(f"capturing the training step ({self.strategy}) failed or cannot be done ({why}); "
                      f"training without CUDA graphs", stacklevel=4)
        self.capture = False
        return False


class GraphedForward:
    """`forward(images) -> embeddings` under autocast, whose forward and backward replay CUDA graphs on CUDA.

    The `split` strategy's half of the step, and what `train.capture_step` gives the trainer, which runs its
    own loss, backward, clipping and optimiser step around it (one code path whether captured or not): the
    backward of the returned embeddings replays the captured backward.

    The graphs are captured at the first call (after `warmup_steps` rehearsals by make_graphed_callables; they
    take gradients with torch.autograd.grad, so they leave .grad and the weights alone) for that batch's shape.
    A batch of another shape, a device other than CUDA, or a capture that failed (one warning) runs the model
    as it is. Only in one process: DistributedDataParallel's gradient hooks are not captured.
    """

    def __init__(self, model: nn.Module, autocast: Callable[[], AbstractContextManager], warmup_steps: int = 3,
                 capture: bool | None = None):
        self.eager, self.warmup_steps = _AutocastForward(model, autocast), warmup_steps
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.static_images: torch.Tensor | None = None
        self.graphed = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if self.capture and self.graphed is None:
            self.graphed = self.capture_forward_backward(images)
        if self.graphed is not None and fits(self.static_images, images):
            return self.graphed(images)
        return self.eager(images)

    def capture_forward_backward(self, images: torch.Tensor):
        self.static_images = static_batch_like(images, images.shape[0], self.device).copy_(images)
        try:
            return torch.cuda.make_graphed_callables(self.eager, (self.static_images,),
                                                     num_warmup_iters=max(1, self.warmup_steps))
        except Exception as error:  # noqa: BLE001 - the same forward runs uncaptured
            torch.cuda.synchronize(self.device)
            warnings.warn(f"capturing the model's forward and backward failed ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); training without CUDA graphs",
                          stacklevel=3)
            self.capture = False
            return None


def fits(static: torch.Tensor | None, images: torch.Tensor) -> bool:
    return static is not None and images.shape == static.shape and images.dtype == static.dtype


def on_side_stream(run: Callable[[], StepResult]) -> StepResult:
    """run() on a fresh CUDA stream that the current one then waits for (warm-up before a capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        result = run()
    torch.cuda.current_stream().wait_stream(side)
    return result
