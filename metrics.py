"""Retrieval metrics on a kNN neighbour matrix, as pure functions vectorised over queries.

Every query is scored against all *other* items (see `retrieval.nearest_neighbours`), so column 0 of the
neighbour matrix is the nearest other item. Notation, per query q:

* hits[q, i]: whether the (i + 1)-th nearest neighbour has q's class (i is 0-based, ranks are 1-based);
* R[q]: the number of other items of q's class (class size - 1), the "relevant" items;
* P(i): precision at rank i = (number of hits among the first i) / i.

Per-query functions return one value per query; `retrieval_metrics` averages them over the queries that
have R >= 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def neighbour_hits(neighbour_indices: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Which neighbours share the query's class.

    Args:
        neighbour_indices: [N, k] int64, row q holds the gallery indices of q's neighbours.
        labels: [N] int, the class of each item (query set == gallery).

    Returns:
        [N, k] bool, hits[q, i] = labels[neighbour_indices[q, i]] == labels[q].

    Example:
        >>> neighbour_hits(torch.tensor([[1, 2], [0, 2], [1, 0]]), torch.tensor([5, 5, 7]))
        tensor([[ True, False],
                [ True, False],
                [False, False]])
    """
    if neighbour_indices.ndim != 2 or neighbour_indices.shape[0] != labels.shape[0]:
        raise ValueError(f"neighbour_indices must be [N, k] with N = len(labels) = {labels.shape[0]}, "
                         f"got {tuple(neighbour_indices.shape)}")
    return labels[neighbour_indices] == labels.unsqueeze(1)


def relevant_counts(labels: torch.Tensor) -> torch.Tensor:
    """R: for each item, the number of OTHER items of its class (class size - 1).

    Args:
        labels: [N] int, any values (they need not be contiguous or non-negative).

    Returns:
        [N] int64. 0 for an item alone in its class.

    Example:
        >>> relevant_counts(torch.tensor([3, 9, 3, 3]))
        tensor([2, 0, 2, 2])
    """
    _, class_of_item, class_sizes = torch.unique(labels, return_inverse=True, return_counts=True)
    return class_sizes[class_of_item] - 1


def recall_at_k(hits: torch.Tensor, k: int) -> torch.Tensor:
    """Recall@k as used in deep metric learning: 1.0 if any of the k nearest neighbours is a hit.

    The same as CMC@k; Recall@1 is precision@1. (Not the information-retrieval recall, which would
    divide the number of hits by R.)

    Args:
        hits: [N, K] bool from `neighbour_hits`.
        k: 1 <= k <= K.

    Returns:
        [N] float32 of 0.0 / 1.0.

    Example:
        >>> recall_at_k(torch.tensor([[False, True], [False, False]]), 2)
        tensor([1., 0.])
    """
    _check_k(k, hits.shape[1], "recall@k")
    return hits[:, :k].any(dim=1).float()


def r_precision(hits: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    """R-Precision: the fraction of the R nearest neighbours that are hits.

    Args:
        hits: [N, K] bool, K >= max(R).
        num_relevant: [N] int, R per query (`relevant_counts`).

    Returns:
        [N] float32. NaN where R == 0 (undefined; `retrieval_metrics` leaves such queries out).

    Raises:
        ValueError: if K < max(R): the R nearest are not all known.

    Example:
        >>> r_precision(torch.tensor([[False, True, True]]), torch.tensor([2]))  # 1 of the first 2
        tensor([0.5000])
    """
    hits = _first_r_columns(hits, num_relevant, "R-Precision")
    within_r = _rank_mask(hits.shape[1], num_relevant)  # (N, max R)
    return (hits & within_r).sum(dim=1) / num_relevant.float()


def map_at_r(hits: torch.Tensor, num_relevant: torch.Tensor) -> torch.Tensor:
    """MAP@R of Musgrave et al. 2020, "A Metric Learning Reality Check".

    MAP@R = (1 / R) * sum_{i=1..R} P(i) * hit(i): precision at the rank of each hit within the R nearest,
    summed, divided by R (not by the number of hits, so missing relevant items count as zero).

    Args:
        hits: [N, K] bool, K >= max(R).
        num_relevant: [N] int, R per query.

    Returns:
        [N] float32 in [0, 1]. NaN where R == 0.

    Raises:
        ValueError: if K < max(R).

    Example:
        >>> map_at_r(torch.tensor([[False, True, True]]), torch.tensor([2]))  # (0 + 1/2) / 2
        tensor([0.2500])
    """
    hits = _first_r_columns(hits, num_relevant, "MAP@R")
    within_r = _rank_mask(hits.shape[1], num_relevant)
    precision = _precision_at_ranks(hits)
    return (precision * (hits & within_r)).sum(dim=1) / num_relevant.float()


def mean_reciprocal_rank(hits: torch.Tensor) -> torch.Tensor:
    """Reciprocal rank: 1 / (1-based rank of the first hit) among the K returned neighbours; 0 if none.

    Averaged over queries this is MRR. A query whose first hit lies beyond K scores 0 (a lower bound).

    Args:
        hits: [N, K] bool.

    Returns:
        [N] float32.

    Example:
        >>> mean_reciprocal_rank(torch.tensor([[False, True, True], [False, False, False]]))
        tensor([0.5000, 0.0000])
    """
    first_hit = hits.int().argmax(dim=1)  # argmax returns the first maximal position
    reciprocal = 1.0 / (first_hit + 1).float()
    return torch.where(hits.any(dim=1), reciprocal, torch.zeros_like(reciprocal))


def map_at_k(hits: torch.Tensor, num_relevant: torch.Tensor, k: int) -> torch.Tensor:
    """mAP@k: sum_{i=1..k} P(i) * hit(i), divided by min(k, R).

    Args:
        hits: [N, K] bool.
        num_relevant: [N] int, R per query.
        k: 1 <= k <= K.

    Returns:
        [N] float32 in [0, 1]. NaN where R == 0.

    Example:
        >>> map_at_k(torch.tensor([[True, False, True]]), torch.tensor([5]), 3)  # (1 + 2/3) / 3
        tensor([0.5556])
    """
    _check_k(k, hits.shape[1], "mAP@k")
    hits = hits[:, :k]
    precision = _precision_at_ranks(hits)
    return (precision * hits).sum(dim=1) / num_relevant.clamp(max=k).float()


def mean_by_group(per_query: torch.Tensor, groups: torch.Tensor) -> dict[int, float]:
    """The mean of a per-query metric within each group of queries (e.g. SOP's super classes), by bincount.

    Args:
        per_query: [Q] float, one metric value per query (e.g. `recall_at_k(hits, 1)`).
        groups: [Q] int, the group of each query; any values.

    Returns:
        {group: mean over that group's queries}, groups ascending. A group with no query does not appear.

    Example:
        >>> mean_by_group(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([7, 7, 2]))
        {2: 1.0, 7: 0.5}
    """
    if per_query.shape != groups.shape or per_query.ndim != 1:
        raise ValueError(f"per_query and groups must both be [Q], got {tuple(per_query.shape)} and {tuple(groups.shape)}")
    group_ids, group_of_query = torch.unique(groups, return_inverse=True)
    sums = torch.bincount(group_of_query, weights=per_query.double(), minlength=len(group_ids))
    counts = torch.bincount(group_of_query, minlength=len(group_ids))
    return dict(zip(group_ids.tolist(), (sums / counts).tolist()))


def retrieval_metrics(
    neighbour_indices: torch.Tensor,
    labels: torch.Tensor,
    recall_ks: Sequence[int] = (1, 10, 100, 1000),
    map_ks: Sequence[int] = (),
    groups: torch.Tensor | None = None,
) -> dict:
    """Recall@k for each k in `recall_ks`, mAP@k for each k in `map_ks`, MAP@R, R-Precision and MRR,
    averaged over queries; with `groups`, Recall@1 within each group of queries too.

    Args:
        neighbour_indices: [N, K] int64 from `retrieval.nearest_neighbours` (self excluded, nearest first).
        labels: [N] int class of each item.
        recall_ks: ks for Recall@k, each 1 <= k <= K.
        map_ks: ks for mAP@k (`map_at_k`), each 1 <= k <= K; none by default.
        groups: [N] int group of each item (e.g. SOP's super class), or None.

    Returns:
        {"recall@1": ..., "recall@10": ..., "map@<k>": ... for each of map_ks, "map@r": ..., "r_precision": ...,
         "mrr": ..., ["recall@1_by_group": {group: Recall@1 over its queries} (`mean_by_group`), with groups],
         "num_queries": int, "num_queries_without_relevant": int}. Metrics are Python floats in [0, 1],
        the mean over the queries with R >= 1 (`num_queries` of them). A query alone in its class
        (R == 0) has nothing to find: it is left out of every metric and counted in
        `num_queries_without_relevant` (and a group with no other query does not appear).

    Raises:
        ValueError: if K < the largest R among evaluated queries (MAP@R and R-Precision need the R
            nearest: search with k >= largest class size - 1), if a recall or mAP k exceeds K, or if no
            query has R >= 1.

    Example:
        >>> labels = torch.tensor([0, 0, 1, 1, 2])  # item 4 is alone in class 2
        >>> neighbours = torch.tensor([[1, 2], [2, 0], [0, 3], [2, 1], [0, 1]])
        >>> metrics = retrieval_metrics(neighbours, labels, recall_ks=(1, 2))
        >>> metrics["recall@1"], metrics["recall@2"], metrics["mrr"], metrics["num_queries_without_relevant"]
        (0.5, 1.0, 0.75, 1)
    """
    num_relevant = relevant_counts(labels)
    evaluated = num_relevant >= 1
    num_queries = int(evaluated.sum())
    if num_queries == 0:
        raise ValueError("no query has another item of its class: every metric is undefined")
    hits = neighbour_hits(neighbour_indices, labels)[evaluated]  # (num_queries, K)
    num_relevant = num_relevant[evaluated]
    width = hits.shape[1]
    if width < int(num_relevant.max()):
        raise ValueError(f"the neighbour matrix has {width} columns but the largest R is {int(num_relevant.max())}: "
                         "MAP@R and R-Precision need k >= the largest class size - 1")
    for k in recall_ks:
        _check_k(k, width, "recall@k")

    metrics: dict = {f"recall@{k}": recall_at_k(hits, k).mean().item() for k in recall_ks}
    metrics.update({f"map@{k}": map_at_k(hits, num_relevant, k).mean().item() for k in map_ks})
    metrics["map@r"] = map_at_r(hits, num_relevant).mean().item()
    metrics["r_precision"] = r_precision(hits, num_relevant).mean().item()
    metrics["mrr"] = mean_reciprocal_rank(hits).mean().item()
    if groups is not None:
        metrics["recall@1_by_group"] = mean_by_group(recall_at_k(hits, 1), groups[evaluated])
    metrics["num_queries"] = num_queries
    metrics["num_queries_without_relevant"] = len(labels) - num_queries
    return metrics


def _check_k(k: int, width: int, name: str) -> None:
    if not 1 <= k <= width:
        raise ValueError(f"{name} needs 1 <= k <= {width} (the neighbour matrix width), got k = {k}")


def _first_r_columns(hits: torch.Tensor, num_relevant: torch.Tensor, name: str) -> torch.Tensor:
    """hits[:, :max R], after checking the R nearest are all present. Columns past max R never count."""
    largest = int(num_relevant.max()) if num_relevant.numel() else 0
    if hits.shape[1] < largest:
        raise ValueError(f"{name} needs k >= largest R = {largest} neighbours per query, got {hits.shape[1]}")
    return hits[:, :largest]


def _rank_mask(width: int, num_relevant: torch.Tensor) -> torch.Tensor:
    """(N, width) bool: True at 0-based position i where i < R, i.e. within the R nearest."""
    return torch.arange(width, device=num_relevant.device).unsqueeze(0) < num_relevant.unsqueeze(1)


def _precision_at_ranks(hits: torch.Tensor) -> torch.Tensor:
    """(N, K) bool -> (N, K) float32: P(i) = hits among the first i / i, for ranks i = 1..K."""
    ranks = torch.arange(1, hits.shape[1] + 1, device=hits.device)
    return hits.cumsum(dim=1) / ranks
