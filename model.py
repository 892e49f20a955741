"""The embedding model: a transformers Swinv2Model, an optional linear projection, L2 normalisation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Swinv2Config, Swinv2Model

TINY_BACKBONE = "tiny"
EXPORTED_HEAD_FILE = "projection.safetensors"  # the projection head in a folder written by --mode export
# Swinv2 checkpoints on the hub are trained with ImageNet's normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneLoadError(RuntimeError):
    """The backbone could not be built or loaded; the message says what to do."""


def tiny_backbone_config(image_size: int) -> Swinv2Config:
    """A small random Swinv2 (0.6 M parameters, 128-d pooled output) for tests and the CPU demo."""
    return Swinv2Config(
        image_size=image_size, patch_size=4, embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8], window_size=4
    )


def hub_unreachable_reason(timeout_s: float = 3.0) -> str | None:
    """Why the hub cannot be reached, or None when it answers; without this, from_pretrained retries for ~25 s.

    One HEAD to the endpoint through huggingface_hub's own HTTP client, the one from_pretrained downloads
    with: HF_ENDPOINT, HTTPS_PROXY / HTTP_PROXY / NO_PROXY and a custom client factory apply as they do
    there. Any HTTP answer, whatever its status, counts as reachable. Offline mode (HF_HUB_OFFLINE)
    answers at once, without a request.
    """
    from huggingface_hub import constants, get_session

    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES:
        return "offline mode: HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout_s, follow_redirects=False)
    except Exception as error:  # noqa: BLE001 - whatever the HTTP backend raises, no answer came: say why
        return f"{constants.ENDPOINT}: {type(error).__name__}: {error}"
    return None


def load_backbone(name: str, image_size: int) -> Swinv2Model:
    """Build or load the Swinv2 backbone.

    Args:
        name: `tiny` (random weights, see tiny_backbone_config), a local directory saved by
            `save_pretrained` / downloaded from the hub, or a hub id such as
            `microsoft/swinv2-base-patch4-window16-256` (cached copies are used first).
        image_size: input resolution; used by `tiny` only (pretrained models keep their own).

    Raises:
        BackboneLoadError within seconds when the weights are neither local nor reachable.
    """
    if name == TINY_BACKBONE:
        return Swinv2Model(tiny_backbone_config(image_size))
    if Path(name).is_dir():
        try:
            return Swinv2Model.from_pretrained(name)
        except (OSError, ValueError) as error:
            raise BackboneLoadError(f"model.backbone '{name}' is a folder but not a Swinv2 checkpoint: {error}") from None
    try:
        return Swinv2Model.from_pretrained(name, local_files_only=True)
    except OSError:
        pass  # not cached: try the hub, if it answers at all
    how_to_fix = (
        f"on a machine with internet run `hf download {name} --local-dir models_ckpt/{name.split('/')[-1]}`, "
        f"copy that folder here, and set model.backbone=models_ckpt/{name.split('/')[-1]} "
        f"(or model.backbone=tiny for a small random model)"
    )
    unreachable = hub_unreachable_reason()
    if unreachable is not None:
        raise BackboneLoadError(f"cannot load backbone '{name}': not in the local cache and the hub is unreachable "
                                f"({unreachable}); {how_to_fix}")
    try:
        return Swinv2Model.from_pretrained(name)
    except OSError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise BackboneLoadError(f"cannot load backbone '{name}': {first_line}; {how_to_fix}") from None


def backbone_normalisation(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for input normalisation: a local folder's preprocessor_config.json, else ImageNet's."""
    processor_file = Path(name) / "preprocessor_config.json"
    if processor_file.is_file():
        settings = json.loads(processor_file.read_text())
        if "image_mean" in settings and "image_std" in settings:
            return tuple(settings["image_mean"]), tuple(settings["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


class Embedder(nn.Module):
    """Images -> L2-normalised embeddings.

    pixel_values (B, 3, H, W) -> Swinv2 pooled output (B, hidden) -> Linear (B, embedding_dim), when
    embedding_dim > 0 -> L2 normalisation. uint8 input (what the data loaders produce) is converted
    and normalised here, on the device, with the backbone's mean and std; float input is taken as
    already normalised. Output is float32 unit vectors whatever the autocast dtype, so distances and
    losses downstream are computed at full precision.
    """

    def __init__(self, backbone: Swinv2Model, embedding_dim: int, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.projection = nn.Linear(hidden, embedding_dim) if embedding_dim > 0 else nn.Identity()
        self.embedding_dim = embedding_dim if embedding_dim > 0 else hidden
        self.input_mean, self.input_std = list(mean), list(std)
        # (x / 255 - mean) / std = x * scale + shift; not persistent: checkpoints store mean/std as numbers.
        std_tensor = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("input_scale", 1.0 / (255.0 * std_tensor), persistent=False)
        self.register_buffer("input_shift", -torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) / std_tensor,
                             persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dtype == torch.uint8:
            # The loaders' batches are laid out channels-last (cheaper to collate); the backbone runs in the
            # usual layout, the one measured by bench/train_bench.py. A copy of uint8 pixels, on the device.
            pixel_values = pixel_values.contiguous().float() * self.input_scale + self.input_shift
        pooled = self.backbone(pixel_values=pixel_values).pooler_output  # (B, hidden)
        return F.normalize(self.projection(pooled).float(), dim=-1)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.projection.parameters())


def build_embedder(backbone_name: str, image_size: int, embedding_dim: int) -> Embedder:
    """The model for training or for `--checkpoint none` evaluation (weights as loaded).

    A folder written by `--mode export` brings its projection head too (`projection.safetensors`), which
    must have `embedding_dim` rows.
    """
    mean, std = backbone_normalisation(backbone_name)
    model = Embedder(load_backbone(backbone_name, image_size), embedding_dim, mean, std)
    head_file = Path(backbone_name) / EXPORTED_HEAD_FILE
    if backbone_name != TINY_BACKBONE and head_file.is_file():
        from safetensors.torch import load_file

        head = load_file(head_file)
        if embedding_dim != head["weight"].shape[0]:
            raise BackboneLoadError(f"model.backbone '{backbone_name}' is an export with a {head['weight'].shape[0]}-d "
                                    f"projection head; set model.embedding_dim={head['weight'].shape[0]}")
        model.projection.load_state_dict(head)  # strict: weight and bias
    return model


def embedder_from_backbone_config(backbone_config: dict, embedding_dim: int, mean=IMAGENET_MEAN,
                                  std=IMAGENET_STD) -> Embedder:
    """The architecture stored in a checkpoint, with random weights, ready for `load_state_dict`.

    No download: the checkpoint carries the backbone's config, and its weights replace these.
    """
    return Embedder(Swinv2Model(Swinv2Config.from_dict(backbone_config)), embedding_dim, mean, std)


def apply_speed_options(model: Embedder, attention: str = "eager", grad_checkpointing: bool = False,
                        compile_backbone: bool = False, compile_backend="inductor") -> Embedder:
    """Switches that change speed and memory, never the weights or the state_dict keys.

    Always: each shifted Swinv2 layer's window mask is built once and kept on the model's device.
    attention `sdpa`: transformers' eager Swinv2 attention replaced by a numerically equivalent
    scaled_dot_product_attention module (swinv2_attention.py); `flex`: the same through flex_attention, one
    fused kernel with the position bias and shift mask computed inside it. grad_checkpointing: recompute block
    activations in the backward pass. compile_backbone: torch.compile, in place (Module.compile keeps
    the parameter names, so checkpoints stay interchangeable). compile_backend: torch.compile's backend;
    tests use "aot_eager" (the same graph capture and autograd tracing, without inductor's minutes of code
    generation on a CPU).
    """
    from swinv2_attention import (cache_shift_masks, enable_activation_checkpointing, use_flex_attention,
                                  use_sdpa_attention)

    cache_shift_masks(model.backbone)  # same mask, built once: no per-forward host copy (CUDA graphs need that)
    if attention == "sdpa":
        use_sdpa_attention(model.backbone)
    elif attention == "flex":
        use_flex_attention(model.backbone)
    if grad_checkpointing:
        enable_activation_checkpointing(model.backbone)
    if compile_backbone:
        model.backbone.compile(backend=compile_backend)
    return model
