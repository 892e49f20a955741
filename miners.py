"""Triplet miners: choose (anchor, positive, negative) indices from a batch; losses.py scores them.

Every miner has the signature

    miner(embeddings: Tensor[B, D], labels: Tensor[B] int64, margin: float, generator: Generator | None)
        -> (anchors, positives, negatives), each an int64 Tensor[T] on the embeddings' device,

where a positive has the anchor's label (and is not the anchor itself) and a negative has another label.
Miners run under no_grad: they only pick indices, the gradient flows through the loss. Arguments a miner
does not need (`margin`, `generator`) are accepted anyway so that all of them are interchangeable.

Corner cases shared by all miners:
    - An anchor with no positive or no negative in the batch yields no triplet.
    - A batch with a single class, a single image, or no image gives three empty int64 tensors.
    - Duplicate embeddings (distance exactly 0) are fine; ties are broken by smallest index.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from losses import pairwise_distances

Triplets = tuple[Tensor, Tensor, Tensor]


def _positive_and_negative_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(B, B) bool masks: is_positive[a, p] = same label and p != a; is_negative[a, n] = different label."""
    same_label = labels[:, None] == labels[None, :]
    is_positive = same_label & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return is_positive, ~same_label


@torch.no_grad()
def all_triplets(embeddings: Tensor, labels: Tensor, margin: float,
                 generator: torch.Generator | None = None) -> Triplets:
    """Every valid triplet: labels[a] == labels[p], a != p, labels[n] != labels[a].

    Args:
        embeddings: (B, D); only its size and device are used.
        labels: (B,) int64 class ids.
        margin, generator: unused.

    Returns:
        (anchors, positives, negatives), int64 (T,), in lexicographic order of (a, p, n).
        T = sum over anchors of (#positives * #negatives); e.g. 8 classes x 8 images gives 64 * 7 * 56.

    Corner cases:
        - Anchors without a positive or a negative contribute nothing; one class gives T == 0.
        - Builds a (B, B, B) bool mask: fine for training batches (B = 256 is 16 MB), not for B in the
          thousands.
    """
    labels = labels.to(embeddings.device)
    is_positive, is_negative = _positive_and_negative_masks(labels)
    is_triplet = is_positive[:, :, None] & is_negative[:, None, :]  # (a, p, n)
    # nonzero walks the mask in row-major order, which is lexicographic order of (a, p, n).
    return torch.nonzero(is_triplet, as_tuple=True)


@torch.no_grad()
def semihard_triplets(embeddings: Tensor, labels: Tensor, margin: float,
                      generator: torch.Generator | None = None) -> Triplets:
    """Semi-hard triplets: the valid triplets with d(a, p) < d(a, n) < d(a, p) + margin.

    The negative is already farther than the positive (so the triplet is not "hard", which early in
    training tends to collapse the embedding) but still inside the margin (so the loss is non-zero).

    Args:
        embeddings: (B, D).
        labels: (B,) int64 class ids.
        margin: the triplet loss margin.
        generator: unused.

    Returns:
        (anchors, positives, negatives), int64 (T,), lexicographic in (a, p, n) like `all_triplets`.

    Corner cases:
        - Both inequalities are strict: a negative exactly as far as the positive, or exactly at
          d(a, p) + margin, is not semi-hard. A duplicate of the anchor (distance 0) as positive with a
          negative also at distance 0 is therefore excluded.
        - Anchors without a positive or a negative contribute nothing; T may be 0.
    """
    labels = labels.to(embeddings.device)
    is_positive, is_negative = _positive_and_negative_masks(labels)
    distances = pairwise_distances(embeddings)
    anchor_positive = distances[:, :, None]  # (a, p, 1)
    anchor_negative = distances[:, None, :]  # (a, 1, n)
    is_semihard = (anchor_positive < anchor_negative) & (anchor_negative < anchor_positive + margin)
    is_triplet = is_positive[:, :, None] & is_negative[:, None, :] & is_semihard
    return torch.nonzero(is_triplet, as_tuple=True)


def _no_triplets(device: torch.device) -> Triplets:
    empty = torch.empty(0, dtype=torch.int64, device=device)
    return empty, empty.clone(), empty.clone()


def _smallest_index_where(mask: Tensor) -> Tensor:
    """(B, B) bool -> (B,) int64: the smallest column index that is True in each row (B if none).

    Spelled out rather than relying on argmax/argmin picking the first of tied values.
    """
    columns = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, columns, mask.shape[1]).amin(dim=1)


@torch.no_grad()
def batch_hard_triplets(embeddings: Tensor, labels: Tensor, margin: float,
                        generator: torch.Generator | None = None) -> Triplets:
    """Batch-hard triplets: per anchor, its farthest positive and its nearest negative.

    Args:
        embeddings: (B, D).
        labels: (B,) int64 class ids.
        margin, generator: unused.

    Returns:
        (anchors, positives, negatives), int64 (T,), one triplet per anchor that has at least one
        positive and one negative, anchors ascending. positive = argmax_p d(a, p) over positives,
        negative = argmin_n d(a, n) over negatives.

    Corner cases:
        - Ties (e.g. duplicate embeddings) go to the smallest index.
        - Anchors without a positive or a negative are skipped; one class gives T == 0.
    """
    if len(labels) == 0:  # amax/amin cannot reduce over an empty dimension
        return _no_triplets(embeddings.device)
    labels = labels.to(embeddings.device)
    is_positive, is_negative = _positive_and_negative_masks(labels)
    distances = pairwise_distances(embeddings)
    positive_distances = torch.where(is_positive, distances, -torch.inf)
    negative_distances = torch.where(is_negative, distances, torch.inf)
    # Anchors without any positive/negative have an all -inf/+inf row; they are dropped below, so what
    # the tie-break picks for them does not matter.
    hardest_positive = _smallest_index_where(
        positive_distances == positive_distances.amax(dim=1, keepdim=True))
    hardest_negative = _smallest_index_where(
        negative_distances == negative_distances.amin(dim=1, keepdim=True))
    anchors = torch.nonzero(is_positive.any(dim=1) & is_negative.any(dim=1)).flatten()
    return anchors, hardest_positive[anchors], hardest_negative[anchors]


@torch.no_grad()
def random_triplets(embeddings: Tensor, labels: Tensor, margin: float,
                    generator: torch.Generator | None = None) -> Triplets:
    """Random triplets: per anchor, one positive and one negative drawn uniformly at random.

    Args:
        embeddings: (B, D); only its size and device are used.
        labels: (B,) int64 class ids.
        margin: unused.
        generator: source of randomness (torch's default generator if None). The draws happen on the
            generator's device and the result is moved to the embeddings' device, so a CPU generator
            works for GPU batches and a given seed gives the same triplets on any device.

    Returns:
        (anchors, positives, negatives), int64 (T,), one triplet per anchor that has at least one
        positive and one negative, anchors ascending.

    Corner cases:
        - Anchors without a positive or a negative are skipped; one class gives T == 0.
        - Always consumes 2 * B * B draws from the generator, whatever the labels, so the random stream
          of later batches does not depend on this batch's content.
    """
    if len(labels) == 0:  # argmax cannot reduce over an empty dimension
        return _no_triplets(embeddings.device)
    device = generator.device if generator is not None else embeddings.device
    is_positive, is_negative = _positive_and_negative_masks(labels.to(device))
    batch_size = len(labels)
    # Each candidate gets a random key in [0, 1); the largest key among an anchor's positives is a
    # uniform choice among them (two equal keys are too unlikely to bias it). Keys of non-candidates are
    # -1, so they never win.
    positive_keys = torch.rand((batch_size, batch_size), generator=generator, device=device)
    negative_keys = torch.rand((batch_size, batch_size), generator=generator, device=device)
    positives = torch.where(is_positive, positive_keys, -1.0).argmax(dim=1)
    negatives = torch.where(is_negative, negative_keys, -1.0).argmax(dim=1)
    anchors = torch.nonzero(is_positive.any(dim=1) & is_negative.any(dim=1)).flatten()
    return tuple(t.to(embeddings.device) for t in (anchors, positives[anchors], negatives[anchors]))


MINERS: dict[str, Callable[..., Triplets]] = {
    "all": all_triplets,
    "semihard": semihard_triplets,
    "batchhard": batch_hard_triplets,
    "random": random_triplets,
}


def triplets_to_pairs(triplets: Triplets) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Split triplets into the unique (anchor, positive) and unique (anchor, negative) pairs.

    Lets contrastive_loss train on whatever any miner picked.

    Args:
        triplets: (anchors, positives, negatives), int64 (T,).

    Returns:
        ((i, j) positive pairs, (i, j) negative pairs), int64, each sorted lexicographically by (i, j)
        with duplicates removed. (a, p) and (p, a) are different pairs and both kept.

    Corner cases:
        - T == 0 gives four empty int64 tensors.
    """
    anchors, positives, negatives = triplets

    def unique_pairs(first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
        pairs = torch.unique(torch.stack([first, second], dim=1), dim=0)  # (P, 2), sorted row-wise
        return pairs[:, 0], pairs[:, 1]

    return unique_pairs(anchors, positives), unique_pairs(anchors, negatives)
