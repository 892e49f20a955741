"""The one miner pytorch-metric-learning lacks: the reference pipeline's random triplets, one per anchor.

Every other miner is PML's (objective.MINERS). Like them it returns `(anchors, positives, negatives)`, each an
int64 Tensor[T] of batch indices, where a positive has the anchor's label (and is not the anchor itself) and
a negative has another label.
"""

from __future__ import annotations

import torch
from torch import Tensor

Triplets = tuple[Tensor, Tensor, Tensor]


@torch.no_grad()
def random_triplets(embeddings: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Triplets:
    """Random triplets: per anchor, one positive and one negative drawn uniformly at random.

    Args:
        embeddings: (B, D); only its size and device are used.
        labels: (B,) int64 class ids.
        generator: source of randomness (torch's default generator if None). The draws happen on the
            generator's device and the result is moved to the embeddings' device, so a CPU generator
            works for GPU batches and a given seed gives the same triplets on any device.

    Returns:
        (anchors, positives, negatives), int64 (T,), one triplet per anchor that has at least one
        positive and one negative, anchors ascending.

    Corner cases:
        - Anchors without a positive or a negative are skipped; one class (or an empty batch) gives T == 0.
        - Always consumes 2 * B * B draws from the generator, whatever the labels, so the random stream
          of later batches does not depend on this batch's content.
    """
    device = generator.device if generator is not None else embeddings.device
    if len(labels) == 0:  # argmax cannot reduce over an empty dimension
        empty = torch.empty(0, dtype=torch.int64, device=embeddings.device)
        return empty, empty.clone(), empty.clone()
    labels = labels.to(device)
    same_label = labels[:, None] == labels[None, :]
    is_positive = same_label & ~torch.eye(len(labels), dtype=torch.bool, device=device)
    is_negative = ~same_label
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
