"""SDPA Swinv2 attention against transformers' eager module: same weights, same numbers, same state dict."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import Swinv2Config, Swinv2Model
from transformers.models.swinv2.modeling_swinv2 import Swinv2Layer

from conftest import host_tensor_spy
from swinv2_attention import (CachedMaskSwinv2Layer, RelativePositionGather, SdpaSwinv2SelfAttention,
                              cache_shift_masks, separable_relative_position_index, use_sdpa_attention)

# image 64 / window 4: shifted windows with masks in stages 1-2, window clamped to the 4x4 map in stage 3.
# image 72 / window 4: 18x18 and 9x9 maps are padded to the window, and shifted.
# image 64 / window 8: one window per image from stage 2 on (no shift, no mask).
CONFIGS = {"shifted": (64, 4), "padded": (72, 4), "window8": (64, 8)}


def eager_and_sdpa(image_size: int, window_size: int, **overrides) -> tuple[Swinv2Model, Swinv2Model]:
    """Two tiny Swinv2 models with identical weights; the second uses SDPA attention."""
    torch.manual_seed(0)
    settings = dict(patch_size=4, embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8], drop_path_rate=0.0)
    config = Swinv2Config(image_size=image_size, window_size=window_size, **(settings | overrides))
    eager = Swinv2Model(config)
    sdpa = copy.deepcopy(eager)
    assert use_sdpa_attention(sdpa) == sum(config.depths)
    return eager, sdpa


def output_and_gradients(model: Swinv2Model, pixels: torch.Tensor, bf16: bool = False):
    """Pooled output (float32 or float64) and every parameter's gradient of mean(output ** 2)."""
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        pooled = model(pixel_values=pixels).pooler_output
    pooled = pooled.to(pixels.dtype)
    pooled.square().mean().backward()
    return pooled.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def flat(gradients: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for g in gradients.values()])


def test_swap_changes_every_block_once_and_keeps_the_state_dict(tmp_path):
    eager, sdpa = eager_and_sdpa(*CONFIGS["shifted"])
    assert use_sdpa_attention(sdpa) == 0  # already switched
    attentions = [m for m in sdpa.modules() if isinstance(m, SdpaSwinv2SelfAttention)]
    assert len(attentions) == 6
    eager_state, sdpa_state = eager.state_dict(), sdpa.state_dict()
    assert list(eager_state) == list(sdpa_state)
    assert all(eager_state[k].shape == sdpa_state[k].shape for k in eager_state)
    assert [n for n, _ in eager.named_buffers()] == [n for n, _ in sdpa.named_buffers()]

    torch.save(eager.state_dict(), tmp_path / "eager.pt")
    _, fresh = eager_and_sdpa(*CONFIGS["shifted"])
    with torch.no_grad():
        next(fresh.parameters()).add_(1.0)  # prove the load overwrites
    fresh.load_state_dict(torch.load(tmp_path / "eager.pt"), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), fresh.state_dict().values()))


def test_float64_matches_eager_to_rounding():
    """In float64 any reordering error vanishes: the two compute the same function."""
    eager, sdpa = eager_and_sdpa(*CONFIGS["padded"])
    eager, sdpa = eager.double().train(), sdpa.double().train()
    pixels = torch.randn(2, 3, 72, 72, dtype=torch.float64)
    eager_out, eager_grads = output_and_gradients(eager, pixels)
    sdpa_out, sdpa_grads = output_and_gradients(sdpa, pixels)
    assert (eager_out - sdpa_out).abs().max() < 1e-12
    assert (flat(eager_grads) - flat(sdpa_grads)).abs().max() < 1e-12


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("config", CONFIGS)
def test_float32_output_and_gradients_match_eager(config, mode):
    image_size, window_size = CONFIGS[config]
    eager, sdpa = eager_and_sdpa(image_size, window_size)
    eager.train(mode == "train"), sdpa.train(mode == "train")
    pixels = torch.randn(2, 3, image_size, image_size)
    eager_out, eager_grads = output_and_gradients(eager, pixels)
    sdpa_out, sdpa_grads = output_and_gradients(sdpa, pixels)
    assert (eager_out - sdpa_out).abs().max() <= 1e-5
    # Relative to the largest gradient: eager's own float32 gradients are ~4e-6 of it away from float64's.
    scale = flat(eager_grads).abs().max()
    for name in eager_grads:
        assert (eager_grads[name] - sdpa_grads[name]).abs().max() <= 1e-5 * scale, name


def test_bf16_autocast_attention_module_matches_eager():
    """One shifted, masked window attention under bf16 autocast: output within 1e-2, gradients aligned."""
    eager_model, _ = eager_and_sdpa(*CONFIGS["padded"])
    block = eager_model.encoder.layers[0].blocks[1]  # 18x18 map padded to 20x20, shift 2: 25 windows
    eager = block.attention.self
    sdpa = copy.deepcopy(eager)
    use_sdpa_attention(sdpa)
    mask = block.get_attn_mask(20, 20, dtype=torch.float32)  # (25, 16, 16)
    hidden = torch.randn(2 * 25, 16, 32)
    results = []
    for module in (eager, sdpa):
        module.zero_grad()
        inputs = hidden.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            context = module(inputs, mask)[0]
        context.float().square().mean().backward()
        results.append((context.float(), [p.grad for p in module.parameters()] + [inputs.grad]))
    (eager_out, eager_grads), (sdpa_out, sdpa_grads) = results
    assert (eager_out - sdpa_out).abs().max() <= 1e-2
    for eager_grad, sdpa_grad in zip(eager_grads, sdpa_grads):
        assert F.cosine_similarity(eager_grad.flatten(), sdpa_grad.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("config", CONFIGS)
def test_bf16_autocast_whole_model_is_as_accurate_as_eager(config):
    """Across 6 blocks bf16 rounding alone moves eager's pooled output ~4% and its gradients ~10% from
    float32, so the two bf16 runs cannot agree to 1e-2. Instead: SDPA's error against the float32
    reference must be no worse than eager's (measured ratios 0.8-1.02)."""
    image_size, window_size = CONFIGS[config]
    eager, sdpa = eager_and_sdpa(image_size, window_size)
    pixels = torch.randn(2, 3, image_size, image_size)
    reference_out, reference_grads = output_and_gradients(eager, pixels)
    reference_grads = flat(reference_grads)
    eager_out, eager_grads = output_and_gradients(eager, pixels, bf16=True)
    sdpa_out, sdpa_grads = output_and_gradients(sdpa, pixels, bf16=True)

    def relative_error(value, reference):
        return (value - reference).norm() / reference.norm()

    assert relative_error(sdpa_out, reference_out) <= 1.25 * relative_error(eager_out, reference_out)
    eager_grad_error = relative_error(flat(eager_grads), reference_grads)
    assert relative_error(flat(sdpa_grads), reference_grads) <= 1.25 * eager_grad_error
    assert F.cosine_similarity(sdpa_out.flatten(), eager_out.flatten(), dim=0) > 0.999


def test_output_attentions_returns_eager_probabilities():
    eager, sdpa = eager_and_sdpa(*CONFIGS["shifted"])
    eager.eval(), sdpa.eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = eager(pixel_values=pixels, output_attentions=True)
        got = sdpa(pixel_values=pixels, output_attentions=True)
    assert len(got.attentions) == 3
    for expected_probs, got_probs in zip(expected.attentions, got.attentions):
        assert torch.equal(expected_probs, got_probs)
    assert torch.equal(expected.pooler_output, got.pooler_output)


def test_attention_dropout_applies_in_training_only():
    eager, sdpa = eager_and_sdpa(*CONFIGS["shifted"], attention_probs_dropout_prob=0.5)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        sdpa.train()
        first, second = (sdpa(pixel_values=pixels).pooler_output for _ in range(2))
        assert (first - second).abs().max() > 1e-3  # a fresh dropout mask each call
        eager.eval(), sdpa.eval()
        assert (eager(pixel_values=pixels).pooler_output - sdpa(pixel_values=pixels).pooler_output).abs().max() <= 1e-5


@pytest.mark.parametrize("window", [(1, 1), (3, 5), (4, 4), (7, 2), (16, 16)])
def test_relative_position_gather_matches_indexing_and_its_gradient(window):
    """The scatter-free backward against autograd's scatter-add of plain indexing, in float64."""
    torch.manual_seed(0)
    tokens, entries = window[0] * window[1], (2 * window[0] - 1) * (2 * window[1] - 1)
    index = separable_relative_position_index(window)
    table = torch.randn(entries, 3, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(tokens, 3, tokens, dtype=torch.float64).transpose(0, 1)  # non-contiguous
    gathered = RelativePositionGather.apply(table, index, *window)
    (ours,) = torch.autograd.grad(gathered, table, upstream)
    plain = table[index.view(-1)].view(tokens, tokens, 3).permute(2, 0, 1)
    (expected,) = torch.autograd.grad(plain, table, upstream)
    assert torch.equal(gathered, plain)
    assert (ours - expected).abs().max() <= 1e-12 * expected.abs().max()
    if tokens <= 20:  # gradcheck builds the full Jacobian, (tokens^2 * heads) x (entries * heads)
        assert torch.autograd.gradcheck(lambda t: RelativePositionGather.apply(t, index, *window),
                                        (torch.randn(entries, 2, dtype=torch.float64, requires_grad=True),))


def test_relative_position_gather_returns_gradients_in_the_tables_dtype():
    index = separable_relative_position_index((4, 4))
    table = torch.randn(49, 2, dtype=torch.bfloat16, requires_grad=True)
    RelativePositionGather.apply(table, index, 4, 4).float().sum().backward()
    assert table.grad.dtype == torch.bfloat16
    assert torch.equal(table.grad.float(), torch.bincount(index.flatten(), minlength=49).float()[:, None].expand(49, 2))


def test_transformers_index_is_recognised_and_another_layout_falls_back_to_plain_indexing():
    eager, sdpa = eager_and_sdpa(*CONFIGS["shifted"])
    modules = [m for m in sdpa.modules() if isinstance(m, SdpaSwinv2SelfAttention)]
    assert modules and all(m.separable_index for m in modules)

    # A transposed index (every offset mirrored) is a valid table layout the separable backward does not assume.
    eager, sdpa = eager_and_sdpa(*CONFIGS["shifted"])
    for model in (eager, sdpa):
        for module in model.modules():
            if hasattr(module, "relative_position_index"):
                module.relative_position_index.copy_(module.relative_position_index.t().contiguous())
    for module in sdpa.modules():
        if isinstance(module, SdpaSwinv2SelfAttention):
            module.__class__ = type(eager.encoder.layers[0].blocks[0].attention.self)
    with pytest.warns(UserWarning, match="plain gather"):
        assert use_sdpa_attention(sdpa) == 6
    assert not any(m.separable_index for m in sdpa.modules() if isinstance(m, SdpaSwinv2SelfAttention))
    pixels = torch.randn(2, 3, 64, 64)
    eager_out, eager_grads = output_and_gradients(eager, pixels)
    sdpa_out, sdpa_grads = output_and_gradients(sdpa, pixels)
    assert (eager_out - sdpa_out).abs().max() <= 1e-5
    assert (flat(eager_grads) - flat(sdpa_grads)).abs().max() <= 1e-5 * flat(eager_grads).abs().max()


@pytest.mark.parametrize("switch_inside_meta_context", [False, True])
def test_switching_a_model_built_on_the_meta_device_recognises_the_index_layout(switch_inside_meta_context):
    """No index values exist yet on the meta device (weights not loaded); the switch must neither fail
    nor fall back to the scatter-add gather."""
    with torch.device("meta"):
        model = Swinv2Model(Swinv2Config(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4],
                                         window_size=4))
        if switch_inside_meta_context:
            assert use_sdpa_attention(model) == 4
    if not switch_inside_meta_context:
        assert use_sdpa_attention(model) == 4
    assert all(m.separable_index for m in model.modules() if isinstance(m, SdpaSwinv2SelfAttention))


def test_relative_position_gather_backward_inside_autocast_stays_float32():
    """A float32 table's gradient is summed in float32 even when backward() runs under bf16 autocast."""
    torch.manual_seed(0)
    index = separable_relative_position_index((8, 8))
    table = torch.randn(225, 4, requires_grad=True)
    upstream = torch.randn(4, 64, 64)
    gathered = RelativePositionGather.apply(table, index, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gathered.backward(upstream)
    exact = torch.zeros(225, 4, dtype=torch.float64).index_add_(
        0, index.flatten(), upstream.double().permute(1, 2, 0).reshape(-1, 4))
    assert (table.grad.double() - exact).abs().max() <= 1e-5 * exact.abs().max()


# --- the shifted-window mask, built once (cache_shift_masks) ---


@pytest.mark.parametrize("config", ["shifted", "padded"])
def test_cached_shift_masks_are_transformers_masks_and_change_no_output_or_state(config):
    torch.manual_seed(0)
    image_size, window_size = CONFIGS[config]
    model = Swinv2Model(Swinv2Config(image_size=image_size, window_size=window_size, patch_size=4, embed_dim=32,
                                     depths=[2, 2, 2], num_heads=[2, 4, 8])).eval()
    cached = copy.deepcopy(model)
    shifted = [m for m in model.modules() if isinstance(m, Swinv2Layer) and m.shift_size > 0]
    assert cache_shift_masks(cached) == len(shifted) > 0
    assert cache_shift_masks(cached) == 0  # already switched
    layers = [m for m in cached.modules() if isinstance(m, CachedMaskSwinv2Layer)]
    for layer, original in zip(layers, shifted, strict=True):
        height_pad, width_pad = layer.shift_mask_key[:2]
        assert height_pad % layer.window_size == 0 and height_pad >= layer.input_resolution[0]
        expected = Swinv2Layer.get_attn_mask(original, height_pad, width_pad, torch.float32)
        assert torch.equal(layer.get_attn_mask(height_pad, width_pad, torch.float32), expected)
    assert list(model.state_dict()) == list(cached.state_dict())  # the cache is not saved
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=pixels).pooler_output, cached(pixel_values=pixels).pooler_output)


TRANSFORMERS_ATTN_MASK = Swinv2Layer.get_attn_mask


def host_built_attn_mask(self, height, width, dtype, device=None):
    """transformers up to 5.17: the mask is made on the host and copied to the model's device every forward."""
    with torch.device("cpu"):
        mask = TRANSFORMERS_ATTN_MASK(self, height, width, dtype)
    return mask if mask is None or device is None else mask.to(device)


def test_with_masks_cached_a_forward_on_a_device_touches_no_host_tensor(monkeypatch):
    """On 'meta' standing in for the GPU; with transformers' old host-built mask patched in."""
    monkeypatch.setattr(Swinv2Layer, "get_attn_mask", host_built_attn_mask)
    _, model = eager_and_sdpa(*CONFIGS["padded"])
    pixels = torch.empty(2, 3, 72, 72, device="meta")
    plain = copy.deepcopy(model).to("meta")
    with host_tensor_spy() as spy, torch.no_grad():
        plain(pixel_values=pixels)
    assert spy.host_ops  # the old way: a host mask in every shifted layer
    assert cache_shift_masks(model) > 0
    model.to("meta")
    with host_tensor_spy() as spy, torch.no_grad():
        model(pixel_values=pixels)
    assert spy.host_ops == []


def test_masks_cached_under_inference_mode_still_serve_a_training_step():
    torch.manual_seed(0)
    model = Swinv2Model(Swinv2Config(image_size=64, window_size=4, patch_size=4, embed_dim=32, depths=[2, 2, 2],
                                     num_heads=[2, 4, 8]))
    with torch.inference_mode():
        assert cache_shift_masks(model) > 0
    model(pixel_values=torch.randn(2, 3, 64, 64)).pooler_output.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# --- the version-fragile coupling to transformers, fenced in swinv2_attention ---


def test_transformers_swinv2_still_lacks_native_sdpa():
    from transformers.models.swinv2.modeling_swinv2 import Swinv2PreTrainedModel

    assert not getattr(Swinv2PreTrainedModel, "_supports_sdpa", False), (
        "transformers' Swinv2 now supports SDPA natively: retire swinv2_attention's rewrite")


def test_the_subclasses_keep_the_signatures_of_the_methods_they_override():
    """A transformers release that changes these signatures must fail here, not in the middle of a run."""
    import inspect

    from transformers.models.swinv2.modeling_swinv2 import Swinv2SelfAttention

    assert (list(inspect.signature(SdpaSwinv2SelfAttention.forward).parameters)
            == list(inspect.signature(Swinv2SelfAttention.forward).parameters))
    transformers_parameters = list(inspect.signature(Swinv2Layer.get_attn_mask).parameters)  # `device` since 5.18
    overridden = list(inspect.signature(CachedMaskSwinv2Layer.get_attn_mask).parameters)
    assert overridden[:len(transformers_parameters)] == transformers_parameters


def test_the_attention_attributes_the_sdpa_module_reads_exist():
    from swinv2_attention import SELF_ATTENTION_ATTRIBUTES

    _, sdpa = eager_and_sdpa(*CONFIGS["shifted"])
    module = sdpa.encoder.layers[0].blocks[0].attention.self
    assert [name for name in SELF_ATTENTION_ATTRIBUTES if not hasattr(module, name)] == []


class OldNameOnly:
    """transformers 5.17-5.18: only gradient_checkpointing_enable."""

    def __init__(self):
        self.called = []

    def gradient_checkpointing_enable(self):
        self.called.append("gradient_checkpointing_enable")


class BothNames(OldNameOnly):
    """transformers 5.24: activation_checkpointing_enable, the old name a deprecated alias."""

    def activation_checkpointing_enable(self):
        self.called.append("activation_checkpointing_enable")


@pytest.mark.parametrize("backbone, expected", [(OldNameOnly, "gradient_checkpointing_enable"),
                                                (BothNames, "activation_checkpointing_enable")])
def test_activation_checkpointing_is_enabled_by_the_name_this_transformers_has(backbone, expected):
    from swinv2_attention import enable_activation_checkpointing

    backbone = backbone()
    enable_activation_checkpointing(backbone)
    assert backbone.called == [expected]


def test_activation_checkpointing_on_a_real_backbone_without_a_deprecation_warning():
    import warnings

    from swinv2_attention import enable_activation_checkpointing

    model = Swinv2Model(Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                     window_size=4))
    assert not model.encoder.gradient_checkpointing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enable_activation_checkpointing(model)
    assert model.encoder.gradient_checkpointing


def test_mask_on_device_probe_reads_the_signature():
    from swinv2_attention import attn_mask_takes_device

    def old(self, height, width, dtype):
        pass

    def new(self, height, width, dtype, device=None):
        pass

    assert attn_mask_takes_device(new) and not attn_mask_takes_device(old)


@pytest.mark.parametrize("takes_device", [False, True])
def test_a_mask_cache_miss_calls_transformers_with_the_arguments_it_takes(monkeypatch, takes_device):
    """A cached layer asked for another size falls back to transformers' get_attn_mask, old or new signature."""
    import swinv2_attention

    model = Swinv2Model(Swinv2Config(image_size=64, window_size=4, patch_size=4, embed_dim=32, depths=[2, 2, 2],
                                     num_heads=[2, 4, 8]))
    cache_shift_masks(model)
    layer = next(m for m in model.modules() if isinstance(m, CachedMaskSwinv2Layer))
    calls = []

    def old(self, height, width, dtype):
        calls.append((height, width))
        return TRANSFORMERS_ATTN_MASK(self, height, width, dtype)

    def new(self, height, width, dtype, device=None):
        calls.append((height, width, device))
        return TRANSFORMERS_ATTN_MASK(self, height, width, dtype)  # on the CPU either way

    monkeypatch.setattr(Swinv2Layer, "get_attn_mask", new if takes_device else old)
    monkeypatch.setattr(swinv2_attention, "MASK_BUILT_ON_DEVICE", takes_device)
    height = layer.shift_mask_key[0] + layer.window_size  # not the cached size
    mask = layer.get_attn_mask(height, height, torch.float32, device=torch.device("cpu"))
    assert calls == [(height, height, torch.device("cpu")) if takes_device else (height, height)]
    assert torch.equal(mask, TRANSFORMERS_ATTN_MASK(layer, height, height, torch.float32))
    calls.clear()
    layer.get_attn_mask(*layer.shift_mask_key[:2], torch.float32)  # the cached size: transformers not asked
    assert calls == []


def test_an_index_probe_that_cannot_build_transformers_module_keeps_the_plain_gather(monkeypatch):
    """On the meta device the index layout is read from a small CPU module; a constructor that refuses
    the stand-in config (another transformers) means the plain gather, with a warning."""
    from transformers.models.swinv2.modeling_swinv2 import Swinv2SelfAttention

    with torch.device("meta"):
        model = Swinv2Model(Swinv2Config(image_size=64, patch_size=4, embed_dim=32, depths=[2], num_heads=[2],
                                         window_size=4))

    def refuse(self, *args, **kwargs):
        raise TypeError("another constructor")

    monkeypatch.setattr(Swinv2SelfAttention, "__init__", refuse)
    with pytest.warns(UserWarning, match="plain gather"):
        assert use_sdpa_attention(model) == 2
    assert not any(m.separable_index for m in model.modules() if isinstance(m, SdpaSwinv2SelfAttention))
