"""Swinv2 window attention through `torch.nn.functional.scaled_dot_product_attention`.

Supported transformers versions: 5.17.0 (the GPU figures were measured with it) to 5.24.0 (requirements.txt).
This module owns all coupling to transformers internals: the `__class__` swaps of Swinv2SelfAttention and
Swinv2Layer, the attributes read from them (SELF_ATTENTION_ATTRIBUTES), the `get_attn_mask` signature probe,
the stand-in config for a small Swinv2SelfAttention, and the activation-checkpointing method's name.
tests/test_swinv2_attention.py fails when a release breaks one of them, or gives Swinv2 native SDPA.

transformers' `Swinv2SelfAttention` is eager only: it materialises the (windows, heads, tokens, tokens)
score tensor several times in float32. `use_sdpa_attention` switches every such module of a model to
`SdpaSwinv2SelfAttention`, a subclass with the same parameters and buffers (so pretrained state dicts
load strictly, before or after the switch) whose forward calls SDPA instead:

    softmax(normalize(q) @ normalize(k)^T * logit_scale + bias + mask) @ v
      == sdpa(normalize(q) * logit_scale, normalize(k), v, attn_mask=bias + mask, scale=1.0)

On CUDA the call runs PyTorch's memory-efficient kernel, the one fused kernel that takes a float mask
with a gradient (flash and cuDNN refuse it); bench/attention_bench.py measures the gain.

The continuous position bias is gathered from its ((2Wh-1)(2Ww-1), heads) table by `RelativePositionGather`,
whose backward sums the (heads, T, T) gradient along the window's relative offsets with two small one-hot
contractions instead of a scatter-add. Under torch.compile, inductor fused the scatter-add with the
batch reduction of the mask gradient into one kernel that took 1.65 ms per stage-3 block, 20% of a
Swinv2-B training step on an H200 (bench/profile_step.py).

Only attributes present since Swinv2 entered transformers are used (SELF_ATTENTION_ATTRIBUTES).
"""

from __future__ import annotations

import inspect
import math
import warnings
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer, Swinv2SelfAttention

# Swinv2 clamps the learnt per-head temperature at 1 / 0.01 (logit_scale <= log(100)).
MAX_LOGIT_SCALE = math.log(1.0 / 0.01)
# What SdpaSwinv2SelfAttention reads of transformers' module (tests check that they exist).
SELF_ATTENTION_ATTRIBUTES = ("query", "key", "value", "logit_scale", "continuous_position_bias_mlp",
                             "relative_coords_table", "relative_position_index", "dropout", "window_size",
                             "num_attention_heads", "attention_head_size", "all_head_size")


def attn_mask_takes_device(get_attn_mask) -> bool:
    """Whether get_attn_mask takes `device`: from 5.18 it builds the mask there; 5.17 builds it on the host."""
    return "device" in inspect.signature(get_attn_mask).parameters


MASK_BUILT_ON_DEVICE = attn_mask_takes_device(Swinv2Layer.get_attn_mask)


def enable_activation_checkpointing(backbone: nn.Module) -> None:
    """Recompute each Swinv2 block's activations in the backward pass, by the name this transformers has."""
    # 5.24: activation_checkpointing_enable (the old name warns; gone in v6). 5.17-5.18: the old name only.
    enable = getattr(backbone, "activation_checkpointing_enable", None) or backbone.gradient_checkpointing_enable
    enable()


def offset_one_hot(size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(size, size, 2 * size - 1): entry [a, b, p] is 1 where a - b + size - 1 == p (token offset p)."""
    positions = torch.arange(size, device=device)
    offsets = positions[:, None] - positions[None, :] + size - 1
    return (offsets[:, :, None] == torch.arange(2 * size - 1, device=device)).to(dtype)


def separable_relative_position_index(window_size: tuple[int, int]) -> torch.Tensor:
    """Swinv2's (T, T) index into the bias table, T = Wh * Ww, tokens in row-major order:
    (yi - yj + Wh - 1) * (2 Ww - 1) + (xi - xj + Ww - 1)."""
    window_h, window_w = window_size
    y, x = torch.meshgrid(torch.arange(window_h, device="cpu"), torch.arange(window_w, device="cpu"), indexing="ij")
    y, x = y.flatten(), x.flatten()
    return (y[:, None] - y[None, :] + window_h - 1) * (2 * window_w - 1) + (x[:, None] - x[None, :] + window_w - 1)


class RelativePositionGather(torch.autograd.Function):
    """table[separable_relative_position_index(window)] laid out (heads, T, T), with a scatter-free backward.

    The table gradient for offset (dy, dx) is the sum of the (heads, T, T) gradient over all token pairs
    at that offset. The offsets separate into rows and columns, so the sum is two contractions with
    small one-hot matrices (Ww^2 x (2Ww-1), then Wh^2 x (2Wh-1)), computed in float32 at least. The output
    is heads-major and contiguous, the layout SDPA's mask needs, so the incoming gradient (the mask
    gradient summed over the batch) is read in the order it is produced.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor, window_h: int, window_w: int) -> torch.Tensor:
        ctx.window, ctx.table_dtype = (window_h, window_w), table.dtype
        tokens = window_h * window_w
        return table[index.view(-1)].view(tokens, tokens, table.shape[-1]).permute(2, 0, 1).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        window_h, window_w = ctx.window
        heads = grad.shape[0]
        dtype = torch.promote_types(grad.dtype, torch.float32)
        # A backward called inside autocast would otherwise run the contractions in bf16.
        with torch.autocast(grad.device.type, enabled=False):
            grad = grad.to(dtype).reshape(heads, window_h, window_w, window_h, window_w)  # [h, yi, xi, yj, xj]
            rows = offset_one_hot(window_h, dtype, grad.device)
            columns = offset_one_hot(window_w, dtype, grad.device)
            by_column_offset = torch.einsum("hawbv,wvq->habq", grad, columns)
            table_grad = torch.einsum("habq,abp->pqh", by_column_offset, rows)
        return table_grad.reshape(-1, heads).to(ctx.table_dtype), None, None, None


class SdpaSwinv2SelfAttention(Swinv2SelfAttention):
    """Swinv2SelfAttention with the same weights, computed by scaled_dot_product_attention.

    Not built directly: `use_sdpa_attention` changes the class of existing modules. With
    `output_attentions=True` it runs the eager forward, because SDPA does not return probabilities.
    """

    # Set per module by use_sdpa_attention: whether relative_position_index has the layout that
    # RelativePositionGather's backward assumes.
    separable_index: bool = False

    def relative_position_bias(self) -> torch.Tensor:
        """Continuous relative-position bias, (heads, tokens, tokens), tokens = window_h * window_w.

        Recomputed every call, as in the eager module: it depends on the cpb MLP's parameters.
        """
        tokens = self.window_size[0] * self.window_size[1]
        table = self.continuous_position_bias_mlp(self.relative_coords_table).view(-1, self.num_attention_heads)
        if self.separable_index:
            bias = RelativePositionGather.apply(table, self.relative_position_index, *self.window_size)
        else:  # an index laid out otherwise than today's transformers: the plain gather, scatter-add backward
            bias = table[self.relative_position_index.view(-1)].view(tokens, tokens, -1).permute(2, 0, 1)
        # Contiguous: the fused GPU kernels refuse a mask whose last dimension has a stride other than 1.
        return 16 * torch.sigmoid(bias.contiguous())  # (nH, T, T)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
    ) -> tuple[torch.Tensor]:
        """hidden_states (batch * windows, tokens, channels); attention_mask (windows, tokens, tokens) or None.

        Windows are laid out batch-major (image b, window w at row b * windows + w), as Swinv2Layer
        partitions them. Returns a 1-tuple (batch * windows, tokens, channels), or the eager module's
        (context, probabilities) when output_attentions is set.
        """
        if output_attentions:
            return super().forward(hidden_states, attention_mask, output_attentions=True)
        batch_windows, tokens, channels = hidden_states.shape
        heads, head_dim = self.num_attention_heads, self.attention_head_size
        windows = attention_mask.shape[0] if attention_mask is not None else 1
        batch = batch_windows // windows

        # Windows are folded into the head axis, (B, nW * nH, T, hd), so that the per-window mask
        # (nW, nH, T, T) broadcasts over the batch instead of being copied B times.
        def split_heads(projected: torch.Tensor) -> torch.Tensor:
            return projected.view(batch, windows, tokens, heads, head_dim).permute(0, 1, 3, 2, 4)  # (B, nW, nH, T, hd)

        logit_scale = torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()  # (nH, 1, 1)
        value = split_heads(self.value(hidden_states))
        # Under autocast the fp32 logit_scale promotes the queries to fp32; SDPA needs one dtype.
        query = (F.normalize(split_heads(self.query(hidden_states)), dim=-1) * logit_scale).to(value.dtype)
        key = F.normalize(split_heads(self.key(hidden_states)), dim=-1)

        bias = self.relative_position_bias().unsqueeze(0)  # (1, nH, T, T)
        if attention_mask is not None:
            # The eager module adds the shift mask twice (0 / -200 rather than 0 / -100); match it.
            bias = bias + 2 * attention_mask.unsqueeze(1)  # (nW, nH, T, T)

        fold = (batch, windows * heads, tokens, head_dim)
        context = F.scaled_dot_product_attention(
            query.reshape(fold),
            key.reshape(fold),
            value.reshape(fold),
            attn_mask=bias.reshape(1, windows * heads, tokens, tokens).to(value.dtype),
            dropout_p=self.dropout.p if self.training else 0.0,
            scale=1.0,
        )  # (B, nW * nH, T, hd)
        context = context.view(batch, windows, heads, tokens, head_dim).permute(0, 1, 3, 2, 4)  # (B, nW, T, nH, hd)
        return (context.reshape(batch_windows, tokens, channels),)


def use_sdpa_attention(model: nn.Module) -> int:
    """Switch every Swinv2SelfAttention inside `model` to SdpaSwinv2SelfAttention, in place.

    Only the modules' class changes: parameters, buffers, state-dict keys, optimiser references and
    hooks stay as they are. Works on a Swinv2Model or anything containing one (e.g. model.Embedder).

    Returns:
        the number of modules switched by this call; 0 when there are none or all already use SDPA.
    """
    switched = 0
    for module in model.modules():
        if type(module) is Swinv2SelfAttention:
            module.__class__ = SdpaSwinv2SelfAttention
            module.separable_index = has_separable_index(module)
            switched += 1
    return switched


def has_separable_index(module: Swinv2SelfAttention) -> bool:
    """Whether the module's relative_position_index is `separable_relative_position_index` of its window.

    A module built on the meta device has no index values yet; transformers fills the buffer later with the
    code that builds it at construction, so a small module built on the CPU with the same window stands in.
    Any other layout keeps the plain gather (correct, with the scatter-add backward) and says so once.
    """
    window = tuple(module.window_size)
    index = module.relative_position_index
    if index.is_meta:
        try:
            with torch.device("cpu"):  # 5.17-5.24: the constructor reads only these two config fields
                settings = SimpleNamespace(qkv_bias=True, attention_probs_dropout_prob=0.0)
                index = Swinv2SelfAttention(settings, 1, 1, list(window)).relative_position_index
        except Exception:  # noqa: BLE001 - another transformers' constructor: keep the plain gather
            index = None
    expected = separable_relative_position_index(window)
    if index is not None and index.shape == expected.shape and torch.equal(index.cpu(), expected):
        return True
    warnings.warn("Swinv2 relative_position_index has a layout the SDPA attention's fast bias gradient does not "
                  "recognise: using the plain gather (same results, slower backward under torch.compile)",
                  stacklevel=3)
    return False


class CachedMaskSwinv2Layer(Swinv2Layer):
    """Swinv2Layer whose shifted-window mask is built once, at its input resolution, and kept on the layer's device.

    transformers rebuilds the mask in every forward of every shifted layer; up to 5.17 it does so on the
    host and copies it to the GPU, a blocking copy (a stream synchronisation) in 11 layers of each
    Swinv2-B forward, which a CUDA graph capture refuses outright. The cache is a non-persistent buffer:
    it moves with the module and stays out of the state dict. Other input sizes use transformers' own mask.
    Switch layers whose weights exist: on the meta device they are left as they are, and a model moved to
    meta and back with `to_empty` would keep an uninitialised cache (load_state_dict does not fill it).
    """

    shift_mask_key: tuple = ()  # (height_pad, width_pad, window_size, shift_size) the cached mask is for

    def get_attn_mask(self, height, width, dtype, device=None):
        cached = getattr(self, "cached_shift_mask", None)
        if cached is None or (height, width, self.window_size, self.shift_size) != self.shift_mask_key:
            if MASK_BUILT_ON_DEVICE:
                return super().get_attn_mask(height, width, dtype, device=device)
            return super().get_attn_mask(height, width, dtype)  # on the host; the caller moves it
        return cached if cached.dtype == dtype else cached.to(dtype)


def cache_shift_masks(model: nn.Module) -> int:
    """Switch every Swinv2Layer with a shifted window inside `model` to CachedMaskSwinv2Layer, in place.

    Returns the number of layers switched by this call (layers without a shift have no mask to cache).
    """
    switched = 0
    for module in model.modules():
        if type(module) is not Swinv2Layer or module.shift_size <= 0:
            continue
        height, width = module.input_resolution
        window = module.window_size
        # transformers pads the feature map to whole windows (Swinv2Layer.maybe_pad) before the mask is made
        key = (math.ceil(height / window) * window, math.ceil(width / window) * window, window, module.shift_size)
        device = next(module.parameters()).device
        if device.type == "meta":  # no values to compute with yet: leave transformers' mask
            continue
        # A plain tensor even when called under inference_mode, so that training can use it too.
        with torch.inference_mode(False), torch.no_grad():
            mask = Swinv2Layer.get_attn_mask(module, key[0], key[1], torch.float32).to(device)
        module.__class__ = CachedMaskSwinv2Layer
        module.shift_mask_key = key
        module.register_buffer("cached_shift_mask", mask, persistent=False)
        switched += 1
    return switched
