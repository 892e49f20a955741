"""The optimiser and its learning-rate schedule: AdamW with weight decay chosen by parameter name, warmup + cosine."""

from __future__ import annotations

import math

import torch
from torch import nn

# Parameters kept free of weight decay, by a component of their dotted name, as timm does for SwinV2:
# the per-head attention temperature, the continuous-position-bias MLP (all of it), position tables and
# embeddings. Biases and LayerNorm parameters are matched separately (see no_weight_decay_names).
NO_DECAY_MODULES = frozenset({
    "logit_scale",
    "continuous_position_bias_mlp",
    "relative_position_bias_table",  # Swin v1 style; HF Swinv2 keeps its tables as buffers, not parameters
    "relative_coords_table",
    "position_embeddings",  # absolute position embedding (config.use_absolute_embeddings)
})


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names (as in `model.named_parameters()`) of the parameters that AdamW must not decay.

    Every bias (the projection head's included), every norm's weight and bias (a module whose name
    contains `norm`: HF Swinv2's `norm`, `layernorm`, `layernorm_before`, `layernorm_after`), and every
    parameter under a name in NO_DECAY_MODULES. Frozen parameters are listed too; the optimiser skips them.
    """
    excluded = set()
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if parts[-1] == "bias" or any("norm" in part for part in parts[:-1]) or NO_DECAY_MODULES.intersection(parts):
            excluded.add(name)
    return excluded


def build_optimizer(model: nn.Module, lr: float, head_lr_multiplier: float, weight_decay: float,
                    device: torch.device, loss_parameters=(), loss_lr: float = 0.0) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of a `model.Embedder`, in up to 4 groups, empty ones dropped:

    backbone decayed, backbone not decayed (no_weight_decay_names), head weight, head bias; the head
    (`model.head_parameters()`, the projection) at lr * head_lr_multiplier. Then, if there are any, the loss's
    own parameters (proxies, class weights) as a last group at loss_lr without weight decay. Fused on CUDA.
    """
    head_ids = {id(p) for p in model.head_parameters()}
    excluded = no_weight_decay_names(model)
    groups = {(in_head, decayed): [] for in_head in (False, True) for decayed in (True, False)}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            groups[id(parameter) in head_ids, name not in excluded].append(parameter)
    param_groups = [
        {"params": params, "lr": lr * head_lr_multiplier if in_head else lr,
         "weight_decay": weight_decay if decayed else 0.0}
        for (in_head, decayed), params in groups.items() if params
    ]
    loss_parameters = list(loss_parameters)
    if loss_parameters:
        param_groups.append({"params": loss_parameters, "lr": loss_lr, "weight_decay": 0.0})
    return torch.optim.AdamW(param_groups, fused=device.type == "cuda")


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    """Linear warmup from ~0 to the base learning rate, then cosine decay to 0 at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
