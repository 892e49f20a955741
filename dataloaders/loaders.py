"""From the `data` section of a configuration to image lists and DataLoaders, for every mode alike."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from errors import UsageError

from .datasets import ImageDataset, collate_skipping_bad_images, ignore_stop_signals
from .image_lists import read_folder_tree, read_sop_list
from .replay import with_replay
from .samplers import PKBatchSampler, RandomTripletBatchSampler, ShuffleBatchSampler
from .splits import split_classes
from .transforms import build_transforms, decode_size, eval_resize_size


def worker_count(configured: int) -> int:
    """data.num_workers: -1 = one loader process per core this process may run on."""
    return len(os.sched_getaffinity(0)) if configured == -1 else configured


def has_test_split(data) -> bool:
    """SOP-format lists always name a test list; a folder catalogue has one only with data.test_root."""
    return data.format != "folder" or bool(data.test_root)


def resolve_image_lists(data, seed: int, need_train: bool, need_test: bool, ignore_cache: bool = False):
    """(train, validation, test) ImageLists from the configured format; None where not needed.

    `data` is the configuration's data section; `seed` draws the demo dataset. With data.cache_dir set,
    the lists point into the verified cache instead of data.root. List lines and folder entries leading
    outside their root are refused unless data.allow_outside_root. With data.replay_list, the training split
    also holds data.replay_fraction of those earlier classes' images (drawn by `seed`).
    """
    root = Path(data.root)
    if data.format == "demo":
        from .demo_data import ensure_demo_dataset

        ensure_demo_dataset(root, data.demo_classes, data.demo_images_per_class, data.image_size, seed)
    elif not root.is_dir():
        raise UsageError(f"data.root '{root}' does not exist; point data.root at your {data.format} dataset "
                         f"(see README: 'Getting SOP'), or run the demo: python main.py --mode demo")
    train = validation = test = None
    outside = data.allow_outside_root
    if need_train:
        full = (read_folder_tree(root, allow_outside_root=outside) if data.format == "folder"
                else read_sop_list(root / data.train_list, root, outside))
        train_indices, val_indices = split_classes(full.labels, data.val_fraction, data.split_seed)
        train, validation = full.subset(train_indices), full.subset(val_indices)
        if data.replay_list:  # earlier classes' images, against forgetting when fine-tuning on new ones
            replay = read_sop_list(root / data.replay_list, root, outside)
            try:
                train = with_replay(train, replay, data.replay_fraction, seed, validation.labels)
            except ValueError as error:
                raise UsageError(f"data.replay_list {data.replay_list}: {error}") from None
    if need_test:
        if data.format == "folder":
            if not data.test_root:
                raise UsageError("data.test_root is empty: the folder format needs a separate folder of test classes")
            test = read_folder_tree(Path(data.test_root), allow_outside_root=outside)
        else:
            test = read_sop_list(root / data.test_list, root, outside)
    if data.cache_dir and not ignore_cache:
        from .cache import use_cache

        train, validation, test = (None if image_list is None else use_cache(image_list, Path(data.cache_dir),
                                                                            eval_resize_size(data.image_size))
                                   for image_list in (train, validation, test))
    return train, validation, test


def evaluation_loader(image_list, data, batch_size: int, device: torch.device,
                      items: range | None = None) -> torch.utils.data.DataLoader:
    """Every image once (or those at positions `items`: a process's shard), in list order, with the evaluation
    transforms."""
    workers = worker_count(data.num_workers)
    on_device = data.eval_decode == "device"  # the workers read JPEG bytes; `device` decodes a batch at once
    if on_device:
        from .device_decode import DeviceDecodingLoader, JpegBytesDataset, collate_jpeg_bytes
    dataset = (JpegBytesDataset if on_device else ImageDataset)(
        image_list, build_transforms(data.image_size, train=False), decode_size(data.image_size, train=False),
        skip_bad_images=data.on_bad_image == "skip", allow_outside_root=data.allow_outside_root,
        max_image_bytes=data.max_image_bytes)
    # Items keep their list positions (`items`: a process's shard): the loader yields those as indices.
    loaded = dataset if items is None else torch.utils.data.Subset(dataset, items)
    loader = torch.utils.data.DataLoader(loaded, batch_size=batch_size, shuffle=False, num_workers=workers,
                                         pin_memory=device.type == "cuda" and not on_device,
                                         persistent_workers=workers > 0, worker_init_fn=ignore_stop_signals,
                                         collate_fn=collate_jpeg_bytes if on_device else collate_skipping_bad_images)
    if not on_device:
        return loader
    return DeviceDecodingLoader(loader, device, data.image_size, dataset.skip_bad_images, dataset.read_decoded)


def batch_shape_hint(data, num_images: int, usable_classes: int) -> str:
    """What to set when the configured batch does not fit the training split: the largest values that do."""
    if data.sampler == "triplets":
        return f"use data.triplets_per_batch <= {max(1, num_images // 3)}"
    if data.sampler == "shuffle":
        return f"use data.classes_per_batch x data.images_per_class <= {num_images}"
    k = data.images_per_class
    largest_p = min(usable_classes, num_images // k)
    if largest_p >= 2:
        return f"with data.images_per_class={k}, use data.classes_per_batch <= {largest_p}"
    if usable_classes >= 2:  # P cannot go below 2, so K must come down
        return f"with data.classes_per_batch=2, use data.images_per_class <= {num_images // 2}"
    return (f"the split has {usable_classes} class(es) with 2 or more images: a P x K batch needs at least 2; "
            f"use more training data, or a smaller data.val_fraction")


def training_loader(image_list, data, seed: int, device: torch.device, rank: int = 0,
                    world_size: int = 1) -> torch.utils.data.DataLoader:
    """Batches from the configured sampler (P x K classes by default), with the training transforms.

    rank, world_size: with several processes, each loads its rank's share of every global batch (the
    configured batch is the global one).
    """
    import numpy as np

    batch_images = (3 * data.triplets_per_batch if data.sampler == "triplets"
                    else data.classes_per_batch * data.images_per_class)
    _, class_sizes = np.unique(image_list.labels, return_counts=True)
    usable_classes = int((class_sizes >= 2).sum())
    if batch_images > len(image_list):
        keys = ("3 x data.triplets_per_batch" if data.sampler == "triplets"
                else "data.classes_per_batch x data.images_per_class")
        raise UsageError(f"{keys} = {batch_images} images per batch, more than the {len(image_list)} images of the "
                         f"training split: {batch_shape_hint(data, len(image_list), usable_classes)}")
    try:
        if data.sampler == "pk":
            batch_sampler = PKBatchSampler(image_list.labels, data.classes_per_batch, data.images_per_class, seed)
        elif data.sampler == "shuffle":
            batch_sampler = ShuffleBatchSampler(len(image_list), batch_images, seed)
        else:
            batch_sampler = RandomTripletBatchSampler(image_list.labels, data.triplets_per_batch, seed)
    except ValueError as error:  # e.g. P larger than the number of usable classes
        raise UsageError(f"training split of {len(image_list)} images: {error}; "
                         f"{batch_shape_hint(data, len(image_list), usable_classes)}") from None
    try:
        batch_sampler.set_rank_share(rank, world_size)
    except ValueError as error:  # the global batch must split evenly over the processes
        raise UsageError(f"{error} (the configured batch is the global one, shared by all processes)") from None
    workers = worker_count(data.num_workers)
    dataset = ImageDataset(image_list, build_transforms(data.image_size, train=True, min_crop_scale=data.min_crop_scale),
                           decode_size(data.image_size, train=True, min_crop_scale=data.min_crop_scale),
                           skip_bad_images=data.on_bad_image == "skip", allow_outside_root=data.allow_outside_root,
                           max_image_bytes=data.max_image_bytes)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                       prefetch_factor=4 if workers > 0 else None, generator=torch.Generator(),
                                       worker_init_fn=ignore_stop_signals, collate_fn=collate_skipping_bad_images)
