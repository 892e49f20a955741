"""Swinv2 window attention through `torch.nn.functional.scaled_dot_product_attention`.

transformers' `Swinv2SelfAttention` is eager only: it materialises the (windows, heads, tokens, tokens)
score tensor several times in float32. `use_sdpa_attention` switches every such module of a model to
`SdpaSwinv2SelfAttention`, a subclass with the same parameters and buffers (so pretrained state dicts
load strictly, before or after the switch) whose forward calls SDPA instead:

    softmax(normalize(q) @ normalize(k)^T * logit_scale + bias + mask) @ v
      == sdpa(normalize(q) * logit_scale, normalize(k), v, attn_mask=bias + mask, scale=1.0)

On CUDA the call runs PyTorch's memory-efficient kernel, the one fused kernel that takes a float mask
with a gradient (flash and cuDNN refuse it); bench/attention_bench.py measures the gain.

Only attributes present since Swinv2 entered transformers are used (query, key, value, logit_scale,
continuous_position_bias_mlp, relative_coords_table, relative_position_index, dropout, window_size,
num_attention_heads, attention_head_size, all_head_size).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.swinv2.modeling_swinv2 import Swinv2SelfAttention

# Swinv2 clamps the learnt per-head temperature at 1 / 0.01 (logit_scale <= log(100)).
MAX_LOGIT_SCALE = math.log(1.0 / 0.01)


class SdpaSwinv2SelfAttention(Swinv2SelfAttention):
    """Swinv2SelfAttention with the same weights, computed by scaled_dot_product_attention.

    Not built directly: `use_sdpa_attention` changes the class of existing modules. With
    `output_attentions=True` it runs the eager forward, because SDPA does not return probabilities.
    """

    def relative_position_bias(self) -> torch.Tensor:
        """Continuous relative-position bias, (heads, tokens, tokens), tokens = window_h * window_w.

        Recomputed every call, as in the eager module: it depends on the cpb MLP's parameters.
        """
        tokens = self.window_size[0] * self.window_size[1]
        table = self.continuous_position_bias_mlp(self.relative_coords_table).view(-1, self.num_attention_heads)
        bias = table[self.relative_position_index.view(-1)].view(tokens, tokens, -1)  # (T, T, nH)
        # Contiguous: the fused GPU kernels refuse a mask whose last dimension has a stride other than 1.
        return 16 * torch.sigmoid(bias.permute(2, 0, 1).contiguous())  # (nH, T, T)

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
            switched += 1
    return switched
