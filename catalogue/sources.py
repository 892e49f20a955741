"""What to index or add, as an `ImageList`: image files, a folder tree, a SOP list, a plain list of paths, or
the configured test split. Labels that a source does not give are -1 (an item's label None)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from errors import UsageError

UNKNOWN_LABEL = -1


def unlabelled(paths: list[str]):
    """Image paths (absolute or relative to the current folder) -> an ImageList rooted at their common folder."""
    from dataloaders.image_lists import ImageList

    if not paths:
        raise UsageError("no images given")
    absolute = [os.path.abspath(path) for path in paths]
    root = os.path.commonpath([os.path.dirname(path) for path in absolute])
    return ImageList(Path(root), tuple(os.path.relpath(path, root) for path in absolute),
                     np.full(len(paths), UNKNOWN_LABEL), np.zeros(len(paths), dtype=np.int64))


def read_list_file(path: Path, allow_outside_root: bool = False):
    """A SOP list (header `image_id class_id super_class_id path`, paths relative to its folder), or a plain text
    file of image paths, one a line (relative paths relative to its folder; blank lines and `#` lines skipped)."""
    from dataloaders.image_lists import SOP_HEADER, read_sop_list

    if not path.is_file():
        raise UsageError(f"--list {path} does not exist")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    if lines and tuple(lines[0].split()) == SOP_HEADER:
        return read_sop_list(path, path.parent, allow_outside_root)
    entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not entries:
        raise UsageError(f"--list {path} names no image")
    return unlabelled([str(path.parent / entry) for entry in entries])


def images_to_index(images: list[str] | None, list_file: Path | None, config):
    """--images (one folder: a class tree; else files), --list FILE, or without either the configured test split."""
    from dataloaders.image_lists import read_folder_tree
    from dataloaders.loaders import resolve_image_lists

    if images and list_file:
        raise UsageError("give --images or --list, not both")
    if list_file:
        return read_list_file(Path(list_file), config.data.allow_outside_root)
    if images:
        if len(images) == 1 and Path(images[0]).is_dir():
            return read_folder_tree(Path(images[0]), allow_outside_root=config.data.allow_outside_root)
        missing = [image for image in images if not Path(image).is_file()]
        if missing:
            raise UsageError(f"--images: {missing[0]} is not a file{f' (and {len(missing) - 1} more)' if missing[1:] else ''}")
        return unlabelled(images)
    return resolve_image_lists(config.data, config.train.seed, need_train=False, need_test=True)[2]
