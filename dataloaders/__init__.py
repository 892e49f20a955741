"""Data loading: image lists (SOP files, folder trees), class-disjoint splits, batch samplers,
transforms and the image dataset."""

from .datasets import ImageDataset, ignore_stop_signals
from .image_lists import DataFormatError, ImageList, read_folder_tree, read_sop_list, write_sop_list
from .samplers import PKBatchSampler, RandomTripletBatchSampler
from .splits import split_classes
from .transforms import build_transforms, decode_size

__all__ = [
    "DataFormatError",
    "ImageDataset",
    "ImageList",
    "PKBatchSampler",
    "RandomTripletBatchSampler",
    "build_transforms",
    "ignore_stop_signals",
    "decode_size",
    "read_folder_tree",
    "read_sop_list",
    "split_classes",
    "write_sop_list",
]
