"""Image transforms: random crops and flips for training, a fixed resize and centre crop for evaluation.

They stop at uint8 tensors: conversion to float and normalisation happen on the device, inside the
model (`model.Embedder`), so workers do less work and move a quarter of the bytes.
"""

import math

from torchvision.transforms import v2

# Evaluation resizes the short side to image_size / 0.875 before the centre crop (256 -> 292,
# 224 -> 256), the usual ImageNet ratio, so the crop keeps the object and drops some border.
EVAL_CROP_FRACTION = 0.875


def build_transforms(image_size: int, train: bool, min_crop_scale: float = 0.16) -> v2.Compose:
    """RGB picture (uint8 tensor [3, H, W], or a PIL image) -> uint8 tensor [3, image_size, image_size].

    train: RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0)) + RandomHorizontalFlip; the crop keeps
           between min_crop_scale and all of the image's area (0.16 is the usual DML setting).
    eval:  Resize(int(image_size / 0.875)) of the short side + CenterCrop(image_size); deterministic.

    Build once and hand to the dataset; nothing here depends on the item.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not 0 < min_crop_scale <= 1:
        raise ValueError(f"min_crop_scale must be in (0, 1], got {min_crop_scale}")
    if train:
        geometry = [v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), antialias=True),
                    v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(eval_resize_size(image_size), antialias=True), v2.CenterCrop(image_size)]
    # To a uint8 tensor first (a no-op for tensors): torchvision's uint8 antialiased resize is 1.6-2x faster than
    # PIL's here.
    return v2.Compose([v2.ToImage(), *geometry])


def eval_resize_size(image_size: int) -> int:
    return int(image_size / EVAL_CROP_FRACTION)


def decode_size(image_size: int, train: bool, min_crop_scale: float = 0.16) -> int:
    """The smallest short side a decoded image needs so that no output pixel is upsampled.

    Evaluation needs the resize target. Training's smallest crop keeps min_crop_scale of the area,
    i.e. sqrt(min_crop_scale) of the side, and is then resized to image_size.
    """
    if train:
        return math.ceil(image_size / math.sqrt(min_crop_scale))
    return eval_resize_size(image_size)
