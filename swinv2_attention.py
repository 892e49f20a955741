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

`use_flex_attention` switches them to `FlexSwinv2SelfAttention` instead (`model.attention=flex`): the same
maths through `torch.nn.attention.flex_attention`, one fused kernel on CUDA that reads no dense bias or mask.
Its `score_mod` adds the position bias from the ((2Wh-1)(2Ww-1), heads) table at each (head, query, key)'s
relative offset; in shifted layers a block mask built from each token's region of the window stands for the
shift mask. It falls back to the SDPA forward, with one warning, where flex_attention cannot serve.

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
        batch_windows, tokens, _ = hidden_states.shape
        heads, head_dim = self.num_attention_heads, self.attention_head_size
        windows = attention_mask.shape[0] if attention_mask is not None else 1
        query, key, value = self.scaled_query_key_value(hidden_states, windows)

        bias = self.relative_position_bias().unsqueeze(0)  # (1, nH, T, T)
        if attention_mask is not None:
            # The eager module adds the shift mask twice (0 / -200 rather than 0 / -100); match it.
            bias = bias + 2 * attention_mask.unsqueeze(1)  # (nW, nH, T, T)

        fold = (batch_windows // windows, windows * heads, tokens, head_dim)
        context = F.scaled_dot_product_attention(
            query.reshape(fold),
            key.reshape(fold),
            value.reshape(fold),
            attn_mask=bias.reshape(1, windows * heads, tokens, tokens).to(value.dtype),
            dropout_p=self.dropout.p if self.training else 0.0,
            scale=1.0,
        )  # (B, nW * nH, T, hd)
        return (self.merge_heads(context, windows),)

    def scaled_query_key_value(self, hidden_states: torch.Tensor, windows: int):
        """(normalize(q) * logit_scale, normalize(k), v), each (B, nW, nH, T, hd), in v's dtype.

        hidden_states (B * nW, T, C), windows batch-major. Windows go beside the heads so that, folded into one
        axis (B, nW * nH, T, hd), a per-window mask or block mask broadcasts over the batch instead of being
        copied B times.
        """
        batch_windows, tokens, _ = hidden_states.shape

        def split_heads(projected: torch.Tensor) -> torch.Tensor:
            return projected.view(batch_windows // windows, windows, tokens, self.num_attention_heads,
                                  self.attention_head_size).permute(0, 1, 3, 2, 4)  # (B, nW, nH, T, hd)

        logit_scale = torch.clamp(self.logit_scale, max=MAX_LOGIT_SCALE).exp()  # (nH, 1, 1)
        value = split_heads(self.value(hidden_states))
        # Under autocast the fp32 logit_scale promotes the queries to fp32; the kernels need one dtype.
        query = (F.normalize(split_heads(self.query(hidden_states)), dim=-1) * logit_scale).to(value.dtype)
        key = F.normalize(split_heads(self.key(hidden_states)), dim=-1).to(value.dtype)
        return query, key, value

    def merge_heads(self, context: torch.Tensor, windows: int) -> torch.Tensor:
        """(B, nW * nH, T, hd) -> (B * nW, T, C), the layout the module takes and returns."""
        batch, _, tokens, head_dim = context.shape
        context = context.view(batch, windows, self.num_attention_heads, tokens, head_dim).permute(0, 1, 3, 2, 4)
        return context.reshape(batch * windows, tokens, self.all_head_size)  # from (B, nW, T, nH, hd)


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


# --- flex_attention: the window attention as one fused kernel (model.attention=flex) ---

try:  # the names used here exist, with these signatures, from torch 2.5 to 2.14
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # an older torch: use_flex_attention switches to SDPA instead
    create_block_mask = flex_attention = None

# torch refuses FlexAttention's backward on these devices (2.11-2.14: "does not support backward on CPU").
FLEX_NO_BACKWARD_DEVICES = frozenset({"cpu", "mps"})
# offsets: the score_mod reads the ((2Wh-1)(2Ww-1), heads) table at each score's relative offset, so the kernel's
# backward sums the table gradient straight into those entries. gathered: it reads the (heads, T, T) bias that
# the SDPA path builds (RelativePositionGather), whose gradient the kernel sums over batch and windows instead.
FLEX_BIAS_LAYOUTS = ("offsets", "gathered")
# Compiled flex_attention specialises on shapes: a Swinv2 has up to 2 per stage (with and without the shift
# mask), each for training and for inference and per batch size. Dynamo's default limit of 8 per function
# would send the rest to the unfused reference implementation.
FLEX_RECOMPILE_LIMIT = 64
_warned: set[str] = set()
_compiled_flex_attention = None


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def flex_kernel(device: torch.device):
    """flex_attention as it should run on `device`: the plain function inside a torch.compile region (the
    outer compile fuses it) and off CUDA (the CPU tests; eager flex_attention computes every score densely),
    else flex_attention compiled on its own, which is what makes it one fused kernel."""
    global _compiled_flex_attention
    if torch.compiler.is_compiling() or device.type != "cuda":
        return flex_attention
    if _compiled_flex_attention is None:
        dynamo_config = torch._dynamo.config
        for name in ("recompile_limit", "cache_size_limit"):  # the first name from torch 2.7, the second before
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), FLEX_RECOMPILE_LIMIT))
                break
        _compiled_flex_attention = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex_attention


def shift_window_block_mask(attention_mask: torch.Tensor, heads: int):
    """A BlockMask equal to Swinv2's additive shift mask, for scores laid out (batch, windows * heads, T, T).

    attention_mask: (windows, T, T), 0 where query and key lie in the same region of the shifted map, -100 where
    not. Each token's region is named by the first token of its window in the same region, so the block mask
    reads two (windows, T) rows per score instead of a dense mask. Eager Swinv2 adds the mask twice (-200): a
    masked weight there is below e^-184 of the largest (cosine scores are within +-100, the bias within 0..16),
    so masking exactly changes nothing in float64.
    """
    windows, tokens, _ = attention_mask.shape
    regions = (attention_mask == 0).to(torch.int32).argmax(dim=-1)  # (nW, T): first token of the same region

    def same_region(batch, head, query_index, key_index):
        window = head // heads
        return regions[window, query_index] == regions[window, key_index]

    return create_block_mask(same_region, 1, windows * heads, tokens, tokens, device=attention_mask.device)


class FlexSwinv2SelfAttention(SdpaSwinv2SelfAttention):
    """Swinv2SelfAttention with the same weights, computed by flex_attention.

    Not built directly: `use_flex_attention` changes the class of existing modules. The SDPA forward serves
    instead where flex_attention cannot: `output_attentions` (the eager forward), attention dropout in training
    (flex_attention has none), a backward on the CPU (torch refuses it), or a kernel that failed (warned once).
    """

    bias_layout: str = "offsets"  # one of FLEX_BIAS_LAYOUTS, set per module by use_flex_attention
    flex_failed: bool = False

    def flex_unusable_reason(self, hidden_states: torch.Tensor) -> str | None:
        if self.flex_failed:
            return "flex_attention failed earlier"
        if self.training and self.dropout.p > 0:
            return "flex_attention has no attention dropout"
        device = hidden_states.device.type
        if device in FLEX_NO_BACKWARD_DEVICES and torch.is_grad_enabled() and (
                hidden_states.requires_grad or self.query.weight.requires_grad):
            return f"torch has no FlexAttention backward on {device}"
        return None

    def position_score_mod(self):
        """score_mod adding the continuous position bias to each (batch, windows * heads, query, key) score.

        The bias is made float32 at least before the kernel reads it: the kernel adds it to float32 scores, and
        its backward accumulates the bias gradient in the bias's dtype, over every batch row and window.
        """
        heads = self.num_attention_heads
        if self.bias_layout == "offsets" and self.separable_index:
            window_h, window_w = self.window_size
            table = self.continuous_position_bias_mlp(self.relative_coords_table).view(-1, heads)
            table = 16 * torch.sigmoid(table.to(torch.promote_types(table.dtype, torch.float32)))  # (offsets, nH)

            def add_bias(score, batch, head, query_index, key_index):
                # separable_relative_position_index, computed from the two tokens' rows and columns
                row_offset = query_index // window_w - key_index // window_w + window_h - 1
                column_offset = query_index % window_w - key_index % window_w + window_w - 1
                return score + table[row_offset * (2 * window_w - 1) + column_offset, head % heads]
        else:
            bias = self.relative_position_bias()  # (nH, T, T)
            bias = bias.to(torch.promote_types(bias.dtype, torch.float32))

            def add_bias(score, batch, head, query_index, key_index):
                return score + bias[head % heads, query_index, key_index]
        return add_bias

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = False,
    ) -> tuple[torch.Tensor]:
        """As SdpaSwinv2SelfAttention.forward: (batch * windows, tokens, channels) in and out."""
        reason = None if output_attentions else self.flex_unusable_reason(hidden_states)
        if output_attentions or reason is not None:
            if reason is not None:
                warn_once(f"model.attention=flex: {reason}; those Swinv2 attention calls use SDPA")
            return super().forward(hidden_states, attention_mask, output_attentions)
        if torch.compiler.is_compiling():  # a failure there is the compile's, reported by it
            return (self.flex_forward(hidden_states, attention_mask),)
        try:
            return (self.flex_forward(hidden_states, attention_mask),)
        except Exception as error:  # noqa: BLE001 - e.g. no Triton for this GPU: SDPA computes the same
            self.flex_failed = True
            warn_once(f"model.attention=flex: flex_attention failed ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); using SDPA attention")
            return super().forward(hidden_states, attention_mask)

    def flex_forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        batch_windows, tokens, _ = hidden_states.shape
        heads, head_dim = self.num_attention_heads, self.attention_head_size
        windows = attention_mask.shape[0] if attention_mask is not None else 1
        query, key, value = self.scaled_query_key_value(hidden_states, windows)
        block_mask = shift_window_block_mask(attention_mask, heads) if attention_mask is not None else None
        fold = (batch_windows // windows, windows * heads, tokens, head_dim)
        context = flex_kernel(hidden_states.device)(
            query.reshape(fold), key.reshape(fold), value.reshape(fold), score_mod=self.position_score_mod(),
            block_mask=block_mask, scale=1.0)  # (B, nW * nH, T, hd)
        return self.merge_heads(context, windows)


def use_flex_attention(model: nn.Module, bias_layout: str = "offsets") -> int:
    """Switch every Swinv2 self-attention inside `model` (eager or SDPA) to FlexSwinv2SelfAttention, in place.

    As use_sdpa_attention, only the modules' class changes. bias_layout: one of FLEX_BIAS_LAYOUTS (also applied
    to modules already switched). Without flex_attention in this torch, switches to SDPA instead, with a warning.

    Returns:
        the number of modules switched by this call.
    """
    if bias_layout not in FLEX_BIAS_LAYOUTS:
        raise ValueError(f"bias_layout must be one of {FLEX_BIAS_LAYOUTS}, not {bias_layout!r}")
    if flex_attention is None:
        warn_once(f"model.attention=flex: torch {torch.__version__} has no flex_attention; using SDPA attention")
        return use_sdpa_attention(model)
    switched = 0
    for module in model.modules():
        if type(module) in (Swinv2SelfAttention, SdpaSwinv2SelfAttention):
            switched_before = type(module) is SdpaSwinv2SelfAttention
            separable = module.separable_index if switched_before else has_separable_index(module)
            module.__class__ = FlexSwinv2SelfAttention
            module.separable_index = separable
            switched += 1
        if isinstance(module, FlexSwinv2SelfAttention):
            module.bias_layout = bias_layout
    return switched


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
