"""Image transforms: random crops and flips for training, a fixed resize and centre crop for evaluation.

They stop at uint8 tensors: conversion to float and normalisation happen on the device, inside the
model (`model.Embedder`), so workers do less work and move a quarter of the bytes.

Both are plain callables on uint8 tensors rather than a torchvision `v2.Compose`: the same crop rule
and the same pixels (tested against `v2.RandomResizedCrop` + `v2.RandomHorizontalFlip` and `v2.Resize`
+ `v2.CenterCrop`), without v2's per-call dispatch and its one tensor operation per random number, and
the crop is laid out channels-last before it is resized, which lets torch's uint8 resize kernel skip
repacking pixels.
"""

from __future__ import annotations

import math

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from .image_files import to_rgb

# Evaluation resizes the short side to image_size / 0.875 before the centre crop (256 -> 292,
# 224 -> 256), the usual ImageNet ratio, so the crop keeps the object and drops some border.
EVAL_CROP_FRACTION = 0.875
CROP_ASPECT_RATIOS = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default
CROP_ATTEMPTS = 10  # torchvision's too: boxes drawn before falling back to the centre crop


class TrainCropAndFlip:
    """RandomResizedCrop(size, scale=(min_crop_scale, 1), ratio=(3/4, 4/3), bilinear, antialiased), then a
    horizontal flip with probability 1/2: torchvision's crop rule (`random_crop_box`) and pixels."""

    def __init__(self, image_size: int, min_crop_scale: float = 0.16) -> None:
        self.image_size = image_size
        self.scale = (min_crop_scale, 1.0)

    def __call__(self, picture: torch.Tensor | Image.Image) -> torch.Tensor:
        picture = as_uint8_tensor(picture)
        # Every random number of the item in one draw from torch's generator (which DataLoader seeds per
        # worker): a draw per value, as torchvision does, cost a third of this call.
        *crop_draws, flip_draw = torch.rand(4 * CROP_ATTEMPTS + 1).tolist()
        top, left, height, width = random_crop_box(picture.shape[1], picture.shape[2], self.scale, crop_draws)
        crop = channels_last(picture[:, top:top + height, left:left + width])
        out = F.resize(crop, [self.image_size, self.image_size], antialias=True)
        return out.flip(-1) if flip_draw < 0.5 else out

    def __repr__(self) -> str:
        return f"TrainCropAndFlip(image_size={self.image_size}, min_crop_scale={self.scale[0]})"


class EvalResizeAndCentreCrop:
    """Resize the short side to image_size / 0.875 (bilinear, antialiased), then crop the centre square."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, picture: torch.Tensor | Image.Image) -> torch.Tensor:
        picture = channels_last(as_uint8_tensor(picture))
        resized = F.resize(picture, eval_resize_size(self.image_size), antialias=True)
        return F.center_crop(resized, [self.image_size, self.image_size])

    def __repr__(self) -> str:
        return f"EvalResizeAndCentreCrop(image_size={self.image_size})"


def random_crop_box(height: int, width: int, scale: tuple[float, float], uniforms: list[float]
                    ) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a RandomResizedCrop, from uniform [0, 1) numbers, 4 per attempt.

    torchvision's rule: up to CROP_ATTEMPTS attempts draw an area fraction in `scale` and a
    log-uniform aspect ratio in [3/4, 4/3] and keep the first box that fits, placed uniformly; when none
    fits, the centre crop of the whole picture clamped to that ratio range.
    """
    area = height * width
    low_log_ratio, high_log_ratio = math.log(CROP_ASPECT_RATIOS[0]), math.log(CROP_ASPECT_RATIOS[1])
    for attempt in range(len(uniforms) // 4):
        area_draw, ratio_draw, top_draw, left_draw = uniforms[4 * attempt:4 * attempt + 4]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * area_draw)
        aspect_ratio = math.exp(low_log_ratio + (high_log_ratio - low_log_ratio) * ratio_draw)
        crop_width = round(math.sqrt(target_area * aspect_ratio))
        crop_height = round(math.sqrt(target_area / aspect_ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = min(int(top_draw * (height - crop_height + 1)), height - crop_height)
            left = min(int(left_draw * (width - crop_width + 1)), width - crop_width)
            return top, left, crop_height, crop_width
    picture_ratio = width / height
    if picture_ratio < CROP_ASPECT_RATIOS[0]:
        crop_width, crop_height = width, round(width / CROP_ASPECT_RATIOS[0])
    elif picture_ratio > CROP_ASPECT_RATIOS[1]:
        crop_width, crop_height = round(height * CROP_ASPECT_RATIOS[1]), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def build_transforms(image_size: int, train: bool, min_crop_scale: float = 0.16):
    """RGB picture (uint8 tensor [3, H, W], or a PIL image) -> uint8 tensor [3, image_size, image_size].

    train: RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0)) + RandomHorizontalFlip; the crop keeps
           between min_crop_scale and all of the image's area (0.16 is the usual DML setting).
    eval:  Resize(int(image_size / 0.875)) of the short side + CenterCrop(image_size); deterministic.

    The result is stored pixel by pixel (channel stride 1, as channels-last), which `collate_skipping_bad_images`
    batches with a plain copy. Build once and hand to the dataset; nothing here depends on the item.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not 0 < min_crop_scale <= 1:
        raise ValueError(f"min_crop_scale must be in (0, 1], got {min_crop_scale}")
    return TrainCropAndFlip(image_size, min_crop_scale) if train else EvalResizeAndCentreCrop(image_size)


def as_uint8_tensor(picture: torch.Tensor | Image.Image) -> torch.Tensor:
    if isinstance(picture, Image.Image):  # converted as image files are: 16-bit tones kept, transparency on white
        picture = F.pil_to_tensor(to_rgb(picture))
    if picture.dtype != torch.uint8 or picture.ndim != 3 or picture.shape[0] != 3:
        raise ValueError(f"expected an RGB uint8 tensor [3, H, W], got {picture.dtype} {tuple(picture.shape)}")
    return picture


def channels_last(picture: torch.Tensor) -> torch.Tensor:
    """The same [3, H, W] picture stored pixel by pixel (H, W, 3 in memory); free when it already is
    (torchvision's JPEG decoder returns that layout)."""
    return picture.permute(1, 2, 0).contiguous().permute(2, 0, 1)


def eval_resize_size(image_size: int) -> int:
    return int(image_size / EVAL_CROP_FRACTION)


def decode_size(image_size: int, train: bool, min_crop_scale: float = 0.16) -> int:
    """The smallest short side a decoded image needs so that no output pixel is upsampled.

    Evaluation needs the resize target. Training's smallest crop keeps min_crop_scale of the area; at the
    most elongated aspect ratio (3/4 or 4/3) its short side is sqrt(min_crop_scale * 3/4) of a square
    picture's side (34.6% at 0.16), and it is then resized to image_size.
    """
    if train:
        return math.ceil(image_size / math.sqrt(min_crop_scale * CROP_ASPECT_RATIOS[0]))
    return eval_resize_size(image_size)
