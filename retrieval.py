"""Exact k-nearest-neighbour search of a set against itself (query set == gallery), by inner product.

Evaluation is embed -> `nearest_neighbours` -> `metrics.retrieval_metrics`. The search never builds the
full N x N score matrix: queries are scored in blocks (torch backend) or by faiss, which blocks internally.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger("retrieval")

BACKENDS = ("auto", "torch", "faiss")
SCORE_BLOCK_BYTES = 512 * 1024**2  # default budget for one block's float32 [block, N] score matrix


def nearest_neighbours(
    embeddings: torch.Tensor | np.ndarray,
    k: int,
    *,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product kNN of every item against all *other* items.

    Embeddings are assumed L2-normalised, so the inner product ranks like cosine similarity.

    Args:
        embeddings: [N, D] float tensor or numpy array; finite values.
        k: neighbours per item, >= 1. Clamped to N - 1, since an item is never its own neighbour.
        backend: "torch" (blocked float32 matmul + topk on `device`), "faiss" (faiss.IndexFlatIP on the CPU;
            `device` is ignored), or "auto" (faiss if it imports and `device` is the CPU, else torch).
        device: where the torch backend computes.
        block_size: queries scored per block. Default: as many as keep one block's float32 [block, N] score
            matrix near 512 MiB, i.e. max(1, 512 MiB // (4 * N)) (2218 queries for N = 60,502).
            The faiss backend uses it only for the tie fix below.

    Returns:
        scores: [N, min(k, N - 1)] float32, the inner products, on the CPU.
        indices: [N, min(k, N - 1)] int64 gallery indices, on the CPU.

    Ordering contract (exact, whatever the backend):
        * Row i never contains i. The item itself is excluded *by index* (its own score is set to -inf
          before top-k, or it is dropped by index from the faiss answer), never by dropping column 0,
          so an exact duplicate of the query is still returned as a neighbour.
        * Each row is sorted by score descending, ties broken by the smaller gallery index first; i.e.
          row i is the first k of sorted((j for j != i), key=lambda j: (-score[i, j], j)).
        * Ties mean bitwise-equal float32 scores as the backend computed them. The two backends round
          differently in the last bit, so they may order near-ties (|difference| ~ 1e-7) differently.

    Corner cases / how exactness is achieved:
        torch.topk and faiss do not say which of several tied items survive the cut at position k. So
        k + 1 candidates are searched (k + 2 for faiss, to drop the item itself). Where candidate k + 1
        scores strictly lower than candidate k, the first k candidates are exactly the items scoring
        >= candidate k, so only their order needs fixing: sort by index, then stable-sort by -score.
        Where they tie, some equal-scoring item may have been left out, so that row is recomputed from
        its full score row with a stable sort (rows of duplicates or quantised embeddings; worst case a
        full sort of every row). For the faiss backend the recomputed rows are scored with a torch
        float32 matmul, whose last bit may differ from faiss's. When k == N - 1 every other item is
        returned and only the ordering is fixed. N == 1 gives [1, 0] outputs.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
        >>> nearest_neighbours(x, 5, backend="torch")[1]  # k clamped to 2; 0 and 1 are duplicates
        tensor([[1, 2],
                [0, 2],
                [0, 1]])
    """
    embeddings = torch.from_numpy(embeddings) if isinstance(embeddings, np.ndarray) else embeddings
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or inf")

    num_items = embeddings.shape[0]
    k = min(k, num_items - 1)
    device = torch.device(device)
    if block_size is None:
        block_size = max(1, SCORE_BLOCK_BYTES // (4 * max(num_items, 1)))
    block_size = min(block_size, max(num_items, 1))
    if backend == "auto":
        backend = "faiss" if device.type == "cpu" and _faiss_available() else "torch"
    log.info("exact kNN: backend=%s device=%s N=%d D=%d k=%d block_size=%d",
             backend, device if backend == "torch" else "cpu", num_items, embeddings.shape[1], k, block_size)

    if k == 0:
        return torch.empty(num_items, 0), torch.empty(num_items, 0, dtype=torch.int64)
    with torch.no_grad():
        if backend == "torch":
            return _search_torch(embeddings.to(device, torch.float32), k, block_size)
        return _search_faiss(embeddings.detach().cpu().float(), k, block_size)


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _search_torch(embeddings: torch.Tensor, k: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_items = embeddings.shape[0]
    num_candidates = min(k + 1, num_items - 1)  # one extra, to see whether the cut at k falls inside a tie
    all_scores, all_indices, num_recomputed = [], [], 0
    for start in range(0, num_items, block_size):
        block_scores = embeddings[start:start + block_size] @ embeddings.T  # (b, N)
        rows = torch.arange(block_scores.shape[0], device=embeddings.device)
        block_scores[rows, rows + start] = float("-inf")  # the query itself, by index
        candidate_scores, candidate_indices = block_scores.topk(num_candidates, dim=1)  # (b, k + 1), descending
        tied = _tied_at_cut(candidate_scores, k)
        scores, indices = _order_by_score_then_index(candidate_scores[:, :k], candidate_indices[:, :k])
        if tied.any():
            scores[tied], indices[tied] = _exact_top_k(block_scores[tied], k)
            num_recomputed += int(tied.sum())
        all_scores.append(scores.cpu())
        all_indices.append(indices.cpu())
    _log_recomputed(num_recomputed, num_items)
    return torch.cat(all_scores), torch.cat(all_indices)


def _search_faiss(embeddings: torch.Tensor, k: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss

    num_items, dim = embeddings.shape
    embeddings_np = np.ascontiguousarray(embeddings.numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(dim)
    index.add(embeddings_np)
    num_candidates = min(k + 1, num_items - 1)
    # One more than needed: the item itself usually comes back (it may not, when duplicates tie with it).
    candidate_scores, candidate_indices = index.search(embeddings_np, num_candidates + 1)  # (N, c + 1), descending
    candidate_scores, candidate_indices = torch.from_numpy(candidate_scores), torch.from_numpy(candidate_indices)

    is_self = candidate_indices == torch.arange(num_items).unsqueeze(1)  # at most one per row
    keep = ~is_self
    keep[~is_self.any(dim=1), -1] = False  # rows without self: drop the surplus last candidate instead
    candidate_scores = candidate_scores[keep].view(num_items, num_candidates)
    candidate_indices = candidate_indices[keep].view(num_items, num_candidates)

    tied = _tied_at_cut(candidate_scores, k)
    scores, indices = _order_by_score_then_index(candidate_scores[:, :k], candidate_indices[:, :k])
    tied_rows = tied.nonzero().squeeze(1)
    for start in range(0, len(tied_rows), block_size):
        rows = tied_rows[start:start + block_size]
        row_scores = embeddings[rows] @ embeddings.T  # (b, N)
        row_scores[torch.arange(len(rows)), rows] = float("-inf")
        scores[rows], indices[rows] = _exact_top_k(row_scores, k)
    _log_recomputed(len(tied_rows), num_items)
    return scores, indices


def _tied_at_cut(candidate_scores: torch.Tensor, k: int) -> torch.Tensor:
    """(b, c) candidates sorted descending, c >= k -> (b,) bool: candidate k + 1 ties candidate k.

    Such a row may have had an equal-scoring item left out by top-k, so it must be recomputed.
    With c == k there is no surplus candidate: all other items are present and nothing is tied out.
    """
    if candidate_scores.shape[1] <= k:
        return torch.zeros(candidate_scores.shape[0], dtype=torch.bool, device=candidate_scores.device)
    return candidate_scores[:, k] == candidate_scores[:, k - 1]


def _order_by_score_then_index(scores: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reorder each row by (score descending, index ascending): sort by index, then stable-sort by score."""
    indices, by_index = indices.sort(dim=1)
    scores = scores.gather(1, by_index)
    scores, by_score = scores.sort(dim=1, descending=True, stable=True)
    return scores, indices.gather(1, by_score)


def _exact_top_k(row_scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Full score rows (b, N), columns in gallery order, self already -inf -> exact (b, k) top-k.

    A stable descending sort keeps equal scores in column order, i.e. smaller gallery index first.
    """
    scores, indices = row_scores.sort(dim=1, descending=True, stable=True)
    return scores[:, :k], indices[:, :k]


def _log_recomputed(num_recomputed: int, num_items: int) -> None:
    if num_recomputed:
        log.info("exact kNN: %d of %d rows tied at the k-th neighbour and were recomputed by a full sort",
                 num_recomputed, num_items)
