"""flex_attention Swinv2 attention against transformers' eager module: same weights, same numbers, same gradients.

torch (2.11-2.14) refuses FlexAttention's backward on the CPU with a device check, before any computation; its
eager implementation (the reference the compiled kernel is generated from: every score materialised, autograd
through score_mod and its captured tensors) computes the backward on the CPU all the same. The gradient tests
lift that check (fixture `flex_backward_on_cpu`) to compare in float64; CUDA runs the compiled kernel below.
"""

import copy

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex
from transformers import Swinv2Config, Swinv2Model

import swinv2_attention
from swinv2_attention import (FlexSwinv2SelfAttention, SdpaSwinv2SelfAttention, cache_shift_masks,
                              shift_window_block_mask, use_flex_attention, use_sdpa_attention)
from test_swinv2_attention import flat, output_and_gradients

# (image size, window, depths, heads): stage 1 shifted and masked in each, then
# tiny: 18x18 tokens padded to 20x20, windows of 4; window8: 16x16 tokens, 4 windows of 8 (stage 2: one, no
# shift); window16: 32x32 tokens, 4 windows of 16 (256 tokens, Swinv2-B's window), stage 2 one window.
CONFIGS = {"tiny": (72, 4, [2, 2, 2], [2, 4, 8]), "window8": (64, 8, [2, 2], [2, 4]),
           "window16": (128, 16, [2, 1], [2, 4])}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def flex_backward_on_cpu(monkeypatch):
    monkeypatch.setattr(torch_flex, "_validate_device", lambda *tensors: None)
    monkeypatch.setattr(swinv2_attention, "FLEX_NO_BACKWARD_DEVICES", frozenset())


@pytest.fixture(autouse=True)
def warnings_anew(monkeypatch):
    monkeypatch.setattr(swinv2_attention, "_warned", set())


def eager_and_flex(config: str, bias_layout: str = "offsets", **overrides) -> tuple[Swinv2Model, Swinv2Model]:
    """Two small Swinv2 models with identical weights, the second with flex attention and cached shift masks."""
    image_size, window_size, depths, heads = CONFIGS[config]
    torch.manual_seed(0)
    settings = dict(patch_size=4, embed_dim=16, depths=depths, num_heads=heads, drop_path_rate=0.0)
    eager = Swinv2Model(Swinv2Config(image_size=image_size, window_size=window_size, **(settings | overrides)))
    flex = copy.deepcopy(eager)
    cache_shift_masks(flex)
    assert use_flex_attention(flex, bias_layout) == sum(depths)
    return eager, flex


def shifted_block_and_input(config: str, dtype=torch.float64):
    """A shifted block's attention module (flex), its eager twin, its shift mask and a batch of 2 images' windows."""
    eager_model, flex_model = eager_and_flex(config)
    eager_model, flex_model = eager_model.to(dtype), flex_model.to(dtype)
    block = eager_model.encoder.layers[0].blocks[1]
    assert block.shift_size > 0
    padded = flex_model.encoder.layers[0].blocks[1].shift_mask_key[0]
    mask = block.get_attn_mask(padded, padded, dtype=dtype)  # (nW, T, T)
    windows, tokens, _ = mask.shape
    hidden = torch.randn(2 * windows, tokens, block.attention.self.all_head_size, dtype=dtype)
    return block.attention.self, flex_model.encoder.layers[0].blocks[1].attention.self, mask, hidden


def module_output_and_gradients(module, hidden, mask):
    """Output and the gradients of mean(output ** 2) with respect to the input and every parameter
    (query / key / value weights and biases, logit_scale, the position-bias MLP)."""
    module.zero_grad()
    inputs = hidden.clone().requires_grad_()
    context = module(inputs, mask)[0]
    context.square().mean().backward()
    return context.detach(), {"input": inputs.grad, **{name: p.grad.clone() for name, p in module.named_parameters()}}


# --- float64 against eager on the CPU: the maths, to rounding ---


@pytest.mark.parametrize("config, masked, bias_layout", [
    ("tiny", True, "offsets"), ("tiny", False, "offsets"), ("tiny", True, "gathered"), ("tiny", False, "gathered"),
    ("window8", True, "offsets")], ids=lambda value: {True: "shift mask", False: "no mask"}.get(value, value))
def test_float64_attention_module_matches_eager(flex_backward_on_cpu, config, masked, bias_layout):
    eager, flex, mask, hidden = shifted_block_and_input(config)
    flex.bias_layout = bias_layout
    mask = mask if masked else None  # unmasked, each of the 2 x nW windows is a batch row of its own
    eager_out, eager_grads = module_output_and_gradients(eager, hidden, mask)
    flex_out, flex_grads = module_output_and_gradients(flex, hidden, mask)
    assert (eager_out - flex_out).abs().max() <= 1e-12
    assert set(flex_grads) >= {"input", "query.weight", "key.weight", "value.weight", "logit_scale",
                               "continuous_position_bias_mlp.0.weight", "continuous_position_bias_mlp.2.weight"}
    for name, expected in eager_grads.items():
        assert (expected - flex_grads[name]).abs().max() <= 1e-12 * max(1.0, expected.abs().max()), name


@pytest.mark.parametrize("config", ["tiny", "window8", "window16"])
def test_float64_model_matches_eager_with_pixel_and_parameter_gradients(flex_backward_on_cpu, config):
    eager, flex = eager_and_flex(config)
    eager, flex = eager.double().train(), flex.double().train()
    image_size = CONFIGS[config][0]
    pixels = torch.randn(1 if config == "window16" else 2, 3, image_size, image_size, dtype=torch.float64)
    results = []
    for model in (eager, flex):
        inputs = pixels.clone().requires_grad_()
        out, grads = output_and_gradients(model, inputs)
        results.append((out, flat(grads), inputs.grad))
    (eager_out, eager_grads, eager_pixel_grad), (flex_out, flex_grads, flex_pixel_grad) = results
    assert (eager_out - flex_out).abs().max() <= 1e-12
    assert (eager_grads - flex_grads).abs().max() <= 1e-12 * eager_grads.abs().max()
    assert (eager_pixel_grad - flex_pixel_grad).abs().max() <= 1e-12 * eager_pixel_grad.abs().max()


def test_the_block_mask_is_the_shift_mask_per_window_and_head():
    _, _, mask, _ = shifted_block_and_input("tiny", torch.float32)
    windows, tokens, _ = mask.shape
    heads = 3
    block_mask = shift_window_block_mask(mask, heads)
    allowed = torch_flex.create_mask(block_mask.mask_mod, 1, windows * heads, tokens, tokens, device="cpu")
    assert torch.equal(allowed[0], (mask == 0).repeat_interleave(heads, dim=0))  # (nW * nH, T, T)
    assert not torch.equal(allowed, torch.ones_like(allowed))  # the mask masks something


# --- inference and the fallbacks ---


def test_inference_on_the_cpu_runs_flex_attention_and_matches_eager(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return torch_flex.flex_attention(*args, **kwargs)

    monkeypatch.setattr(swinv2_attention, "flex_attention", counted)
    eager, flex = eager_and_flex("tiny")
    pixels = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        expected, got = eager.eval()(pixel_values=pixels).pooler_output, flex.eval()(pixel_values=pixels).pooler_output
    assert len(calls) == 6  # every block, none fell back
    assert (expected - got).abs().max() <= 1e-5


def test_a_cpu_backward_falls_back_to_sdpa_with_one_warning_and_the_same_gradients():
    eager, flex = eager_and_flex("tiny")
    pixels = torch.randn(2, 3, 72, 72)
    eager_out, eager_grads = output_and_gradients(eager, pixels)
    with pytest.warns(UserWarning, match="no FlexAttention backward on cpu") as caught:
        flex_out, flex_grads = output_and_gradients(flex, pixels)
    assert len([w for w in caught if "flex" in str(w.message)]) == 1
    assert (eager_out - flex_out).abs().max() <= 1e-5
    assert (flat(eager_grads) - flat(flex_grads)).abs().max() <= 1e-5 * flat(eager_grads).abs().max()


def test_output_attentions_and_dropout_use_the_other_paths():
    eager, flex = eager_and_flex("tiny", attention_probs_dropout_prob=0.5)
    pixels = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        eager.eval(), flex.eval()
        expected = eager(pixel_values=pixels, output_attentions=True)
        got = flex(pixel_values=pixels, output_attentions=True)
        assert all(torch.equal(a, b) for a, b in zip(expected.attentions, got.attentions))
        flex.train()
        with pytest.warns(UserWarning, match="no attention dropout"):
            first, second = (flex(pixel_values=pixels).pooler_output for _ in range(2))
    assert (first - second).abs().max() > 1e-3  # SDPA's dropout, a fresh mask each call


def test_a_failing_kernel_warns_once_and_the_module_uses_sdpa_from_then_on(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel for this device\nsecond line")

    monkeypatch.setattr(swinv2_attention, "flex_attention", broken)
    eager, flex = eager_and_flex("tiny")
    pixels = torch.randn(2, 3, 72, 72)
    with torch.no_grad(), pytest.warns(UserWarning, match="flex_attention failed .RuntimeError: no kernel"):
        got = flex.eval()(pixel_values=pixels).pooler_output
        expected = eager.eval()(pixel_values=pixels).pooler_output
    assert (expected - got).abs().max() <= 1e-5
    assert all(m.flex_failed for m in flex.modules() if isinstance(m, FlexSwinv2SelfAttention))


def test_without_flex_attention_in_torch_the_switch_gives_sdpa(monkeypatch):
    monkeypatch.setattr(swinv2_attention, "flex_attention", None)
    model = Swinv2Model(Swinv2Config(image_size=64, window_size=4, patch_size=4, embed_dim=16, depths=[2],
                                     num_heads=[2]))
    with pytest.warns(UserWarning, match="has no flex_attention"):
        assert use_flex_attention(model) == 2
    assert all(type(m) is SdpaSwinv2SelfAttention for m in model.modules() if "SelfAttention" in type(m).__name__)


def test_switch_keeps_the_state_dict_takes_sdpa_modules_and_checks_the_bias_layout():
    eager, flex = eager_and_flex("tiny")
    assert use_flex_attention(flex) == 0  # already switched
    assert list(eager.state_dict()) == list(flex.state_dict())
    sdpa = copy.deepcopy(eager)
    use_sdpa_attention(sdpa)
    assert use_flex_attention(sdpa, "gathered") == 6
    modules = [m for m in sdpa.modules() if isinstance(m, FlexSwinv2SelfAttention)]
    assert all(m.separable_index and m.bias_layout == "gathered" for m in modules)
    with pytest.raises(ValueError, match="bias_layout"):
        use_flex_attention(sdpa, "dense")


def test_apply_speed_options_dispatches_flex():
    from model import Embedder, apply_speed_options, load_backbone

    model = apply_speed_options(Embedder(load_backbone("tiny", 64), 8), attention="flex")
    assert sum(isinstance(m, FlexSwinv2SelfAttention) for m in model.modules()) == 6


# --- CUDA: the compiled kernel ---


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("bias_layout", swinv2_attention.FLEX_BIAS_LAYOUTS)
def test_cuda_compiled_flex_is_as_accurate_as_sdpa(bias_layout, precision):
    """Against eager float64 on the GPU: flex's error, output and gradients, at most 1.5x SDPA's (+ a floor)."""
    eager, flex = eager_and_flex("window8", bias_layout)
    eager, flex = eager.cuda().train(), flex.cuda().train()
    sdpa = copy.deepcopy(eager)
    use_sdpa_attention(sdpa)
    pixels = torch.randn(4, 3, 64, 64, device="cuda")
    reference = copy.deepcopy(eager).double()
    reference_out, reference_grads = output_and_gradients(reference, pixels.double())
    reference_grads = flat(reference_grads)

    def errors(model):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out, grads = output_and_gradients(model, pixels)
        return ((out.double() - reference_out).norm() / reference_out.norm(),
                (flat(grads).double() - reference_grads).norm() / reference_grads.norm())

    flex_errors, sdpa_errors = errors(flex), errors(sdpa)
    assert not any(m.flex_failed for m in flex.modules() if isinstance(m, FlexSwinv2SelfAttention))
    floor = 1e-5 if precision == "fp32" else 1e-3
    for flex_error, sdpa_error in zip(flex_errors, sdpa_errors):
        assert flex_error <= 1.5 * sdpa_error + floor
