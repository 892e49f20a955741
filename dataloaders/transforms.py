"""Image transforms: random crops and flips for training, a fixed resize and centre crop for evaluation."""

import torch
from torchvision.transforms import v2

# Evaluation resizes the short side to image_size / 0.875 before the centre crop (256 -> 292,
# 224 -> 256), the usual ImageNet ratio, so the crop keeps the object and drops some border.
EVAL_CROP_FRACTION = 0.875


def build_transforms(image_size: int, mean: tuple, std: tuple, train: bool, min_crop_scale: float = 0.16) -> v2.Compose:
    """PIL RGB image -> float32 tensor [3, image_size, image_size], normalised with `mean` / `std`.

    train: RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0)) + RandomHorizontalFlip; the crop keeps
           between min_crop_scale and all of the image's area (0.16 is the usual DML setting).
    eval:  Resize(int(image_size / 0.875)) of the short side + CenterCrop(image_size); deterministic.

    Build once and hand to the dataset; nothing here depends on the item.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    if not 0 < min_crop_scale <= 1:
        raise ValueError(f"min_crop_scale must be in (0, 1], got {min_crop_scale}")
    if train:
        geometry = [v2.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0)), v2.RandomHorizontalFlip()]
    else:
        geometry = [v2.Resize(int(image_size / EVAL_CROP_FRACTION)), v2.CenterCrop(image_size)]
    return v2.Compose(
        [
            *geometry,
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )
