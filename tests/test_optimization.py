"""Weight-decay groups: which parameters are decayed, by name, on the tiny and the Swinv2-B architecture."""

import math
import re

import pytest
import torch
from transformers import Swinv2Config, Swinv2Model

from model import Embedder, build_embedder

BLOCK = r"backbone\.encoder\.layers\.\d+\.blocks\.\d+\."
# Every parameter that must not be decayed, spelled out (HF Swinv2 names, projection head last).
NO_DECAY_PATTERNS = [
    r"backbone\.embeddings\.patch_embeddings\.projection\.bias",
    r"backbone\.embeddings\.norm\.(weight|bias)",
    BLOCK + r"attention\.self\.logit_scale",
    BLOCK + r"attention\.self\.continuous_position_bias_mlp\.(0\.weight|0\.bias|2\.weight)",
    BLOCK + r"attention\.self\.(query|value)\.bias",
    BLOCK + r"attention\.output\.dense\.bias",
    BLOCK + r"(intermediate|output)\.dense\.bias",
    BLOCK + r"layernorm_(before|after)\.(weight|bias)",
    r"backbone\.encoder\.layers\.\d+\.downsample\.norm\.(weight|bias)",
    r"backbone\.layernorm\.(weight|bias)",
    r"projection\.bias",
]
# ...and every one that must be: the weights of the linear and convolution layers, cpb MLP excepted.
DECAY_PATTERNS = [
    r"backbone\.embeddings\.patch_embeddings\.projection\.weight",
    BLOCK + r"attention\.self\.(query|key|value)\.weight",
    BLOCK + r"(attention\.output|intermediate|output)\.dense\.weight",
    r"backbone\.encoder\.layers\.\d+\.downsample\.reduction\.weight",
    r"projection\.weight",
]


def swinv2_base_embedder() -> Embedder:
    """microsoft/swinv2-base-patch4-window16-256's architecture, built on the meta device (no memory, no init)."""
    config = Swinv2Config(image_size=256, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], window_size=16)
    with torch.device("meta"):
        return Embedder(Swinv2Model(config), 512)


def matching(names, patterns) -> set[str]:
    return {name for name in names if any(re.fullmatch(pattern, name) for pattern in patterns)}


@pytest.fixture(scope="module", params=["tiny", "swinv2-base"])
def embedder(request) -> Embedder:
    return build_embedder("tiny", 64, 32) if request.param == "tiny" else swinv2_base_embedder()


def test_no_weight_decay_names_are_biases_norms_logit_scales_and_the_cpb_mlp(embedder):
    from optimization import no_weight_decay_names

    names = [name for name, _ in embedder.named_parameters()]
    expected = matching(names, NO_DECAY_PATTERNS)
    # The two pattern lists cover every parameter, each exactly once: nothing new slipped past the test.
    assert not expected & matching(names, DECAY_PATTERNS)
    assert expected | matching(names, DECAY_PATTERNS) == set(names)

    excluded = no_weight_decay_names(embedder)
    assert excluded == expected, (sorted(excluded - expected), sorted(expected - excluded))

    depths = embedder.backbone.config.depths
    blocks = sum(depths)

    def count(part: str) -> int:
        return sum(part in name for name in excluded)

    assert count("logit_scale") == blocks
    assert count("continuous_position_bias_mlp") == 3 * blocks  # Linear(2, 512) weight and bias, Linear(512, heads)
    assert count("layernorm_before") == count("layernorm_after") == 2 * blocks
    assert count("downsample.norm") == 2 * (len(depths) - 1)
    assert "projection.bias" in excluded and "projection.weight" not in excluded


def test_every_trainable_parameter_is_in_exactly_one_group_with_the_right_lr_and_decay(embedder):
    from optimization import build_optimizer, no_weight_decay_names

    optimizer = build_optimizer(embedder, 1e-4, 10.0, 0.05, torch.device("cpu"))
    placed = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(placed) == sorted(id(p) for p in embedder.parameters() if p.requires_grad)

    excluded = no_weight_decay_names(embedder)
    head = {id(p) for p in embedder.head_parameters()}
    settings = {}
    for name, parameter in embedder.named_parameters():
        (group,) = [g for g in optimizer.param_groups if any(p is parameter for p in g["params"])]
        assert group["weight_decay"] == (0.0 if name in excluded else 0.05), name
        assert math.isclose(group["lr"], 1e-3 if id(parameter) in head else 1e-4), name
        settings[group["lr"], group["weight_decay"]] = settings.get((group["lr"], group["weight_decay"]), 0) + 1
    assert len(optimizer.param_groups) == len(settings) == 4  # backbone / head, decay / no decay


def test_frozen_parameters_are_left_out_and_empty_groups_dropped():
    from optimization import build_optimizer

    model = build_embedder("tiny", 64, 0)  # no projection: no head parameters
    model.backbone.embeddings.requires_grad_(False)
    optimizer = build_optimizer(model, 1e-4, 10.0, 0.05, torch.device("cpu"))
    placed = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert placed == {id(p) for p in model.parameters() if p.requires_grad}
    assert not placed & {id(p) for p in model.backbone.embeddings.parameters()}
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]


def test_warmup_cosine_schedule_rises_linearly_then_decays_to_zero():
    from optimization import warmup_cosine_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = warmup_cosine_schedule(optimizer, total_steps=12, warmup_steps=4)
    lrs = []
    for _ in range(13):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[8] == pytest.approx(0.5) and lrs[12] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))



def test_a_losss_own_parameters_are_a_last_group_at_their_lr_without_weight_decay():
    from optimization import build_optimizer

    model = build_embedder("tiny", 64, 8)
    proxies = torch.nn.Parameter(torch.zeros(5, 8))
    optimizer = build_optimizer(model, 1e-4, 10.0, 0.05, torch.device("cpu"), [proxies], loss_lr=1e-2)
    assert len(optimizer.param_groups) == 5
    last = optimizer.param_groups[-1]
    assert last["params"] == [proxies] and last["lr"] == 1e-2 and last["weight_decay"] == 0.0
