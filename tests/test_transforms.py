"""The training and evaluation transforms against torchvision's, and the channels-last batching. CPU, seconds."""

import math

import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as F

from dataloaders import collate_skipping_bad_images
from dataloaders.datasets import stack_pictures
from dataloaders.transforms import CROP_ATTEMPTS, build_transforms, eval_resize_size, random_crop_box

SCALE = (0.16, 1.0)


def _picture(height, width, seed=0, layout="chw"):
    """A random RGB uint8 picture [3, H, W]: stored channel by channel ("chw", as PIL-decoded pictures come)
    or pixel by pixel ("hwc", as torchvision's JPEG decoder returns them)."""
    generator = torch.Generator().manual_seed(seed)
    if layout == "hwc":
        return torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator).permute(2, 0, 1)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


# ----------------------------------------------------------------------------- the crop rule


def test_crop_box_from_hand_computed_draws():
    # area draw 0 -> 16% of 100 x 100 = 1600 px; ratio draw 1/2 -> exp(0) = 1 -> 40 x 40;
    # top draw 0 -> row 0; left draw 0.999 -> int(0.999 * 61) = 60, the last column that fits.
    assert random_crop_box(100, 100, SCALE, [0.0, 0.5, 0.0, 0.999]) == (0, 60, 40, 40)


def test_crop_box_keeps_drawing_until_a_box_fits():
    # Attempt 1 on a 100 x 50 (tall) picture: all of the area at ratio 4/3 -> 82 px wide: does not fit.
    # Attempt 2: 16% of 5000 = 800 px at ratio 1 -> 28 x 28; top int(0.5 * 73) = 36, left 0.
    draws = [1.0, 1.0, 0.3, 0.3] + [0.0, 0.5, 0.5, 0.0]
    assert random_crop_box(100, 50, SCALE, draws) == (36, 0, 28, 28)


@pytest.mark.parametrize("height, width, failing_draws", [
    (10, 100, [0.99, 0.0, 0.5, 0.5]),  # wide: the drawn boxes are always too tall
    (100, 10, [0.99, 1.0, 0.5, 0.5]),  # tall: always too wide
])
def test_crop_box_falls_back_to_torchvisions_centre_crop(height, width, failing_draws):
    ours = random_crop_box(height, width, SCALE, failing_draws * CROP_ATTEMPTS)
    # With the whole area as the only allowed scale, torchvision never finds a box here either.
    theirs = RandomResizedCrop.get_params(torch.zeros(3, height, width), [1.0, 1.0], [3 / 4, 4 / 3])
    assert ours == tuple(theirs)


def test_crop_box_fallback_in_the_ratio_range_is_the_whole_picture():
    assert random_crop_box(50, 60, (1.0, 1.0), [0.0, 0.0, 0.5, 0.5] * CROP_ATTEMPTS) == (0, 0, 50, 50 + 10)


def test_crop_boxes_follow_torchvisions_distribution():
    height, width, samples = 300, 400, 4000
    torch.manual_seed(0)
    ours = [random_crop_box(height, width, SCALE, torch.rand(4 * CROP_ATTEMPTS).tolist()) for _ in range(samples)]
    theirs = [RandomResizedCrop.get_params(torch.zeros(3, height, width), list(SCALE), [3 / 4, 4 / 3])
              for _ in range(samples)]

    def summary(boxes):
        boxes = torch.tensor(boxes, dtype=torch.float64)
        top, left, crop_height, crop_width = boxes.unbind(1)
        return {"area fraction": (crop_height * crop_width / (height * width)).mean().item(),
                "log aspect": torch.log(crop_width / crop_height).mean().item(),
                "top centre": ((top + crop_height / 2) / height).mean().item(),
                "left centre": ((left + crop_width / 2) / width).mean().item()}

    for (name, mine), theirs_value in zip(summary(ours).items(), summary(theirs).values()):
        assert mine == pytest.approx(theirs_value, abs=0.02), name
    for top, left, crop_height, crop_width in ours:
        assert 0 <= top <= height - crop_height and 0 <= left <= width - crop_width
        area_fraction = crop_height * crop_width / (height * width)
        assert SCALE[0] * 0.9 <= area_fraction <= SCALE[1]
        assert 3 / 4 * 0.9 <= crop_width / crop_height <= 4 / 3 * 1.1


# ----------------------------------------------------------------------------- pixels


@pytest.mark.parametrize("layout", ["chw", "hwc", "pil"])
@pytest.mark.parametrize("height, width", [(120, 90), (40, 50)])  # crops shrunk, and crops enlarged
def test_train_transform_pixels_are_torchvisions_resized_crop_and_flip(layout, height, width):
    size = 48
    picture = _picture(height, width, seed=height, layout="hwc" if layout == "hwc" else "chw")
    given = Image.fromarray(picture.permute(1, 2, 0).numpy()) if layout == "pil" else picture
    transform = build_transforms(size, train=True)
    flips = set()
    for seed in range(8):
        torch.manual_seed(seed)
        *crop_draws, flip_draw = torch.rand(4 * CROP_ATTEMPTS + 1).tolist()  # the transform's own draws
        top, left, crop_height, crop_width = random_crop_box(height, width, SCALE, crop_draws)
        expected = F.resized_crop(picture.contiguous(), top, left, crop_height, crop_width, [size, size],
                                  antialias=True)
        if flip_draw < 0.5:
            expected = F.horizontal_flip(expected)
        flips.add(flip_draw < 0.5)
        torch.manual_seed(seed)
        out = transform(given)
        assert out.dtype == torch.uint8 and out.shape == (3, size, size)
        assert out.stride(0) == 1  # pixel by pixel in memory: the batch copy is then a plain one
        assert torch.equal(out, expected)
    assert flips == {True, False}


@pytest.mark.parametrize("layout", ["chw", "hwc", "pil"])
@pytest.mark.parametrize("height, width", [(60, 90), (90, 60), (36, 50), (20, 30)])
def test_eval_transform_pixels_are_torchvisions_resize_and_centre_crop(layout, height, width):
    size = 32
    picture = _picture(height, width, seed=width, layout="hwc" if layout == "hwc" else "chw")
    given = Image.fromarray(picture.permute(1, 2, 0).numpy()) if layout == "pil" else picture
    torchvision_way = v2.Compose([v2.Resize(eval_resize_size(size), antialias=True), v2.CenterCrop(size)])
    out = build_transforms(size, train=False)(given)
    assert torch.equal(out, torchvision_way(picture.contiguous()))
    assert out.stride(0) == 1
    assert torch.equal(out, build_transforms(size, train=False)(given))


def test_transforms_refuse_what_is_not_an_rgb_uint8_picture():
    with pytest.raises(ValueError, match="RGB uint8"):
        build_transforms(16, train=True)(torch.zeros(3, 20, 20))
    with pytest.raises(ValueError, match="RGB uint8"):
        build_transforms(16, train=False)(torch.zeros(1, 20, 20, dtype=torch.uint8))


def test_train_transform_of_a_grey_pil_image_is_rgb():
    out = build_transforms(16, train=True)(Image.new("L", (30, 20), 77))
    assert out.shape == (3, 16, 16) and bool((out == 77).all())


# ----------------------------------------------------------------------------- batches


def test_stack_pictures_is_torch_stack_laid_out_channels_last():
    pictures = [_picture(8, 8, seed=0, layout="hwc"), _picture(8, 8, seed=1, layout="chw"),
                _picture(12, 8, seed=2, layout="hwc")[:, 2:10, :]]
    batch = stack_pictures(pictures)
    assert torch.equal(batch, torch.stack([picture.contiguous() for picture in pictures]))
    assert batch.is_contiguous(memory_format=torch.channels_last)


def test_loader_batches_cross_from_a_worker_with_their_layout_and_labels():
    class Pictures(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, index):
            return build_transforms(16, train=False)(_picture(20, 24, seed=index, layout="hwc")), 10 + index, index

    loader = torch.utils.data.DataLoader(Pictures(), batch_size=3, num_workers=1,
                                         collate_fn=collate_skipping_bad_images)
    for images, labels, indices, skipped in loader:
        assert images.is_contiguous(memory_format=torch.channels_last) and skipped == []
        assert torch.equal(labels, indices + 10)
        for image, index in zip(images, indices.tolist()):
            assert torch.equal(image, Pictures()[index][0])


def test_channels_last_batches_embed_like_contiguous_ones():
    from model import build_embedder

    torch.manual_seed(0)
    model = build_embedder("tiny", 32, 8).eval()
    batch = stack_pictures([_picture(32, 32, seed=seed, layout="hwc") for seed in range(3)])
    assert not batch.is_contiguous()
    with torch.no_grad():
        assert torch.allclose(model(batch), model(batch.contiguous()), atol=1e-6)


def test_crop_side_stays_near_the_requested_fraction_of_the_side():
    # The smallest crop keeps sqrt(min scale) of the side: what transforms.decode_size relies on.
    side = 400
    box = random_crop_box(side, side, SCALE, [0.0, 0.5, 0.0, 0.0])
    assert box[2] == box[3] == round(side * math.sqrt(SCALE[0]))


def test_pil_pictures_are_converted_as_image_files_are():
    import numpy as np

    transparent_red = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    half_grey_16_bit = Image.fromarray(np.full((30, 40), 32768, dtype=np.uint16))
    for train in (True, False):
        transform = build_transforms(16, train=train)
        assert bool((transform(transparent_red) == 255).all())  # transparent pixels on white, not red
        assert bool((transform(half_grey_16_bit) == 128).all())  # 32768 / 257, not clipped to white


@pytest.mark.parametrize("ratio_draw", [0.0, 0.5, 1.0])
def test_decode_size_leaves_even_the_smallest_crop_enough_pixels(ratio_draw):
    from dataloaders import decode_size

    side = decode_size(256, train=True, min_crop_scale=SCALE[0])
    _, _, crop_height, crop_width = random_crop_box(side, side, SCALE, [0.0, ratio_draw, 0.0, 0.0])
    assert min(crop_height, crop_width) >= 256
