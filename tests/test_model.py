import time

import pytest
import torch

from model import BackboneLoadError, build_embedder, embedder_from_backbone_config, load_backbone


def test_tiny_embedder_outputs_unit_vectors_of_the_requested_dim():
    torch.manual_seed(0)
    model = build_embedder("tiny", 64, 32)
    embeddings = model(torch.randn(3, 3, 64, 64))
    assert embeddings.shape == (3, 32) and embeddings.dtype == torch.float32
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)


def test_no_projection_keeps_the_pooled_width():
    model = build_embedder("tiny", 64, 0)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, model.backbone.config.hidden_size)


def test_bf16_autocast_still_gives_float32_unit_vectors():
    model = build_embedder("tiny", 64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = model(torch.randn(2, 3, 64, 64))
    assert embeddings.dtype == torch.float32
    assert torch.allclose(embeddings.norm(dim=1), torch.ones(2), atol=1e-3)


def test_local_checkpoint_folder_loads_like_a_hub_id(tmp_path):
    torch.manual_seed(0)
    original = load_backbone("tiny", 64)
    original.save_pretrained(tmp_path / "backbone")
    reloaded = load_backbone(str(tmp_path / "backbone"), 64)
    x = torch.randn(1, 3, 64, 64)
    original.eval(), reloaded.eval()
    assert torch.allclose(original(pixel_values=x).pooler_output, reloaded(pixel_values=x).pooler_output)


def test_rebuild_from_stored_backbone_config_matches_state_dict():
    model = build_embedder("tiny", 64, 8)
    rebuilt = embedder_from_backbone_config(model.backbone.config.to_dict(), 8)
    rebuilt.load_state_dict(model.state_dict())  # strict


def test_unreachable_hub_id_fails_fast_with_a_local_copy_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(BackboneLoadError) as raised:
        load_backbone("someone/no-such-swinv2-model", 64)
    assert time.perf_counter() - started < 10
    assert "local" in str(raised.value) and "model.backbone=" in str(raised.value)


def test_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(BackboneLoadError, match="not a Swinv2 checkpoint"):
        load_backbone(str(tmp_path), 64)


def test_uint8_input_is_normalised_on_the_device_like_the_float_path():
    torch.manual_seed(0)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    from model import Embedder

    model = Embedder(load_backbone("tiny", 32), 8, mean, std).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    by_hand = (pixels.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(model(pixels), model(by_hand), atol=1e-5)


def test_speed_options_keep_state_dict_keys_and_outputs():
    from model import apply_speed_options

    torch.manual_seed(0)
    plain = build_embedder("tiny", 64, 8).eval()
    switched = embedder_from_backbone_config(plain.backbone.config.to_dict(), 8)
    switched.load_state_dict(plain.state_dict())
    apply_speed_options(switched, grad_checkpointing=True)
    assert list(switched.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    switched.train(), plain.train()
    # train mode draws stochastic depth (drop_path_rate 0.1): same seed, same draws in both models
    torch.manual_seed(1)
    out_plain = plain(x)
    torch.manual_seed(1)
    out_switched = switched(x)
    assert torch.allclose(out_plain, out_switched, atol=1e-6)
    out_plain.sum().backward()
    out_switched.sum().backward()
    for (name, a), b in zip(plain.named_parameters(), switched.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_compiled_backbone_gives_the_same_loss_and_gradients_as_the_plain_one():
    """train.compile: torch.compile's graph capture and autograd tracing (backend aot_eager on the CPU;
    inductor's code generation is exercised by bench/train_bench.py on a GPU) change nothing numerically."""
    from model import apply_speed_options
    from objective import MetricLearningObjective

    torch.manual_seed(0)
    plain = build_embedder("tiny", 64, 8).eval()  # eval: no stochastic depth, so both draw nothing
    compiled = embedder_from_backbone_config(plain.backbone.config.to_dict(), 8)
    compiled.load_state_dict(plain.state_dict())
    apply_speed_options(plain, attention="sdpa")
    aot_eager = torch._dynamo.lookup_backend("aot_eager")
    captured_graphs = []

    def counting_aot_eager(graph_module, example_inputs):
        captured_graphs.append(graph_module)
        return aot_eager(graph_module, example_inputs)

    apply_speed_options(compiled.eval(), attention="sdpa", compile_backbone=True, compile_backend=counting_aot_eager)
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints stay interchangeable
    pixels = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    losses = []
    for model in (plain, compiled):
        loss, _ = MetricLearningObjective("triplet", "all", config_values={"train.margin": 0.5})(model(pixels), labels)
        loss.backward()
        losses.append(loss.item())
    assert captured_graphs  # the backbone really ran as compiled graphs
    assert losses[0] > 0 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, a), b in zip(plain.named_parameters(), compiled.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-4), name
