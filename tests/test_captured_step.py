"""The captured training step against a plain eager step: same losses, gradients and weights, step for step.

On the CPU the step runs without a graph (the code path captured on CUDA); the CUDA tests replay the graphs.
"""

import copy
import math
from contextlib import nullcontext
from functools import partial

import pytest
import torch
from pytorch_metric_learning import losses, miners

from captured_step import CapturedTrainStep, batch_hard_triplet_loss
from evaluation import autocast_context
from model import Embedder, load_backbone
from optimization import build_optimizer, warmup_cosine_schedule

IMAGE_SIZE = 32  # the tiny Swinv2: 8 x 8 tokens, window 4, a shifted (masked) block in stage 1
MARGIN = 0.1
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_embedder(device="cpu") -> Embedder:
    torch.manual_seed(0)
    return Embedder(load_backbone("tiny", IMAGE_SIZE), 8).to(device).train()  # drop_path 0.1: RNG in the step


def pk_batches(count: int, classes: int = 3, per_class: int = 2, device="cpu") -> list:
    """uint8 image batches, channels-last as the loaders give them, with P x K labels."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for step in range(count):
        images = torch.randint(0, 256, (classes * per_class, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8,
                               generator=generator).permute(0, 3, 1, 2)
        labels = torch.arange(classes).repeat_interleave(per_class) + 10 * step
        batches.append((images.to(device), labels.to(device)))
    return batches


def pml_batch_hard_loss(embeddings, labels):
    """PML's miner and loss: index tuples of data-dependent length (what a whole-step graph cannot hold)."""
    triplets = miners.BatchHardMiner()(embeddings, labels)
    return losses.TripletMarginLoss(margin=MARGIN)(embeddings, labels, triplets)


def static_loss(embeddings, labels):
    return batch_hard_triplet_loss(embeddings, labels, MARGIN)


def plain_steps(model, loss_fn, optimizer, scheduler, batches, grad_clip, autocast) -> list[float]:
    """The trainer's step without its checks: zero_grad, forward, loss, backward, clip, AdamW, schedule."""
    step_losses = []
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            embeddings = model(images)
        loss = loss_fn(embeddings, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        step_losses.append(loss.item())
    return step_losses


def captured_steps(step, scheduler, batches) -> list[float]:
    step_losses = []
    for images, labels in batches:
        result = step(images, labels)
        scheduler.step()
        step_losses.append(result.loss.item())
    return step_losses


def optimizer_pair(model, device, fused):
    optimizer = build_optimizer(model, 1e-3, 10.0, 0.05, torch.device(device))
    if fused is not None:
        for group in optimizer.param_groups:
            group["fused"] = fused  # the CPU has a fused AdamW too: the found_inf path, tested here
    return optimizer, warmup_cosine_schedule(optimizer, 10, 2)


def assert_same_training(reference_model, model, reference_losses, step_losses, tolerance=0.0):
    assert step_losses == pytest.approx(reference_losses, rel=tolerance, abs=tolerance)
    for (name, expected), got in zip(reference_model.named_parameters(), model.parameters(), strict=True):
        assert (expected - got).abs().max() <= tolerance * max(1.0, expected.abs().max()), name
        assert (expected.grad - got.grad).abs().max() <= tolerance * max(1.0, expected.grad.abs().max()), name


# --- the static-shape loss ---


@pytest.mark.parametrize("labels", [[0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0], [0, 1, 2, 3, 4, 5]],
                         ids=["pk", "a singleton class", "no negatives", "no positives"])
def test_batch_hard_triplet_loss_is_pmls_batch_hard_triplet_loss(labels):
    """float64, values and gradients; anchors without a positive or a negative add nothing in both."""
    torch.manual_seed(0)
    labels = torch.tensor(labels)
    embeddings = torch.randn(len(labels), 5, dtype=torch.float64, requires_grad=True)
    ours = batch_hard_triplet_loss(embeddings, labels, 0.5)
    (our_gradient,) = torch.autograd.grad(ours, embeddings)
    theirs = losses.TripletMarginLoss(margin=0.5)(embeddings, labels, miners.BatchHardMiner()(embeddings, labels))
    (their_gradient,) = torch.autograd.grad(theirs, embeddings, allow_unused=True)
    assert abs(ours.item() - theirs.item()) <= 1e-12
    their_gradient = torch.zeros_like(embeddings) if their_gradient is None else their_gradient
    assert (our_gradient - their_gradient).abs().max() <= 1e-12


def test_batch_hard_triplet_loss_mean_over_the_active_anchors_only():
    """1-D points: class 0 at 0 and 0.1, class 1 at 1 and 3 (normalisation off the table: 2-D, unit circle)."""
    angles = torch.tensor([0.0, 0.1, 1.0, 3.0])
    embeddings = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    distances = torch.cdist(embeddings, embeddings)
    # anchor 2's farthest positive (point 3) is farther than its nearest negative (point 1); the others are easy
    hinge = [max(0.0, (distances[a, p] - distances[a, n]).item() + MARGIN)
             for a, p, n in ((0, 1, 2), (1, 0, 2), (2, 3, 1), (3, 2, 1))]
    active = [h for h in hinge if h > 0]
    assert batch_hard_triplet_loss(embeddings, labels, MARGIN).item() == pytest.approx(sum(active) / len(active))


# --- the step on the CPU: the captured code path, run without a graph ---


@pytest.mark.parametrize("strategy, loss_fn", [("whole", static_loss), ("split", pml_batch_hard_loss)])
@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused adamw"])
def test_step_gives_the_plain_steps_losses_gradients_and_weights(strategy, loss_fn, fused):
    batches = pk_batches(3)
    reference = tiny_embedder()
    model = copy.deepcopy(reference)
    reference_optimizer, reference_schedule = optimizer_pair(reference, "cpu", fused)
    optimizer, schedule = optimizer_pair(model, "cpu", fused)
    torch.manual_seed(5)  # the blocks' drop-path draws
    expected = plain_steps(reference, loss_fn, reference_optimizer, reference_schedule, batches, 1.0, nullcontext)
    step = CapturedTrainStep(model, loss_fn, optimizer, nullcontext, grad_clip=1.0, strategy=strategy)
    assert not step.capture  # on the CPU: the step body as it is
    torch.manual_seed(5)
    got = captured_steps(step, schedule, batches)
    assert_same_training(reference, model, expected, got)
    assert optimizer.param_groups[0]["lr"] == reference_optimizer.param_groups[0]["lr"]


def test_bf16_autocast_step_gives_the_plain_steps_results():
    batches = pk_batches(2)
    reference = tiny_embedder()
    model = copy.deepcopy(reference)
    autocast = partial(autocast_context, torch.device("cpu"), "bf16", cache_enabled=False)
    reference_optimizer, reference_schedule = optimizer_pair(reference, "cpu", None)
    optimizer, schedule = optimizer_pair(model, "cpu", None)
    torch.manual_seed(5)
    expected = plain_steps(reference, static_loss, reference_optimizer, reference_schedule, batches, 1.0, autocast)
    torch.manual_seed(5)
    got = captured_steps(CapturedTrainStep(model, static_loss, optimizer, autocast, 1.0, "whole"), schedule, batches)
    assert_same_training(reference, model, expected, got)


def test_loss_fn_extras_come_back_with_the_step():
    model = tiny_embedder()
    optimizer, _ = optimizer_pair(model, "cpu", None)

    def loss_with_signals(embeddings, labels):
        loss = static_loss(embeddings, labels)
        return loss, {"doubled": 2 * loss.detach()}

    result = CapturedTrainStep(model, loss_with_signals, optimizer, nullcontext)(*pk_batches(1)[0])
    assert result.extras["doubled"].item() == pytest.approx(2 * result.loss.item())
    assert result.embeddings.shape == (6, 8) and not result.embeddings.requires_grad
    assert result.grad_norm.item() > 0


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused adamw"])
def test_a_non_finite_loss_leaves_weights_and_optimizer_state_as_they_were(fused):
    model = tiny_embedder()
    optimizer, _ = optimizer_pair(model, "cpu", fused)
    batches = pk_batches(2)
    step = CapturedTrainStep(model, static_loss, optimizer, nullcontext)
    step(*batches[0])
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(optimizer.state_dict()["state"])
    step.loss_fn = lambda embeddings, labels: static_loss(embeddings, labels) * math.nan
    result = step(*batches[1])
    assert math.isnan(result.loss.item())
    assert all(torch.equal(weights[name], value) for name, value in model.state_dict().items())
    after = optimizer.state_dict()["state"]
    assert all(torch.equal(state[i][key], after[i][key]) for i in state for key in state[i])  # step count included


def test_an_unknown_strategy_is_refused():
    model = tiny_embedder()
    optimizer, _ = optimizer_pair(model, "cpu", None)
    with pytest.raises(ValueError, match="strategy"):
        CapturedTrainStep(model, static_loss, optimizer, nullcontext, strategy="all")


# --- CUDA: the graphs themselves ---


def cuda_training_pair(strategy, loss_fn, precision, steps=6):
    """(reference losses, graphed losses, reference model, graphed model, step) on the GPU, drop-path off."""
    device = torch.device("cuda")
    batches = pk_batches(steps, device=device)
    reference = tiny_embedder(device)
    for module in reference.modules():
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0  # the graph draws its random numbers in another order than eager
    model = copy.deepcopy(reference)
    autocast = partial(autocast_context, device, precision, cache_enabled=False)
    reference_optimizer, reference_schedule = optimizer_pair(reference, "cuda", None)
    optimizer, schedule = optimizer_pair(model, "cuda", None)
    expected = plain_steps(reference, loss_fn, reference_optimizer, reference_schedule, batches, 1.0, autocast)
    step = CapturedTrainStep(model, loss_fn, optimizer, autocast, 1.0, strategy, warmup_steps=2)
    got = captured_steps(step, schedule, batches)
    return expected, got, reference, model, step


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("strategy, loss_fn", [("whole", static_loss), ("split", pml_batch_hard_loss)])
def test_cuda_graphed_step_trains_as_the_plain_step(strategy, loss_fn, precision):
    expected, got, reference, model, step = cuda_training_pair(strategy, loss_fn, precision)
    assert step.capture and (step.graph is not None if strategy == "whole" else step.graphed_forward.graphed is not None)
    assert_same_training(reference, model, expected, got, tolerance=1e-4 if precision == "fp32" else 2e-2)


@needs_cuda
def test_cuda_whole_step_with_a_syncing_loss_warns_and_trains_without_the_graph():
    with pytest.warns(UserWarning, match="capturing the training step"):
        expected, got, reference, model, step = cuda_training_pair("whole", pml_batch_hard_loss, "fp32", steps=4)
    assert not step.capture and step.graph is None
    assert_same_training(reference, model, expected, got, tolerance=1e-4)


# --- train.capture_step: the trainer's own step around GraphedForward ---


def test_capture_step_with_fp16_is_refused_before_any_work():
    from config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.capture_step.*bf16 or fp32"):
        load_config(None, ["train.capture_step=true", "train.precision=fp16"])
    assert load_config(None, ["train.capture_step=true", "train.precision=bf16"]).train.capture_step is True


def trainer_losses(model, batches, capture_step: bool, precision: str) -> tuple[list[float], "Trainer"]:
    """Trainer.train_step over the batches (PML's triplet loss on batch-hard triplets, as the defaults)."""
    from pathlib import Path

    from objective import MetricLearningObjective
    from trainer import Trainer

    device = next(model.parameters()).device
    optimizer, scheduler = optimizer_pair(model, device.type, None)
    objective = MetricLearningObjective("triplet", "batchhard", config_values={"train.margin": MARGIN})
    trainer = Trainer(model, objective, optimizer, scheduler, None, None, device, precision, 1.0, 1, 0, Path("."),
                      None, 0, {}, capture_step=capture_step)
    return [trainer.train_step(images, labels)[0] for images, labels in batches], trainer


def test_capture_step_on_the_cpu_runs_the_plain_step():
    """No graph off CUDA: the same losses and weights, bit for bit, as train.capture_step=false."""
    batches = pk_batches(3)
    reference, model = tiny_embedder(), tiny_embedder()
    torch.manual_seed(5)
    expected, _ = trainer_losses(reference, batches, False, "fp32")
    torch.manual_seed(5)
    got, trainer = trainer_losses(model, batches, True, "fp32")
    assert trainer.forward.graphed is None and not trainer.forward.capture
    assert_same_training(reference, model, expected, got)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_trainer_with_capture_step_trains_as_without(precision):
    """The trainer's step with its forward and backward replayed from CUDA graphs (drop-path off: the graph
    draws its random numbers in another order) against the same step uncaptured."""
    batches = pk_batches(5, device="cuda")
    reference, model = tiny_embedder("cuda"), tiny_embedder("cuda")
    for module in [*reference.modules(), *model.modules()]:
        if hasattr(module, "drop_prob"):
            module.drop_prob = 0.0
    expected, _ = trainer_losses(reference, batches, False, precision)
    got, trainer = trainer_losses(model, batches, True, precision)
    assert trainer.forward.graphed is not None  # captured at the first step, replayed at the others
    assert_same_training(reference, model, expected, got, tolerance=1e-4 if precision == "fp32" else 2e-2)
