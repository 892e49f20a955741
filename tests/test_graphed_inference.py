"""The CUDA-graph embedding path: padding of short batches, layouts, fallbacks, and (on CUDA) the graph itself."""

import warnings

import pytest
import torch

from conftest import host_tensor_spy
from evaluation import autocast_context, extract_embeddings, graph_rows
from graphed_inference import (MIN_BATCHES_FOR_A_GRAPH, PaddedBatches, checked_against_plain, inference_forward,
                               static_batch_like)
from model import Embedder, load_backbone

IMAGE_SIZE = 32


def tiny_embedder() -> Embedder:
    torch.manual_seed(0)
    return Embedder(load_backbone("tiny", IMAGE_SIZE), 8).eval()


def loader_batch(rows: int, seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """uint8 images laid out as the loaders' collate hands them over: (B, 3, H, W) viewing (B, H, W, 3)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, size, size, 3), dtype=torch.uint8, generator=generator).permute(0, 3, 1, 2)


def collate_with_nothing_skipped(items):
    """(images, labels, indices, skipped) batches, as the loaders' collate gives them."""
    return (*torch.utils.data.default_collate(items), [])


def test_static_batch_keeps_the_loaders_channels_last_layout_and_plain_layout():
    channels_last = loader_batch(3, 0)
    static = static_batch_like(channels_last, 5, torch.device("cpu"))
    assert static.shape == (5, 3, IMAGE_SIZE, IMAGE_SIZE) and static.dtype == torch.uint8
    # (H * W * 3, 1, W * 3, 3): the batch's own strides, so filling it is one plain copy
    assert static.stride() == channels_last.stride() == (IMAGE_SIZE * IMAGE_SIZE * 3, 1, IMAGE_SIZE * 3, 3)
    plain = static_batch_like(channels_last.contiguous(), 5, torch.device("cpu"))
    assert plain.is_contiguous() and int(plain.sum()) == 0


def test_padded_batches_give_each_batch_its_own_rows_as_the_model_alone_does():
    model = tiny_embedder()
    batches = [loader_batch(4, 1), loader_batch(4, 2), loader_batch(2, 3), loader_batch(4, 4)]
    static = static_batch_like(batches[0], 4, torch.device("cpu"))
    static_output = torch.empty(4, 8)
    seen_by_model = []

    def forward_full():  # stands in for a graph replay: reads the whole static batch, writes one output buffer
        seen_by_model.append(static.clone())
        return static_output.copy_(model(static))

    run = PaddedBatches(static, forward_full, fallback=model)
    with torch.inference_mode():
        outputs = [run(batch) for batch in batches]
        expected = [model(batch) for batch in batches]
    # each output is its own copy: the later calls, which reuse the output buffer, left it as it was
    for output, want, batch in zip(outputs, expected, batches, strict=True):
        assert output.shape == (len(batch), 8)
        torch.testing.assert_close(output, want, rtol=0, atol=1e-6)
    # the short batch went in padded with black images, and the next full batch overwrote the padding
    assert torch.equal(seen_by_model[2][:2], batches[2]) and int(seen_by_model[2][2:].sum()) == 0
    assert torch.equal(seen_by_model[3], batches[3])


def test_batches_that_do_not_fit_the_static_shape_take_the_fallback():
    model = tiny_embedder()
    static = static_batch_like(loader_batch(2, 0), 2, torch.device("cpu"))
    fallback_calls = []

    def fallback(images):
        fallback_calls.append(images.shape)
        return model(images)

    run = PaddedBatches(static, lambda: model(static), fallback)
    with torch.inference_mode():
        run(loader_batch(3, 1))  # more rows than captured
        run(loader_batch(2, 2, size=64))  # another image size
        run(loader_batch(2, 3).float())  # another dtype
        run(loader_batch(1, 4))  # fits
    assert [shape[0] for shape in fallback_calls] == [3, 2, 2]


def test_inference_forward_off_cuda_is_the_plain_autocast_forward():
    model = tiny_embedder()
    images = loader_batch(3, 5)
    device = torch.device("cpu")
    with torch.inference_mode():
        embed = inference_forward(model, images, 3, device, lambda: autocast_context(device, "bf16"), cuda_graph=True)
        assert not isinstance(embed, PaddedBatches)
        with autocast_context(device, "bf16"):
            expected = model(images)
        torch.testing.assert_close(embed(images), expected, rtol=0, atol=0)


def test_a_graph_that_embeds_the_first_batch_differently_is_dropped_with_a_warning():
    model = tiny_embedder()
    first = loader_batch(4, 11)
    def faithful(images):
        return model(images) + 1e-4  # within bf16 noise

    with torch.inference_mode():
        assert checked_against_plain(faithful, model, first) is faithful
        stale = model(loader_batch(4, 12))  # a replay that returns another batch's output
        with pytest.warns(UserWarning, match="differs from the plain one"):
            assert checked_against_plain(lambda images: stale, model, first) is model
        with pytest.warns(UserWarning, match="differs from the plain one"):
            assert checked_against_plain(lambda images: torch.full_like(stale, float("nan")), model, first) is model


def test_a_graph_off_by_small_entries_or_rescaled_rows_is_dropped():
    """Both slip under an absolute 1e-2 check on unit vectors; the row cosine and the absolute bound catch them."""
    torch.manual_seed(0)
    expected = torch.nn.functional.normalize(torch.randn(8, 512), dim=1)
    drifted = expected + 0.009 * torch.sign(torch.randn(8, 512))  # every entry within 1e-2, row cosine ~0.98
    assert (drifted - expected).abs().max() < 1e-2
    plain = lambda images: expected  # noqa: E731
    with pytest.warns(UserWarning, match="lowest row cosine"):
        assert checked_against_plain(lambda images: drifted, plain, None) is plain
    rescaled = 1.2 * expected  # same directions, rows no longer unit length
    with pytest.warns(UserWarning, match="largest difference"):
        assert checked_against_plain(lambda images: rescaled, plain, None) is plain
    assert checked_against_plain(lambda images: expected + 1e-4, plain, None) is not plain


def test_graph_rows_follow_the_loader_and_never_exceed_the_dataset():
    images = torch.utils.data.TensorDataset(torch.zeros(10, 3, 4, 4))
    assert graph_rows(torch.utils.data.DataLoader(images, batch_size=4), 4) == 4
    assert graph_rows(torch.utils.data.DataLoader(images, batch_size=256), 10) == 10  # a small validation split
    by_sampler = torch.utils.data.DataLoader(images, batch_sampler=[[0, 1, 2], [3, 4, 5, 6, 7]])
    assert graph_rows(by_sampler, 3) == 3  # no fixed batch size: the first batch's
    assert graph_rows([(torch.zeros(5, 3, 4, 4),)], 5) == 5  # any iterable of batches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="off CUDA there is never a graph")
def test_a_pass_of_few_batches_is_not_worth_a_graph():
    model = tiny_embedder()
    device = torch.device("cuda")
    embed = inference_forward(model.to(device), loader_batch(2, 0).to(device), 2, device,
                              lambda: autocast_context(device, "fp32"), cuda_graph=True,
                              num_batches=MIN_BATCHES_FOR_A_GRAPH - 1)
    assert not isinstance(embed, PaddedBatches)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_captured_graph_matches_the_plain_forward_on_cuda():
    device = torch.device("cuda")
    model = tiny_embedder().to(device)
    full, short = loader_batch(6, 8), loader_batch(2, 9)

    def autocast():
        return autocast_context(device, "bf16", cache_enabled=False)

    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture would warn and fall back
        embed = inference_forward(model, full.to(device), 6, device, autocast, cuda_graph=True)
        assert isinstance(embed, PaddedBatches)
        graphed = [embed(full.pin_memory()), embed(short), embed(full.to(device))]
        with autocast():
            plain = [model(full.to(device)), model(short.to(device)), model(full.to(device))]
    for output, want in zip(graphed, plain, strict=True):
        torch.testing.assert_close(output, want, rtol=0, atol=2e-2)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_embedding_forward_touches_no_host_tensor_once_the_speed_options_are_on(attention):
    """What a CUDA graph capture needs: no host tensor and no copy from the host inside the forward ('meta'
    stands in for the GPU: a host tensor meeting it shows up as an operation with a CPU argument)."""
    from model import apply_speed_options

    model = apply_speed_options(Embedder(load_backbone("tiny", 64), 8).eval(), attention).to("meta")
    with host_tensor_spy() as spy, torch.inference_mode():
        model(torch.empty(2, 3, 64, 64, dtype=torch.uint8, device="meta"))
    assert spy.host_ops == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_extract_embeddings_through_a_pinned_memory_loader_with_workers_matches_the_plain_pass():
    """The case of main.py --mode eval: the pin-memory thread allocates while the graph is captured."""
    device = torch.device("cuda")
    model = tiny_embedder().to(device)
    images = torch.randint(0, 256, (23, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(10))
    dataset = torch.utils.data.TensorDataset(images, torch.arange(23) % 5, torch.arange(23))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, pin_memory=True,
                                         collate_fn=collate_with_nothing_skipped)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture would warn and fall back
        graphed = extract_embeddings(model, loader, device, "bf16", cuda_graph=True)
    plain = extract_embeddings(model, loader, device, "bf16", cuda_graph=False)
    assert graphed.embeddings.shape == (23, 8) and torch.equal(graphed.indices, torch.arange(23))
    torch.testing.assert_close(graphed.embeddings, plain.embeddings, rtol=0, atol=2e-2)
