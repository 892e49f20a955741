"""Replay: when fine-tuning on new classes, mix a fraction of the earlier classes' images into training.

A model fine-tuned only on new classes drifts away from what it learned on the earlier ones (forgetting);
seeing a few of their images keeps it closer (bench/continual_bench.py measures the trade-off).
"""

from __future__ import annotations

import numpy as np

from .image_lists import ImageList


def replay_indices(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of `fraction` of each class's images, at least 2 per class (one positive pair), sorted.

    labels: int [N]. A class of one image keeps it (it still serves as a negative). The draw depends only
    on (labels, fraction, seed). Returns int64 [M], M <= N.
    """
    generator = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        keep = min(len(members), max(2, round(fraction * len(members))))
        chosen.append(generator.choice(members, size=keep, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, dtype=np.int64)


def with_replay(train: ImageList, replay: ImageList, fraction: float, seed: int,
                validation_labels: np.ndarray) -> ImageList:
    """The training split plus `replay_indices` of `replay`; both lists' paths are relative to the same root.

    Class ids keep their meaning: an id found in both lists is one class. A replayed class may not be a
    validation class (its images would train the model that validation judges): that raises ValueError.
    """
    if train.root != replay.root:
        raise ValueError(f"replayed images are read relative to {replay.root}, training images to {train.root}")
    shared = np.intersect1d(np.unique(replay.labels), validation_labels)
    if shared.size:
        raise ValueError(f"{shared.size} replayed class id(s) are also validation classes (first: {shared[0]}): "
                         f"give the earlier classes ids that the new list does not use")
    replayed = replay.subset(replay_indices(replay.labels, fraction, seed))
    return ImageList(train.root, train.paths + replayed.paths, np.concatenate([train.labels, replayed.labels]),
                     np.concatenate([train.super_labels, replayed.super_labels]), train.class_names)
