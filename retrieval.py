"""Exact k-nearest-neighbour search of a set against itself (query set == gallery), by inner product.

Evaluation is embed -> `nearest_neighbours` -> `metrics.retrieval_metrics`. The search never builds the
full N x N score matrix: whatever the backend, queries go in blocks sized from a memory budget.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from contextlib import contextmanager
from time import perf_counter

import numpy as np
import torch

log = logging.getLogger("retrieval")

BACKENDS = ("auto", "torch", "faiss")
DEFAULT_MEMORY_GB = 1.0  # on the CPU; a CUDA search's default budget is sized to the card (`search_budget_bytes`)
CUDA_FREE_MEMORY_SHARE = 0.5  # of the card's memory not in use, for a CUDA search without a budget
FAISS_GPU_MAX_K = 2048  # faiss's GPU k-selection limit (GPU_MAX_SELECTION_K, faiss/gpu/utils/DeviceDefs.cuh)

# Working memory per query row, in bytes, that sizes the blocks (tests/test_retrieval_metrics.py checks the bound):
# per candidate, top-k's values and indices (12) and the sorts and gathers that order them (about 40);
CANDIDATE_BYTES = 56
# faiss adds its output arrays (12) and, for k >= 100, its per-query reservoir of about 2k candidates (24);
FAISS_CANDIDATE_BYTES = CANDIDATE_BYTES + 36
# a row recomputed for a tie at the k-th neighbour costs, per gallery item, its float32 scores (4), the stable
# sort's values and indices (12) and the sort's scratch space (about 16).
TIE_FIX_BYTES_PER_ITEM = 32

# backend="auto" on the CPU: which backend is faster depends on the CPU (its BLAS, its vector units) and on
# what else runs on it, so a search of at least this many multiply-adds (N * N * D) times both on the same
# first queries and searches the rest with the faster; below it (several seconds of search), torch runs untimed.
TIMED_CHOICE_MIN_WORK = 2e11
TIMED_CHOICE_ROWS = 2048  # queries searched by both backends, at most (and at most an eighth of all)

# Every fp32 precision switch of torch >= 2.9 as (backend, op), parents first: setting a parent rewrites those
# of its children that are "none", so a restore goes top down.
_FP32_PRECISION_KEYS = (("generic", "all"), ("cuda", "all"), ("mkldnn", "all"),
                        *((backend, op) for backend in ("cuda", "mkldnn") for op in ("matmul", "conv", "rnn")))


def nearest_neighbours(
    embeddings: torch.Tensor | np.ndarray,
    k: int,
    *,
    backend: str = "auto",
    device: str | torch.device = "cpu",
    block_size: int | None = None,
    memory_gb: float | None = None,
    result_device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inner-product kNN of every item against all *other* items.

    Embeddings are assumed L2-normalised, so the inner product ranks like cosine similarity.

    Args:
        embeddings: [N, D] float tensor or numpy array; finite values.
        k: neighbours per item, >= 1. Clamped to N - 1, since an item is never its own neighbour.
        backend: "torch" (blocked float32 matmul + topk on `device`), "faiss" (brute-force `faiss.knn` on
            the CPU, or `faiss.knn_gpu` when `device` is cuda and faiss is a GPU build; faiss on the GPU
            selects at most 2048 candidates, so a search needing k + 2 > 2048 runs on the torch backend), or
            "auto": with `device` cuda, faiss on the GPU when faiss has GPUs, else torch. On the CPU, whichever
            backend is faster on this CPU (it differs between CPUs): a search of N * N * D >=
            `TIMED_CHOICE_MIN_WORK` multiply-adds searches its first queries (at most `TIMED_CHOICE_ROWS`,
            N / 8 and a block) with both backends, timed, and searches the rest with the one these times
            predict faster, keeping its rows; a smaller search, or one without faiss installed, runs on torch
            untimed. The choice, its reason and, when timed, the times are logged (logger "retrieval", INFO).
        device: where the torch backend (and faiss, if it can) computes.
        block_size: queries per block; overrides the size derived from `memory_gb`.
        memory_gb: working-memory budget in GB (1e9 bytes), on `device` for torch; None: 1.0 GB
            (`DEFAULT_MEMORY_GB`), or on a CUDA device half of the memory the card has free
            (`search_budget_bytes`), so the blocks are sized to the card. It sizes the query blocks: torch
            keeps 3/4 of it for a block's float32 [b, N] score matrix and its top-(k + 1) candidates,
            b = 0.75 * budget / (4 N + 56 (k + 1)) (2,515 queries at N = 60,502, k = 1001), and the rest for
            rows recomputed after a tie; faiss's blocks hold its candidate buffers, b = budget / (92 (k + 2)).
            At least one query per block. Not counted: the embeddings, the [N, k] result (12 bytes per entry,
            0.73 GB at N = 60,502, k = 1001) and, when auto times both backends, the slower one's rows for the
            timed queries (at most 2048 x k entries).
        result_device: where the results are kept. The device of the search (a CUDA torch search) keeps
            them there, with nothing copied back per block, for metrics computed on that device.

    Returns:
        scores: [N, min(k, N - 1)] float32, the inner products, on `result_device`.
        indices: [N, min(k, N - 1)] int64 gallery indices, on `result_device`.

    Ordering contract (exact, whatever the backend):
        * Row i never contains i. The item itself is excluded *by index* (its own score is set to -inf
          before top-k, or it is dropped by index from the faiss answer), never by dropping column 0,
          so an exact duplicate of the query is still returned as a neighbour.
        * Each row is sorted by score descending, ties broken by the smaller gallery index first; i.e.
          row i is the first k of sorted((j for j != i), key=lambda j: (-score[i, j], j)).
        * Ties mean bitwise-equal float32 scores as the backend computed them. The backends round
          differently in the last bit, so they may order near-ties (|difference| ~ 1e-7) differently.
        * Scores are IEEE float32 products whatever TF32 or float32-matmul-precision setting is in force
          outside (`ieee_fp32`): the same ties and order on a GPU as on the CPU, up to that last bit.

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

    num_items, dim = embeddings.shape
    k = min(k, num_items - 1)
    backend, device, reason = _resolve_backend(backend, torch.device(device), k, work=num_items * num_items * dim)
    budget_bytes = search_budget_bytes(memory_gb, device)
    result_device = torch.device(result_device)
    if k == 0:
        log.info("exact kNN: N=%d, k=0: nothing to search", num_items)
        return (torch.empty(num_items, 0, device=result_device),
                torch.empty(num_items, 0, dtype=torch.int64, device=result_device))
    # Filled block by block: concatenating per-block results at the end would hold the result twice.
    scores = torch.empty(num_items, k, device=result_device)
    indices = torch.empty(num_items, k, dtype=torch.int64, device=result_device)
    with torch.no_grad(), ieee_fp32():
        start, num_recomputed = 0, 0
        if backend == "auto":  # on the CPU, big enough to time both backends on the first queries
            backend, start, num_recomputed = _search_first_queries_with_the_faster_backend(
                embeddings, k, budget_bytes, block_size, scores, indices)
            reason = f"auto: the faster on this CPU, both run on the first {start} queries"
        block_rows, tie_rows = _block_rows(backend, num_items, k, budget_bytes, block_size)
        search = _searcher(backend, embeddings, k, tie_rows, device)
        log.info("exact kNN: backend=%s device=%s (%s) N=%d D=%d k=%d block_size=%d memory_gb=%g",
                 backend, device, reason, num_items, dim, k, block_rows, budget_bytes / 1e9,
                 extra={"knn_backend": backend})
        for block_start in range(start, num_items, block_rows):
            block_end = min(block_start + block_rows, num_items)
            num_recomputed += search(block_start, block_end, scores[block_start:block_end],
                                     indices[block_start:block_end])
    _log_recomputed(num_recomputed, num_items)
    return scores, indices


def search_budget_bytes(memory_gb: float | None, device: torch.device, free_bytes: int | None = None) -> float:
    """The search's working memory in bytes: `memory_gb` when given; else 1 GB (`DEFAULT_MEMORY_GB`) off CUDA,
    and on CUDA `CUDA_FREE_MEMORY_SHARE` of what the card has free (`free_bytes` stands in for that reading in
    tests), and never less than the 1 GB default.

    The reading follows `torch.cuda.empty_cache()`: blocks torch's allocator holds unused are returned first, and
    only what the driver then reports free counts. Memory the allocator keeps for other reasons (a captured
    training step's private pool, `train.capture_step`) and faiss's own allocations are not free for the search.
    """
    if memory_gb is not None:
        return memory_gb * 1e9
    if device.type != "cuda":
        return DEFAULT_MEMORY_GB * 1e9
    if free_bytes is None:
        torch.cuda.empty_cache()
        free_bytes = torch.cuda.mem_get_info(device)[0]
    return max(CUDA_FREE_MEMORY_SHARE * free_bytes, DEFAULT_MEMORY_GB * 1e9)


def _search_first_queries_with_the_faster_backend(embeddings: torch.Tensor, k: int, budget_bytes: float,
                                                  block_size: int | None, scores: torch.Tensor,
                                                  indices: torch.Tensor):
    """Search the same first queries with both CPU backends, timed; keep the faster one's rows (both follow the
    ordering contract) in scores and indices. -> (the faster backend, queries done, rows it recomputed).

    The first queries fit both backends' blocks: at most TIMED_CHOICE_ROWS and an eighth of all queries, so
    the slower backend's extra work stays a small part of a search this big. Each backend searches an eighth
    of them untimed (a first call pays one-off costs: threads, buffers, kernel choice), then a quarter and the
    rest in two timed calls. A call costs a fixed part plus a part per query, and faiss-cpu's fixed part (a
    pass over the gallery in chunks, a parallel loop each) is large: timing one call of a few queries would
    misjudge it. The two calls give both parts, so each backend's rest of the search is predicted at its own
    block size (`_predicted_seconds`). The choice, the times and the predictions are logged.
    """
    num_items = len(embeddings)
    cpu = torch.device("cpu")
    sizes = {backend: _block_rows(backend, num_items, k, budget_bytes, block_size) for backend in ("torch", "faiss")}
    rows = min(TIMED_CHOICE_ROWS, max(1, num_items // 8), *(block_rows for block_rows, _ in sizes.values()))
    bounds = (0, rows // 8, rows // 8 + rows // 4, rows)  # untimed, then two timed calls
    # Made (faiss imported, the gallery laid out) before the clock starts.
    searches = {backend: _searcher(backend, embeddings, k, tie_rows, cpu) for backend, (_, tie_rows) in sizes.items()}
    outputs = {"torch": (scores[:rows], indices[:rows]),
               "faiss": (torch.empty(rows, k), torch.empty(rows, k, dtype=torch.int64))}
    timed, predicted, num_recomputed = {}, {}, {}
    for backend, search in searches.items():
        backend_scores, backend_indices = outputs[backend]
        calls, num_recomputed[backend] = [], 0
        for start, end in zip(bounds, bounds[1:]):
            started = perf_counter()
            if end > start:
                num_recomputed[backend] += search(start, end, backend_scores[start:end], backend_indices[start:end])
            calls.append((end - start, perf_counter() - started))
        timed[backend] = calls[1][1] + calls[2][1]
        predicted[backend] = _predicted_seconds(calls[1], calls[2], num_items - rows, sizes[backend][0])
    faster = min(predicted, key=predicted.get)  # a tie goes to torch, the first
    if faster == "faiss":
        scores[:rows], indices[:rows] = outputs["faiss"]
    log.info("exact kNN: auto timed both CPU backends on queries %d..%d: torch %.3f s, faiss %.3f s; the other %d "
             "queries predicted: torch %.1f s, faiss %.1f s: %s is faster", bounds[1], rows - 1, timed["torch"],
             timed["faiss"], num_items - rows, predicted["torch"], predicted["faiss"], faster,
             extra={"knn_seconds": dict(timed, rows=rows - bounds[1]), "knn_predicted_seconds": predicted})
    return faster, rows, num_recomputed[faster]


def _predicted_seconds(first: tuple[int, float], second: tuple[int, float], queries: int, block_rows: int) -> float:
    """Seconds to search `queries` queries in calls of `block_rows`, from two timed calls (queries, seconds):
    seconds per call = fixed + per_query * queries, both parts fitted through the two calls and kept >= 0."""
    (first_queries, first_seconds), (second_queries, second_seconds) = first, second
    per_query = second_seconds / max(second_queries, 1)
    if second_queries > first_queries:
        per_query = max(0.0, (second_seconds - first_seconds) / (second_queries - first_queries))
    fixed = max(0.0, second_seconds - per_query * second_queries)
    return math.ceil(queries / block_rows) * fixed + queries * per_query


def _resolve_backend(requested: str, device: torch.device, k: int,
                     work: float = 0.0) -> tuple[str, torch.device, str]:
    """(backend, device it computes on, why) for a requested backend and device; work: N * N * D.

    The backend "auto" comes back for a CPU search of at least TIMED_CHOICE_MIN_WORK: both backends are timed.
    """
    faiss_gpu = device.type == "cuda" and faiss_gpu_count() > 0
    if requested != "auto":
        backend, reason = requested, "requested"
    elif faiss_gpu:
        backend, reason = "faiss", "auto: device is cuda and faiss is a GPU build"
    elif device.type == "cuda":
        backend, reason = "torch", "auto: device is cuda and faiss has no GPU support here"
    elif not faiss_installed():
        backend, reason = "torch", "auto: faiss is not installed"
    elif work < TIMED_CHOICE_MIN_WORK:
        # Not timed: the timed queries would be a large part of a short search.
        backend, reason = "torch", (f"auto: a small search (N * N * D = {work:.3g} < {TIMED_CHOICE_MIN_WORK:.0e}) "
                                    "is not timed: torch, faster than faiss-cpu at small sizes where measured")
    else:
        return "auto", device, "auto: both CPU backends timed on the first queries"
    if backend == "torch":
        return backend, device, reason
    if not faiss_gpu:
        return backend, torch.device("cpu"), reason + ("; faiss runs on the CPU" if device.type != "cpu" else "")
    if k + 2 > FAISS_GPU_MAX_K:
        return "torch", device, (f"{reason}, but faiss on the GPU selects at most {FAISS_GPU_MAX_K} candidates "
                                 f"and this search needs k + 2 = {k + 2}: torch on the GPU instead")
    return backend, device, reason


def faiss_installed() -> bool:
    return importlib.util.find_spec("faiss") is not None


def faiss_gpu_count() -> int:
    """GPUs faiss can use: 0 for faiss-cpu (which has get_num_gpus but no StandardGpuResources) or no faiss."""
    try:
        import faiss
    except ImportError:
        return 0
    if not all(hasattr(faiss, name) for name in ("get_num_gpus", "StandardGpuResources", "knn_gpu")):
        return 0
    return faiss.get_num_gpus()


def _block_rows(backend: str, num_items: int, k: int, budget_bytes: float,
                block_size: int | None) -> tuple[int, int]:
    """(queries per block, tied rows recomputed at a time) within the budget (see `nearest_neighbours`)."""
    if backend == "torch":
        row_bytes = 4 * num_items + CANDIDATE_BYTES * (k + 1)
        block_rows, tie_budget = _rows_within(0.75 * budget_bytes, row_bytes), 0.25 * budget_bytes
    else:  # faiss frees its candidates before the tied rows are recomputed
        block_rows, tie_budget = _rows_within(budget_bytes, FAISS_CANDIDATE_BYTES * (k + 2)), budget_bytes
    block_rows = min(block_size or block_rows, max(num_items, 1))
    return block_rows, min(block_rows, _rows_within(tie_budget, TIE_FIX_BYTES_PER_ITEM * num_items))


def _rows_within(budget_bytes: float, bytes_per_row: int) -> int:
    return max(1, int(budget_bytes // max(bytes_per_row, 1)))


def _searcher(backend: str, embeddings: torch.Tensor, k: int, tie_rows: int, device: torch.device):
    if backend == "torch":
        return _torch_searcher(embeddings.to(device, torch.float32), k, tie_rows)
    return _faiss_searcher(embeddings.detach().cpu().float(), k, tie_rows, device)


def _torch_searcher(embeddings: torch.Tensor, k: int, tie_rows: int):
    """-> search(start, end, scores, indices): the exact top-k of queries start..end - 1 into the (end - start, k)
    tensors scores and indices (on the CPU or the search's device); returns how many of those rows tied at the
    cut and were recomputed."""
    num_candidates = min(k + 1, len(embeddings) - 1)  # one extra, to see whether the cut at k falls inside a tie

    def search(start: int, end: int, scores: torch.Tensor, indices: torch.Tensor) -> int:
        block_scores = embeddings[start:end] @ embeddings.T  # (b, N)
        rows = torch.arange(end - start, device=embeddings.device)
        block_scores[rows, rows + start] = float("-inf")  # the query itself, by index
        candidate_scores, candidate_indices = block_scores.topk(num_candidates, dim=1)  # (b, k + 1), descending
        tied = _tied_at_cut(candidate_scores, k)
        top_scores, top_indices = _order_by_score_then_index(candidate_scores[:, :k], candidate_indices[:, :k])
        del candidate_scores, candidate_indices
        tied_rows = tied.nonzero().squeeze(1)
        for chunk in tied_rows.split(tie_rows):  # tied rows, a few at a time: full sorts
            top_scores[chunk], top_indices[chunk] = _exact_top_k(block_scores[chunk], k)
        del block_scores
        scores.copy_(top_scores, non_blocking=scores.device == top_scores.device)
        indices.copy_(top_indices, non_blocking=indices.device == top_indices.device)
        return len(tied_rows)
    return search


def _faiss_searcher(embeddings: torch.Tensor, k: int, tie_rows: int, device: torch.device):
    """Like `_torch_searcher`, by faiss; `device` is where faiss (if a GPU build) and the tied rows compute."""
    num_items = len(embeddings)
    gallery = np.ascontiguousarray(embeddings.numpy(), dtype=np.float32)  # (N, D), shares memory if it can
    num_candidates = min(k + 1, num_items - 1)
    # One more than needed: the item itself usually comes back (it may not, when duplicates tie with it).
    faiss_search = _faiss_search_function(gallery, num_candidates + 1, device)
    tie_embeddings = embeddings.to(device)  # tied rows are rescored by a torch matmul there

    def search(start: int, end: int, scores: torch.Tensor, indices: torch.Tensor) -> int:
        candidate_scores, candidate_indices = map(torch.from_numpy, faiss_search(gallery[start:end]))
        block = end - start  # (b, c + 1) each, descending
        is_self = candidate_indices == torch.arange(start, end).unsqueeze(1)  # at most one per row
        keep = ~is_self
        keep[~is_self.any(dim=1), -1] = False  # rows without self: drop the surplus last candidate instead
        candidate_scores = candidate_scores[keep].view(block, num_candidates)
        candidate_indices = candidate_indices[keep].view(block, num_candidates)
        tied_rows = _tied_at_cut(candidate_scores, k).nonzero().squeeze(1)
        ordered_scores, ordered_indices = _order_by_score_then_index(candidate_scores[:, :k], candidate_indices[:, :k])
        scores.copy_(ordered_scores)
        indices.copy_(ordered_indices)
        del candidate_scores, candidate_indices, keep, is_self
        for rows in tied_rows.split(tie_rows):
            row_scores, row_indices = query_neighbours(tie_embeddings, rows + start, k)
            rows = rows.to(scores.device)
            scores[rows], indices[rows] = row_scores.to(scores.device), row_indices.to(scores.device)
        return len(tied_rows)
    return search


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
    with torch.no_grad(), ieee_fp32():
        row_scores = embeddings[query_indices] @ embeddings.T  # (Q, N)
    row_scores[torch.arange(len(query_indices), device=embeddings.device), query_indices] = -torch.inf
    return _exact_top_k(row_scores, min(k, len(embeddings) - 1))


@contextmanager
def ieee_fp32():
    """Float32 matmuls and convolutions in IEEE fp32 inside, whatever precision was set outside; restored after.

    Training may turn on TF32 (train.tf32: `torch.backends.cuda.matmul.allow_tf32`, cudnn's) or a lower
    `torch.set_float32_matmul_precision` (on the CPU, "medium" lets oneDNN matmuls run in bf16). Those settings
    are global, so the exact search would inherit them: scores rounded to ~10 mantissa bits, ties and the
    order of near-ties differing between a GPU and a CPU report. Inside: allow_tf32 False for cuBLAS and
    cuDNN, float32 matmul precision "highest", and with torch >= 2.9 every per-backend `fp32_precision` of
    CUDA and oneDNN "ieee". On exit, also on an exception, every one of those settings is put back as it was,
    both the legacy flags and the per-backend ones (torch keeps them apart; a flag torch refuses to read, after
    a mix of its legacy and new APIs, is left to the per-backend restore).
    """
    legacy = {"cuda": _read_flag(lambda: torch.backends.cuda.matmul.allow_tf32),
              "cudnn": _read_flag(lambda: torch.backends.cudnn.allow_tf32),
              "precision": _read_flag(torch.get_float32_matmul_precision)}
    per_backend = {key: torch._C._get_fp32_precision_getter(*key) for key in _FP32_PRECISION_KEYS} \
        if hasattr(torch._C, "_get_fp32_precision_getter") else {}
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        for backend, op in per_backend:
            if op != "all":  # the leaves decide; a parent only stands in for a leaf set to "none"
                torch._C._set_fp32_precision_setter(backend, op, "ieee")
        yield
    finally:
        # Legacy flags first (each also writes per-backend values), then the per-backend values, parents first.
        if legacy["cuda"] is not None:
            torch.backends.cuda.matmul.allow_tf32 = legacy["cuda"]
        if legacy["cudnn"] is not None:
            torch.backends.cudnn.allow_tf32 = legacy["cudnn"]
        if legacy["precision"] is not None:
            torch.set_float32_matmul_precision(legacy["precision"])
        for key, value in per_backend.items():
            torch._C._set_fp32_precision_setter(*key, value)


def _read_flag(getter):
    """A precision flag, or None where torch refuses to read it (after a mix of its legacy and new APIs)."""
    try:
        return getter()
    except RuntimeError:
        return None


def _log_recomputed(num_recomputed: int, num_items: int) -> None:
    if num_recomputed:
        log.info("exact kNN: %d of %d rows tied at the k-th neighbour and were recomputed by a full sort",
                 num_recomputed, num_items)
