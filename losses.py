"""Distances and losses over a batch of embeddings; a miner (miners.py) decides which indices to score.

Every loss takes the embeddings plus index tensors and returns a float32 scalar that stays connected to
the autograd graph even when nothing is scored, so `loss.backward()` always works.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Squared distances at or below this are treated as exactly zero. It also keeps sqrt away from 0, where
# its derivative is infinite.
SQUARED_DISTANCE_EPS = 1e-12


def pairwise_distances(embeddings: Tensor) -> Tensor:
    """Euclidean distance between every pair of rows.

    Args:
        embeddings: (B, D), any floating dtype; need not be L2-normalised.

    Returns:
        (B, B) distances in float32 (float64 if the input is float64). Symmetric, diagonal exactly 0.

    Corner cases:
        - bf16/fp16 input, or a caller running under autocast: computed in float32 regardless.
        - Two identical rows: their distance is exactly 0 and its gradient is 0, not NaN.
        - B == 0: returns a (0, 0) tensor.
    """
    # Low-precision inputs are cast up: distances between unit vectors differ in the 3rd decimal,
    # below bf16 resolution, and the subtraction below cancels catastrophically in half precision.
    x = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
    # Autocast would otherwise run the matmul in bf16/fp16 again.
    with torch.autocast(device_type=x.device.type, enabled=False):
        gram = x @ x.T  # (B, B)
    # Taking the norms from the Gram diagonal (not a separate reduction) makes the squared distance of a
    # row to itself, or to an identical row, cancel exactly to 0.
    squared_norms = gram.diagonal()
    squared = (squared_norms[:, None] + squared_norms[None, :] - 2 * gram).clamp_min(0)
    is_zero = (squared <= SQUARED_DISTANCE_EPS) | torch.eye(len(x), dtype=torch.bool, device=x.device)
    # torch.where (not in-place assignment) keeps autograd intact; the clamp keeps sqrt's gradient finite
    # in the masked-out branch, whose gradient would otherwise be inf * 0 = NaN.
    return torch.where(is_zero, 0.0, squared.clamp_min(SQUARED_DISTANCE_EPS).sqrt())


def _mean_of_active(losses: Tensor) -> Tensor:
    """Mean over the entries > 0 (as pytorch-metric-learning's AvgNonZeroReducer); 0 if there are none.

    The result is still a graph-connected scalar when `losses` is empty or all zero, and dividing by the
    count avoids a data-dependent branch (no CPU-GPU sync).
    """
    num_active = (losses > 0).sum().clamp_min(1)
    return losses.sum() / num_active


def triplet_margin_loss(embeddings: Tensor, triplets: tuple[Tensor, Tensor, Tensor], margin: float) -> Tensor:
    """Triplet margin loss: mean over active triplets of relu(d(a, p) - d(a, n) + margin).

    Args:
        embeddings: (B, D).
        triplets: (anchors, positives, negatives), int64 index tensors of shape (T,) into the batch.
        margin: how much farther than the positive the negative must be before the triplet stops counting.

    Returns:
        Scalar float32 tensor. Only triplets with a loss > 0 ("active") are averaged, so easy triplets do
        not dilute the gradient as training progresses.

    Corner cases:
        - T == 0, or no active triplet: returns 0, connected to the graph (backward gives zero gradients).
    """
    anchors, positives, negatives = triplets
    distances = pairwise_distances(embeddings)
    losses = torch.relu(distances[anchors, positives] - distances[anchors, negatives] + margin)  # (T,)
    return _mean_of_active(losses)


def contrastive_loss(embeddings: Tensor, positive_pairs: tuple[Tensor, Tensor],
                     negative_pairs: tuple[Tensor, Tensor], positive_margin: float,
                     negative_margin: float) -> Tensor:
    """Contrastive loss: pull positive pairs within `positive_margin`, push negatives beyond `negative_margin`.

    Args:
        embeddings: (B, D).
        positive_pairs: (i, j) int64 index tensors of shape (P,), pairs with the same label.
        negative_pairs: (i, j) int64 index tensors of shape (N,), pairs with different labels.
        positive_margin: positive pairs closer than this cost nothing.
        negative_margin: negative pairs farther than this cost nothing.

    Returns:
        Scalar float32 tensor:
        mean_active(relu(d(i, j) - positive_margin)) + mean_active(relu(negative_margin - d(i, j))),
        each mean taken over its own pairs with loss > 0, and 0 when it has none.

    Corner cases:
        - P == 0 and/or N == 0, or no active pair: that term is 0; the result stays graph-connected.
    """
    distances = pairwise_distances(embeddings)
    positive_losses = torch.relu(distances[positive_pairs[0], positive_pairs[1]] - positive_margin)  # (P,)
    negative_losses = torch.relu(negative_margin - distances[negative_pairs[0], negative_pairs[1]])  # (N,)
    return _mean_of_active(positive_losses) + _mean_of_active(negative_losses)
