"""Data loading: image lists (SOP files, folder trees), class-disjoint splits, batch samplers,
transforms and the image dataset."""

from .datasets import (ImageDataset, SkippedImage, collate_skipping_bad_images, ignore_stop_signals,
                       stop_loader_workers)
from .image_files import BadImageError, load_rgb_image
from .image_lists import DataFormatError, ImageList, read_folder_tree, read_sop_list, write_sop_list
from .samplers import PKBatchSampler, RandomTripletBatchSampler
from .skipped_images import SkippedImageLog
from .splits import split_classes
from .transforms import build_transforms, decode_size

__all__ = [
    "BadImageError",
    "DataFormatError",
    "ImageDataset",
    "ImageList",
    "PKBatchSampler",
    "RandomTripletBatchSampler",
    "SkippedImage",
    "SkippedImageLog",
    "build_transforms",
    "collate_skipping_bad_images",
    "ignore_stop_signals",
    "decode_size",
    "load_rgb_image",
    "read_folder_tree",
    "read_sop_list",
    "split_classes",
    "stop_loader_workers",
    "write_sop_list",
]
