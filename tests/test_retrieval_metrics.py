"""Exact kNN and retrieval metrics against brute-force references written independently of the code."""

import itertools
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import retrieval
from conftest import REPO_ROOT
from evaluation import evaluate_embeddings, metric_names
from metrics import (
    map_at_k,
    map_at_r,
    mean_by_group,
    mean_reciprocal_rank,
    neighbour_hits,
    r_precision,
    recall_at_k,
    relevant_counts,
    retrieval_metrics,
)
from retrieval import nearest_neighbours

BACKENDS = ("torch", "faiss")


# ----------------------------------------------------------------------------------------------------------
# nearest_neighbours


def brute_force_knn(embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Full N x N scores; each row: all j != i (self removed by index), sorted by key (-score, j), first k."""
    scores = embeddings.astype(np.float64) @ embeddings.astype(np.float64).T
    num_items = len(embeddings)
    indices = np.array([
        sorted((j for j in range(num_items) if j != i), key=lambda j: (-scores[i, j], j))[:k]
        for i in range(num_items)
    ])
    return np.take_along_axis(scores, indices, axis=1), indices


def normalised_gaussian(num_items: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((num_items, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def with_duplicates(num_items: int, seed: int) -> np.ndarray:
    """90 rows drawn from 30 distinct random unit vectors: most rows have exact duplicates."""
    distinct = normalised_gaussian(30, 8, seed)
    return distinct[np.random.default_rng(seed + 1).integers(0, 30, num_items)]


def exact_grid(num_items: int, seed: int) -> np.ndarray:
    """Unit vectors in 6-d with exactly four entries +-1/2 and two zeros: every inner product is a multiple
    of 1/4, computed exactly in float32 whatever the summation order, so scores tie exactly and massively
    (9 possible values), including at the k-th neighbour."""
    grid = np.array([
        [0.5 * sign for sign in signs] + [0.0, 0.0]
        for signs in itertools.product((-1, 1), repeat=4)
    ], dtype=np.float32)  # (16, 6)
    rng = np.random.default_rng(seed)
    rows = grid[rng.integers(0, len(grid), num_items)]
    return np.stack([row[rng.permutation(6)] for row in rows])


DATASETS = {
    "gaussian": lambda: normalised_gaussian(97, 8, seed=0),
    "duplicates": lambda: with_duplicates(90, seed=1),
    "exact_grid": lambda: exact_grid(90, seed=2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block_size", [None, 7])
@pytest.mark.parametrize("dataset", DATASETS)
def test_nearest_neighbours_equal_brute_force(backend, block_size, dataset):
    embeddings = DATASETS[dataset]()
    for k in (1, 4, 25, len(embeddings) - 1):
        expected_scores, expected_indices = brute_force_knn(embeddings, k)
        scores, indices = nearest_neighbours(torch.from_numpy(embeddings), k, backend=backend,
                                             block_size=block_size)
        assert scores.dtype == torch.float32 and indices.dtype == torch.int64
        assert indices.shape == (len(embeddings), k)
        np.testing.assert_array_equal(indices.numpy(), expected_indices)
        np.testing.assert_allclose(scores.numpy(), expected_scores, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_the_kth_neighbour_are_recomputed_exactly(backend, caplog):
    embeddings = exact_grid(90, seed=3)
    k = 10
    all_scores, _ = brute_force_knn(embeddings, len(embeddings) - 1)
    tied_rows = all_scores[:, k - 1] == all_scores[:, k]
    # Precondition: many rows have more items at the k-th score than fit, so top-k alone is ambiguous.
    assert tied_rows.sum() > 30

    with caplog.at_level(logging.INFO, logger="retrieval"):
        _, indices = nearest_neighbours(embeddings, k, backend=backend, block_size=16)
    np.testing.assert_array_equal(indices.numpy(), brute_force_knn(embeddings, k)[1])
    assert "recomputed" in caplog.text  # the tie fix ran, so this test covers it


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [3, 9])
def test_self_is_never_returned_even_among_identical_items(backend, k):
    # Ten identical items: every score ties, self included. Dropping column 0 would be wrong here.
    embeddings = np.tile(normalised_gaussian(1, 5, seed=4), (10, 1))
    _, indices = nearest_neighbours(embeddings, k, backend=backend, block_size=3)
    for query in range(10):
        # Ties go to the smaller index: the first k items other than the query.
        assert indices[query].tolist() == [j for j in range(10) if j != query][:k]


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_is_clamped_to_n_minus_1(backend):
    embeddings = normalised_gaussian(5, 3, seed=5)
    scores, indices = nearest_neighbours(embeddings, 100, backend=backend)
    assert scores.shape == indices.shape == (5, 4)
    for query in range(5):
        assert sorted(indices[query].tolist()) == [j for j in range(5) if j != query]
    assert nearest_neighbours(embeddings[:1], 3, backend=backend)[1].shape == (1, 0)


def test_numpy_float64_input_matches_tensor_input():
    embeddings = normalised_gaussian(40, 6, seed=6)
    from_numpy = nearest_neighbours(embeddings.astype(np.float64), 5, backend="torch")[1]
    from_tensor = nearest_neighbours(torch.from_numpy(embeddings), 5, backend="torch")[1]
    assert torch.equal(from_numpy, from_tensor)


def test_auto_backend_is_logged(caplog):
    with caplog.at_level(logging.INFO, logger="retrieval"):
        nearest_neighbours(normalised_gaussian(8, 3, seed=7), 2, backend="auto", device="cpu")
    assert "backend=torch" in caplog.text


def test_invalid_arguments_raise():
    embeddings = normalised_gaussian(8, 3, seed=8)
    with pytest.raises(ValueError, match="k must be"):
        nearest_neighbours(embeddings, 0)
    with pytest.raises(ValueError, match="backend"):
        nearest_neighbours(embeddings, 2, backend="annoy")
    embeddings[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nearest_neighbours(embeddings, 2)


# ----------------------------------------------------------------------------------------------------------
# metrics: a per-query Python loop implementing FIELD.md's definitions


def reference_metrics(hits: list[bool], num_relevant: int, k: int) -> dict[str, float]:
    """One query. hits[i]: whether the (i + 1)-th neighbour is correct. R = num_relevant >= 1."""
    def precision_at(rank):  # rank is 1-based
        return sum(hits[:rank]) / rank

    first_hit_rank = next((i + 1 for i, hit in enumerate(hits) if hit), None)
    return {
        "recall": float(any(hits[:k])),
        "r_precision": sum(hits[:num_relevant]) / num_relevant,
        "map@r": sum(precision_at(i + 1) for i in range(num_relevant) if hits[i]) / num_relevant,
        "mrr": 0.0 if first_hit_rank is None else 1 / first_hit_rank,
        "map@k": sum(precision_at(i + 1) for i in range(k) if hits[i]) / min(k, num_relevant),
    }


def random_retrieval_case(seed: int, num_items: int = 150):
    """Random labels (classes of 1..8 items, some singletons) and a random ranking of the others per query."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_items), rng.integers(1, 9, num_items))[:num_items]
    labels = rng.permutation(labels) * 7 - 100  # non-contiguous, negative labels are fine
    neighbours = np.stack([rng.permutation([j for j in range(num_items) if j != i]) for i in range(num_items)])
    return torch.from_numpy(neighbours).long(), torch.from_numpy(labels).long()


def test_relevant_counts():
    labels = torch.tensor([4, -2, 4, 9, 4, 9])
    assert relevant_counts(labels).tolist() == [2, 0, 2, 1, 2, 1]


def test_neighbour_hits():
    labels = torch.tensor([1, 1, 2, 2])
    neighbours = torch.tensor([[1, 2], [2, 0], [3, 0], [0, 1]])
    assert neighbour_hits(neighbours, labels).tolist() == [[True, False], [False, True], [True, False], [False, False]]


# Hand-computed: (hits, R, k, recall@k, r_precision, map@r, mrr, map@k)
HAND_CASES = [
    # R-Prec: 1 of the first 2. MAP@R = (0 + P(2)=1/2) / 2. MAP@3 = (1/2 + 2/3) / min(3, 2) = 7/12.
    ([0, 1, 1], 2, 3, 1.0, 0.5, 0.25, 0.5, 7 / 12),
    # R-Prec 2/3. MAP@R = (P(1)=1 + P(3)=2/3) / 3 = 5/9. MAP@2 = 1 / min(2, 3) = 1/2. Recall@2 = 1.
    ([1, 0, 1, 0], 3, 2, 1.0, 2 / 3, 5 / 9, 1.0, 0.5),
    # Perfect ranking of R = 2: everything 1.
    ([1, 1, 0], 2, 2, 1.0, 1.0, 1.0, 1.0, 1.0),
    # Nothing found in the 3 returned: Recall@3, MRR, MAP@3 are 0.
    ([0, 0, 0], 1, 3, 0.0, 0.0, 0.0, 0.0, 0.0),
    # Hit at rank 4 beyond R = 1 and beyond k = 2: only MRR sees it, 1/4.
    ([0, 0, 0, 1], 1, 2, 0.0, 0.0, 0.0, 0.25, 0.0),
]


@pytest.mark.parametrize("hits, R, k, recall, r_prec, mapr, mrr, mapk", HAND_CASES)
def test_metrics_on_hand_computed_cases(hits, R, k, recall, r_prec, mapr, mrr, mapk):
    hits_tensor = torch.tensor([hits], dtype=torch.bool)
    num_relevant = torch.tensor([R])
    assert recall_at_k(hits_tensor, k).item() == pytest.approx(recall)
    assert r_precision(hits_tensor, num_relevant).item() == pytest.approx(r_prec)
    assert map_at_r(hits_tensor, num_relevant).item() == pytest.approx(mapr)
    assert mean_reciprocal_rank(hits_tensor).item() == pytest.approx(mrr)
    assert map_at_k(hits_tensor, num_relevant, k).item() == pytest.approx(mapk)
    # The Python reference agrees with the hand computation too.
    assert reference_metrics([bool(h) for h in hits], R, k) == pytest.approx(
        {"recall": recall, "r_precision": r_prec, "map@r": mapr, "mrr": mrr, "map@k": mapk})


@pytest.mark.parametrize("seed", [0, 1])
def test_per_query_metrics_equal_python_loop(seed):
    neighbours, labels = random_retrieval_case(seed)
    hits = neighbour_hits(neighbours, labels)
    num_relevant = relevant_counts(labels)
    has_relevant = num_relevant >= 1
    assert (~has_relevant).any() and has_relevant.any()
    for k in (1, 5, 40):
        vectorised = {
            "recall": recall_at_k(hits, k),
            "r_precision": r_precision(hits, num_relevant),
            "map@r": map_at_r(hits, num_relevant),
            "mrr": mean_reciprocal_rank(hits),
            "map@k": map_at_k(hits, num_relevant, k),
        }
        for query in torch.nonzero(has_relevant).squeeze(1).tolist():
            expected = reference_metrics(hits[query].tolist(), int(num_relevant[query]), k)
            for name, value in expected.items():
                assert vectorised[name][query].item() == pytest.approx(value, abs=1e-6), (name, query, k)
        # R = 0: undefined, so NaN (retrieval_metrics leaves such queries out).
        assert vectorised["map@r"][~has_relevant].isnan().all()
        assert vectorised["r_precision"][~has_relevant].isnan().all()


def test_r_based_metrics_need_k_at_least_max_r():
    hits = torch.tensor([[True, False], [False, True]])
    with pytest.raises(ValueError, match="largest R"):
        map_at_r(hits, torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="largest R"):
        r_precision(hits, torch.tensor([3, 1]))
    with pytest.raises(ValueError):
        recall_at_k(hits, 3)


# ----------------------------------------------------------------------------------------------------------
# retrieval_metrics


def test_retrieval_metrics_hand_computed_with_singleton():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])  # item 5 is alone in class 2: excluded and counted
    neighbours = torch.tensor([
        [3, 1, 2, 4, 5],  # R=2, hits [0,1,1,0,0]: R@1 0, R-Prec 1/2, MAP@R (0 + 1/2)/2 = 1/4, RR 1/2
        [0, 2, 3, 4, 5],  # R=2, hits [1,1,0,0,0]: R@1 1, R-Prec 1,   MAP@R 1,                RR 1
        [5, 4, 3, 1, 0],  # R=2, hits [0,0,0,1,1]: R@1 0, R-Prec 0,   MAP@R 0,                RR 1/4
        [4, 0, 1, 2, 5],  # R=1, hits [1,0,0,0,0]: R@1 1, R-Prec 1,   MAP@R 1,                RR 1
        [5, 0, 3, 1, 2],  # R=1, hits [0,0,1,0,0]: R@1 0, R-Prec 0,   MAP@R 0,                RR 1/3
        [0, 1, 2, 3, 4],  # R=0: ignored, whatever its ranking
    ])
    metrics = retrieval_metrics(neighbours, labels, recall_ks=(1, 3))
    assert metrics["num_queries"] == 5
    assert metrics["num_queries_without_relevant"] == 1
    assert metrics["recall@1"] == pytest.approx(2 / 5)
    assert metrics["recall@3"] == pytest.approx(4 / 5)  # query 2 finds nothing in its first 3
    assert metrics["r_precision"] == pytest.approx((0.5 + 1 + 0 + 1 + 0) / 5)
    assert metrics["map@r"] == pytest.approx((0.25 + 1 + 0 + 1 + 0) / 5)
    assert metrics["mrr"] == pytest.approx((0.5 + 1 + 0.25 + 1 + 1 / 3) / 5)
    assert list(metrics) == ["recall@1", "recall@3", "map@r", "r_precision", "mrr",
                             "num_queries", "num_queries_without_relevant"]
    assert all(isinstance(metrics[key], float) for key in ("recall@1", "recall@3", "map@r", "r_precision", "mrr"))


def test_retrieval_metrics_equal_mean_of_python_loop():
    neighbours, labels = random_retrieval_case(seed=2)
    metrics = retrieval_metrics(neighbours, labels, recall_ks=(1, 10, 100))
    label_list = labels.tolist()
    per_query = []
    for query, row in enumerate(neighbours.tolist()):
        num_relevant = label_list.count(label_list[query]) - 1
        if num_relevant == 0:
            continue
        hits = [label_list[j] == label_list[query] for j in row]
        per_query.append({k: reference_metrics(hits, num_relevant, k) for k in (1, 10, 100)})
    assert metrics["num_queries"] == len(per_query)
    assert metrics["num_queries_without_relevant"] == len(labels) - len(per_query) > 0
    for k in (1, 10, 100):
        assert metrics[f"recall@{k}"] == pytest.approx(np.mean([q[k]["recall"] for q in per_query]))
    for name in ("map@r", "r_precision", "mrr"):
        assert metrics[name] == pytest.approx(np.mean([q[1][name] for q in per_query]))
        assert 0.0 <= metrics[name] <= 1.0


def test_retrieval_metrics_errors():
    labels = torch.tensor([0, 0, 0, 0, 1, 1])  # largest R = 3
    neighbours = torch.tensor([[j for j in range(6) if j != i][:2] for i in range(6)])  # only 2 columns
    with pytest.raises(ValueError, match="class size - 1"):
        retrieval_metrics(neighbours, labels, recall_ks=(1,))
    full = torch.tensor([[j for j in range(6) if j != i] for i in range(6)])  # 5 columns
    with pytest.raises(ValueError, match="recall@k"):
        retrieval_metrics(full, labels, recall_ks=(1, 10))
    with pytest.raises(ValueError, match="no query"):
        retrieval_metrics(full, torch.arange(6), recall_ks=(1,))


def test_end_to_end_on_hand_placed_embeddings():
    # Two tight clusters on the unit circle, one item per class in each: every nearest neighbour is right.
    angles = torch.tensor([0.0, 0.05, 0.1, math.pi, math.pi + 0.05, math.pi + 0.1])
    embeddings = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    for backend in BACKENDS:
        _, neighbours = nearest_neighbours(embeddings, 5, backend=backend)
        metrics = retrieval_metrics(neighbours, labels, recall_ks=(1, 5))
        assert metrics["recall@1"] == metrics["map@r"] == metrics["mrr"] == 1.0


# ----------------------------------------------------------------------------------------------------------
# backend choice and memory budget


def test_auto_backend_logs_its_reason(caplog):
    embeddings = normalised_gaussian(8, 3, seed=9)
    with caplog.at_level(logging.INFO, logger="retrieval"):
        nearest_neighbours(embeddings, 2, backend="auto", device="cpu")
    assert "backend=torch" in caplog.text and "faster than faiss-cpu" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="retrieval"):
        nearest_neighbours(embeddings, 2, backend="faiss", device="cpu")
    assert "backend=faiss" in caplog.text and "requested" in caplog.text


def test_backend_choice_on_cuda_without_a_gpu(monkeypatch):
    """Only the decision is testable here: faiss on the GPU while k + 2 <= 2048, torch on the GPU beyond."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(retrieval, "faiss_gpu_count", lambda: 0)
    assert retrieval._resolve_backend("auto", cuda, 1000)[:2] == ("torch", cuda)
    assert retrieval._resolve_backend("faiss", cuda, 1000)[:2] == ("faiss", torch.device("cpu"))
    monkeypatch.setattr(retrieval, "faiss_gpu_count", lambda: 1)
    assert retrieval._resolve_backend("auto", cuda, 2046)[:2] == ("faiss", cuda)
    backend, device, reason = retrieval._resolve_backend("auto", cuda, 2047)
    assert (backend, device) == ("torch", cuda) and "2048" in reason
    assert retrieval._resolve_backend("faiss", cuda, 3000)[0] == "torch"
    assert retrieval._resolve_backend("auto", torch.device("cpu"), 3000)[:2] == ("torch", torch.device("cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_memory_budget_gives_the_same_answer(backend):
    """A budget of a few rows per block (and one recomputed tied row at a time) changes nothing."""
    embeddings = exact_grid(90, seed=10)
    expected = brute_force_knn(embeddings, 12)[1]
    _, indices = nearest_neighbours(embeddings, 12, backend=backend, memory_gb=2e-6)
    np.testing.assert_array_equal(indices.numpy(), expected)
    with pytest.raises(ValueError, match="memory_gb"):
        nearest_neighbours(embeddings, 12, backend=backend, memory_gb=0)


def test_search_budget_is_the_setting_or_sized_to_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert retrieval.search_budget_bytes(2.5, cuda, free_bytes=80e9) == 2.5e9  # a setting wins everywhere
    assert retrieval.search_budget_bytes(None, cpu) == 1e9
    assert retrieval.search_budget_bytes(None, cuda, free_bytes=120e9) == 60e9  # half the card's free memory
    assert retrieval.search_budget_bytes(None, cuda, free_bytes=0.5e9) == 1e9  # never below the CPU default


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_session.sh)")


@needs_cuda
@pytest.mark.parametrize("memory_gb", [None, 2e-5])  # sized to the card (one block), and many small blocks
def test_cuda_search_kept_on_the_card_equals_the_cpu_search(memory_gb):
    embeddings = exact_grid(300, seed=11)
    expected = brute_force_knn(embeddings, 20)[1]
    scores, indices = nearest_neighbours(embeddings, 20, backend="torch", device="cuda", memory_gb=memory_gb,
                                         result_device="cuda")
    assert indices.is_cuda and scores.is_cuda
    np.testing.assert_array_equal(indices.cpu().numpy(), expected)


@needs_cuda
def test_cuda_evaluation_reports_what_the_cpu_evaluation_reports():
    embeddings = exact_grid(300, seed=12)
    labels = torch.arange(300) // 5
    on_cpu = evaluate_embeddings(embeddings, labels, [1, 10], backend="torch", device="cpu", map_ks=[10],
                                 super_labels=labels // 7)
    on_cuda = evaluate_embeddings(embeddings, labels, [1, 10], backend="torch", device="cuda", map_ks=[10],
                                  super_labels=labels // 7)
    assert on_cuda.keys() == on_cpu.keys()
    for key in on_cpu.keys() - {"seconds_search", "seconds_metrics"}:  # float32 means: summed in another order
        assert on_cuda[key] == pytest.approx(on_cpu[key], rel=1e-6), key


MEMORY_PROBE = """
import sys
import torch
from retrieval import nearest_neighbours

def status_bytes(field):  # VmRSS: resident now; VmHWM: peak resident of this program (not of its parent)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))

num_items, dim, k, backend, memory_gb, block_size, dataset = sys.argv[1:]
generator = torch.Generator().manual_seed(0)
if dataset == "tied":  # 16 distinct unit vectors (+-1/2 in 4 entries): every row ties at the cut, all re-sorted
    embeddings = torch.zeros(int(num_items), int(dim))
    embeddings[:, :4] = torch.randint(0, 2, (int(num_items), 4), generator=generator).float() - 0.5
else:
    embeddings = torch.nn.functional.normalize(torch.randn(int(num_items), int(dim), generator=generator), dim=1)
nearest_neighbours(embeddings[:2048], 8, backend=backend)  # loads BLAS, thread pools: not the search's memory
before = status_bytes("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS, forgetting the set-up's peak
except OSError:
    pass  # then the set-up's peak, lower than the search's here, stays in VmHWM
nearest_neighbours(embeddings, int(k), backend=backend, memory_gb=float(memory_gb),
                   block_size=None if block_size == "none" else int(block_size))
print(status_bytes("VmHWM") - before)
"""


def search_peak_bytes(backend: str, num_items: int, dim: int, k: int, memory_gb: float,
                      block_size: int | None = None, dataset: str = "gaussian") -> int:
    """Peak resident memory a search adds, measured in a fresh process (torch's CPU allocations are not
    seen by tracemalloc, faiss's neither): peak RSS during the search minus the RSS just before it. Not
    ru_maxrss: Linux carries the forking parent's peak (here pytest's) into a child's ru_maxrss across exec."""
    completed = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(num_items), str(dim), str(k), backend, str(memory_gb),
         str(block_size).lower(), dataset],
        capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    return int(completed.stdout.split()[-1])


# What the budget does not model, fixed whatever its size: faiss's 16 MiB inner-product tile (4096 queries x
# 1024 items x 4 bytes) and its ~10 MiB reservoir for 4096 queries, which the allocator keeps after faiss frees
# them, and torch's ~14 MiB of one-off sort scratch (measured on this project's machine); rounded up.
FIXED_SLACK = 48 * 2**20
MEMORY_BUDGET = 0.064e9


def memory_bound(num_items: int, k: int) -> float:
    return MEMORY_BUDGET + num_items * k * 12 + FIXED_SLACK  # + the result: float32 scores, int64 indices


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("dataset, num_items", [("gaussian", 12_000), ("tied", 3_000)])  # tied: every row re-sorted
@pytest.mark.parametrize("backend", BACKENDS)
def test_search_stays_within_its_memory_budget(backend, dataset, num_items):
    # About 123 MiB at N = 12,000 (64 MB, 14.5 MB, 48 MiB); the whole N x N score matrix alone is 576 MB.
    peak = search_peak_bytes(backend, num_items, 64, 101, MEMORY_BUDGET / 1e9, dataset=dataset)
    assert peak <= memory_bound(num_items, 101)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_memory_probe_sees_a_full_score_matrix():
    """The measurement above can fail: one block of all 12,000 queries, i.e. the N x N matrix, exceeds it."""
    peak = search_peak_bytes("torch", 12_000, 64, 101, MEMORY_BUDGET / 1e9, block_size=12_000)
    assert peak > 12_000**2 * 4 * 0.9 > memory_bound(12_000, 101)


# ----------------------------------------------------------------------------------------------------------
# evaluate_embeddings: mAP@k and Recall@1 by super class


def test_report_map_at_k_and_recall_by_super_class_equal_python_loops():
    rng = np.random.default_rng(11)
    labels = np.repeat(np.arange(60), rng.integers(1, 7, 60))[:150]
    centres = rng.standard_normal((60, 8))
    embeddings = centres[labels] + rng.standard_normal((150, 8))
    embeddings = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32)
    super_labels = labels % 4 * 10  # four super classes, named 0, 10, 20, 30
    report = evaluate_embeddings(embeddings, labels, recall_ks=[1, 10], map_ks=[1, 5, 1000],
                                 super_labels=super_labels, backend="torch")
    assert report["knn_k"] == 149  # 1000 capped at N - 1
    assert list(report)[:8] == ["recall@1", "recall@10", "map@1", "map@5", "map@1000", "map@r", "r_precision", "mrr"]

    _, neighbours = brute_force_knn(embeddings, 149)
    per_query, super_of_query = [], []
    for query, row in enumerate(neighbours):
        num_relevant = int((labels == labels[query]).sum()) - 1
        if num_relevant:
            hits = [bool(labels[j] == labels[query]) for j in row]
            per_query.append({k: reference_metrics(hits, num_relevant, min(k, 149)) for k in (1, 5, 1000)})
            super_of_query.append(super_labels[query])
    for k in (1, 5, 1000):
        assert report[f"map@{k}"] == pytest.approx(np.mean([q[k]["map@k"] for q in per_query]), abs=1e-6)
    recall_at_1 = np.array([q[1]["recall"] for q in per_query])
    super_of_query = np.array(super_of_query)
    expected = {str(s): recall_at_1[super_of_query == s].mean() for s in (0, 10, 20, 30)}
    assert report["recall@1_by_super_class"] == pytest.approx(expected, abs=1e-6)
    assert metric_names(report) == list(report)[:8]  # the dict is not a table column


def test_mean_by_group():
    values = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    assert mean_by_group(values, torch.tensor([5, 5, -1, 5, 9])) == pytest.approx({-1: 1.0, 5: 2 / 3, 9: 0.0})
    with pytest.raises(ValueError):
        mean_by_group(values, torch.tensor([1, 2]))


def test_query_neighbours_match_the_full_search_for_the_chosen_queries():
    embeddings = exact_grid(70, seed=12)  # heavy exact ties
    expected_scores, expected = brute_force_knn(embeddings, 9)
    queries = torch.tensor([0, 5, 33, 69])
    scores, indices = retrieval.query_neighbours(torch.as_tensor(embeddings), queries, 9)
    assert torch.equal(indices, torch.as_tensor(expected)[queries])
    assert torch.allclose(scores, torch.as_tensor(expected_scores, dtype=torch.float32)[queries])
