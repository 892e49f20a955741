"""Exact k-nearest-neighbour search of a set against itself (query set == gallery), by inner product.

Evaluation is embed -> `nearest_neighbours` -> `metrics.retrieval_metrics`. The search never builds the
full N x N score matrix: whatever the backend, queries go in blocks sized from a memory budget.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

log = logging.getLogger("retrieval")

BACKENDS = ("auto", "torch", "faiss")
DEFAULT_MEMORY_GB = 1.0
FAISS_GPU_MAX_K = 2048  # faiss's GPU k-selection limit (GPU_MAX_SELECTION_K, faiss/gpu/utils/DeviceDefs.cuh)

# Working memory per query row, in bytes, that sizes the blocks (tests/test_retrieval_metrics.py checks the bound):
# per candidate, top-k's values and indices (12) and the sorts and gathers that order them (about 40);
CANDIDATE_BYTES = 56
# faiss adds its output arrays (12) and, for k >= 100, its per-query reservoir of about 2k candidates (24);
FAISS_CANDIDATE_BYTES = CANDIDATE_BYTES + 36
# a row recomputed for a tie at the k-th neighbour costs, per gallery item, its float32 scores (4), the stable
# sort's values and indices (12) and the sort's scratch space (about 16).
TIE_FIX_BYTES_PER_ITEM = 32


def nearest_neighbours(
    embeddings: torch.Tensor | np.ndarray,
    k: int,
    *,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    block_size: int | None = None,
    memory_gb: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product kNN of every item against all *other* items.

    Embeddings are assumed L2-normalised, so the inner product ranks like cosine similarity.

    Args:
        embeddings: [N, D] float tensor or numpy array; finite values.
        k: neighbours per item, >= 1. Clamped to N - 1, since an item is never its own neighbour.
        backend: "torch" (blocked float32 matmul + topk on `device`), "faiss" (brute-force `faiss.knn` on
            the CPU, or `faiss.knn_gpu` when `device` is cuda and faiss is a GPU build; faiss on the GPU
            selects at most 2048 candidates, so a search needing k + 2 > 2048 runs on the torch backend), or
            "auto": faiss on the GPU when `device` is cuda and faiss has GPUs, else torch (on the CPU the
            blocked torch search measured about 2x faster than faiss-cpu). The choice and its reason are logged.
        device: where the torch backend (and faiss, if it can) computes.
        block_size: queries per block; overrides the size derived from `memory_gb`.
        memory_gb: working-memory budget in GB (1e9 bytes), default 1.0 (`DEFAULT_MEMORY_GB`), on `device`
            for torch. It sizes the query blocks: torch keeps 3/4 of it for a block's float32 [b, N] score
            matrix and its top-(k + 1) candidates, b = 0.75 * budget / (4 N + 56 (k + 1)) (2,515 queries at
            N = 60,502, k = 1001), and the rest for rows recomputed after a tie; faiss's blocks hold its
            candidate buffers, b = budget / (92 (k + 2)). At least one query per block. Not counted: the
            embeddings and the [N, k] result (12 bytes per entry, 0.73 GB at N = 60,502, k = 1001).

    Returns:
        scores: [N, min(k, N - 1)] float32, the inner products, on the CPU.
        indices: [N, min(k, N - 1)] int64 gallery indices, on the CPU.

    Ordering contract (exact, whatever the backend):
        * Row i never contains i. The item itself is excluded *by index* (its own score is set to -inf
          before top-k, or it is dropped by index from the faiss answer), never by dropping column 0,
          so an exact duplicate of the query is still returned as a neighbour.
        * Each row is sorted by score descending, ties broken by the smaller gallery index first; i.e.
          row i is the first k of sorted((j for j != i), key=lambda j: (-score[i, j], j)).
        * Ties mean bitwise-equal float32 scores as the backend computed them. The backends round
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
    if memory_gb is not None and not memory_gb > 0:
        raise ValueError(f"memory_gb must be > 0, got {memory_gb}")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or inf")

    num_items = embeddings.shape[0]
    k = min(k, num_items - 1)
    backend, device, reason = _resolve_backend(backend, torch.device(device), k)
    budget_bytes = (DEFAULT_MEMORY_GB if memory_gb is None else memory_gb) * 1e9
    if backend == "torch":
        row_bytes = 4 * num_items + CANDIDATE_BYTES * (k + 1)
        block_rows, tie_budget = _rows_within(0.75 * budget_bytes, row_bytes), 0.25 * budget_bytes
    else:
        block_rows, tie_budget = _rows_within(budget_bytes, FAISS_CANDIDATE_BYTES * (k + 2)), budget_bytes
    block_rows = min(block_size or block_rows, max(num_items, 1))
    tie_rows = min(block_rows, _rows_within(tie_budget, TIE_FIX_BYTES_PER_ITEM * num_items))
    log.info("exact kNN: backend=%s device=%s (%s) N=%d D=%d k=%d block_size=%d memory_gb=%g",
             backend, device, reason, num_items, embeddings.shape[1], k, block_rows, budget_bytes / 1e9)

    if k == 0:
        return torch.empty(num_items, 0), torch.empty(num_items, 0, dtype=torch.int64)
    with torch.no_grad():
        if backend == "torch":
            return _search_torch(embeddings.to(device, torch.float32), k, block_rows, tie_rows)
        return _search_faiss(embeddings.detach().cpu().float(), k, block_rows, tie_rows, device)


def _resolve_backend(requested: str, device: torch.device, k: int) -> tuple[str, torch.device, str]:
    """(backend, device it computes on, why) for a requested backend and device."""
    faiss_gpu = device.type == "cuda" and faiss_gpu_count() > 0
    if requested != "auto":
        backend, reason = requested, "requested"
    elif faiss_gpu:
        backend, reason = "faiss", "auto: device is cuda and faiss is a GPU build"
    elif device.type == "cuda":
        backend, reason = "torch", "auto: device is cuda and faiss has no GPU support here"
    else:
        # Measured at SOP's size on 2 cores (bench/eval_bench.py): the blocked torch search took 39 s
        # against faiss-cpu's 75 s at d=512, for 0.35 GB more peak memory. faiss stays one setting away.
        backend, reason = "torch", "auto: on the CPU the blocked torch search is faster than faiss-cpu"
    if backend == "torch":
        return backend, device, reason
    if not faiss_gpu:
        return backend, torch.device("cpu"), reason + ("; faiss runs on the CPU" if device.type != "cpu" else "")
    if k + 2 > FAISS_GPU_MAX_K:
        return "torch", device, (f"{reason}, but faiss on the GPU selects at most {FAISS_GPU_MAX_K} candidates "
                                 f"and this search needs k + 2 = {k + 2}: torch on the GPU instead")
    return backend, device, reason


def faiss_gpu_count() -> int:
    """GPUs faiss can use: 0 for faiss-cpu (which has get_num_gpus but no StandardGpuResources) or no faiss."""
    try:
        import faiss
    except ImportError:
        return 0
    if not all(hasattr(faiss, name) for name in ("get_num_gpus", "StandardGpuResources", "knn_gpu")):
        return 0
    return faiss.get_num_gpus()


def _rows_within(budget_bytes: float, bytes_per_row: int) -> int:
    return max(1, int(budget_bytes // max(bytes_per_row, 1)))


def _search_torch(embeddings: torch.Tensor, k: int, block_rows: int,
                  tie_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    num_items = embeddings.shape[0]
    num_candidates = min(k + 1, num_items - 1)  # one extra, to see whether the cut at k falls inside a tie
    # Filled block by block: concatenating per-block results at the end would hold the result twice.
    scores, indices = torch.empty(num_items, k), torch.empty(num_items, k, dtype=torch.int64)
    num_recomputed = 0
    for start in range(0, num_items, block_rows):
        block_scores = embeddings[start:start + block_rows] @ embeddings.T  # (b, N)
        rows = torch.arange(block_scores.shape[0], device=embeddings.device)
        block_scores[rows, rows + start] = float("-inf")  # the query itself, by index
        candidate_scores, candidate_indices = block_scores.topk(num_candidates, dim=1)  # (b, k + 1), descending
        tied = _tied_at_cut(candidate_scores, k)
        top_scores, top_indices = _order_by_score_then_index(candidate_scores[:, :k], candidate_indices[:, :k])
        del candidate_scores, candidate_indices
        for chunk in tied.nonzero().squeeze(1).split(tie_rows):  # tied rows, a few at a time: full sorts
            top_scores[chunk], top_indices[chunk] = _exact_top_k(block_scores[chunk], k)
            num_recomputed += len(chunk)
        del block_scores
        end = start + len(top_scores)
        scores[start:end], indices[start:end] = top_scores.cpu(), top_indices.cpu()
    _log_recomputed(num_recomputed, num_items)
    return scores, indices


def _search_faiss(embeddings: torch.Tensor, k: int, block_rows: int, tie_rows: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    num_items = embeddings.shape[0]
    gallery = np.ascontiguousarray(embeddings.numpy(), dtype=np.float32)  # (N, D), shares memory if it can
    num_candidates = min(k + 1, num_items - 1)
    # One more than needed: the item itself usually comes back (it may not, when duplicates tie with it).
    search = _faiss_search_function(gallery, num_candidates + 1, device)
    scores, indices = torch.empty(num_items, k), torch.empty(num_items, k, dtype=torch.int64)
    tied_rows = []
    for start in range(0, num_items, block_rows):
        candidate_scores, candidate_indices = map(torch.from_numpy, search(gallery[start:start + block_rows]))
        block = len(candidate_scores)  # (b, c + 1) each, descending
        is_self = candidate_indices == torch.arange(start, start + block).unsqueeze(1)  # at most one per row
        keep = ~is_self
        keep[~is_self.any(dim=1), -1] = False  # rows without self: drop the surplus last candidate instead
        candidate_scores = candidate_scores[keep].view(block, num_candidates)
        candidate_indices = candidate_indices[keep].view(block, num_candidates)
        tied_rows.append(_tied_at_cut(candidate_scores, k).nonzero().squeeze(1) + start)
        scores[start:start + block], indices[start:start + block] = _order_by_score_then_index(
            candidate_scores[:, :k], candidate_indices[:, :k])

    tied_rows = torch.cat(tied_rows)
    embeddings = embeddings.to(device)
    for rows in tied_rows.split(tie_rows):
        row_top_scores, row_top_indices = query_neighbours(embeddings, rows, k)
        scores[rows], indices[rows] = row_top_scores.cpu(), row_top_indices.cpu()
    _log_recomputed(len(tied_rows), num_items)
    return scores, indices


def _faiss_search_function(gallery: np.ndarray, width: int, device: torch.device):
    """queries (b, D) float32 numpy -> (scores (b, width) float32, indices (b, width) int64), by inner product."""
    import faiss

    if device.type != "cuda":
        return lambda queries: faiss.knn(queries, gallery, width, metric=faiss.METRIC_INNER_PRODUCT)
    # Brute force on the GPU from host arrays (faiss copies them over per call; no index holds a second copy).
    resources = faiss.StandardGpuResources()
    gpu = device.index if device.index is not None else torch.cuda.current_device()
    return lambda queries: faiss.knn_gpu(resources, queries, gallery, width,
                                         metric=faiss.METRIC_INNER_PRODUCT, device=gpu)


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


def query_neighbours(embeddings: torch.Tensor, query_indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-k of a few queries against every other item, under `nearest_neighbours`' contract.

    For a handful of queries (pictures, rows tied at the k-th neighbour): (Q, N) scores, self excluded by
    index, a stable full sort (ties to the smaller index). Not for all N queries: that is
    `nearest_neighbours`' job. Computes on the embeddings' device.

    Returns: scores (Q, k') float32 and indices (Q, k') int64 with k' = min(k, N - 1), on that device.
    """
    embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
    query_indices = torch.as_tensor(query_indices, dtype=torch.int64).to(embeddings.device)
    row_scores = embeddings[query_indices] @ embeddings.T  # (Q, N)
    row_scores[torch.arange(len(query_indices), device=embeddings.device), query_indices] = -torch.inf
    return _exact_top_k(row_scores, min(k, len(embeddings) - 1))


def _log_recomputed(num_recomputed: int, num_items: int) -> None:
    if num_recomputed:
        log.info("exact kNN: %d of %d rows tied at the k-th neighbour and were recomputed by a full sort",
                 num_recomputed, num_items)
