"""Class-disjoint train/validation split, as retrieval benchmarks require (SOP tests on unseen classes)."""

import numpy as np


def split_classes(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split item indices so that no class has items on both sides.

    The sorted unique classes (C of them) are permuted with `np.random.default_rng(seed)` and the
    first round(val_fraction * C) go to validation. SOP: 11,318 training classes with
    val_fraction=0.2048 gives 2,318 validation classes.

    Args:
        labels: int [N] class label per item.
        val_fraction: share of classes (not items) for validation, 0 <= val_fraction < 1.
        seed: the split depends only on labels, val_fraction and seed.

    Returns:
        (train_indices, val_indices): sorted int64 item indices into `labels`, together covering
        0..N-1 exactly once. val_fraction=0 gives an empty validation array.

    Raises:
        ValueError: val_fraction outside [0, 1), labels not 1-D, or val_fraction > 0 but rounding
            would leave either side without a class.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    all_items = np.arange(labels.size, dtype=np.int64)
    if val_fraction == 0.0:
        return all_items, np.empty(0, dtype=np.int64)

    classes = np.unique(labels)
    num_val = round(val_fraction * classes.size)
    if not 1 <= num_val <= classes.size - 1:
        raise ValueError(
            f"val_fraction={val_fraction} of {classes.size} classes gives {num_val} validation classes; "
            "both train and validation need at least one class"
        )
    val_classes = np.random.default_rng(seed).permutation(classes)[:num_val]
    is_val = np.isin(labels, val_classes)
    return all_items[~is_val], all_items[is_val]
