"""Our metrics against pytorch-metric-learning's AccuracyCalculator (a test-only dependency, 2.9.0).

Names: PML's precision_at_1 is our recall@1, mean_average_precision_at_r our map@r, r_precision our
r_precision. Called as get_accuracy(x, labels, x, labels, ref_includes_query=True) with k="max_bin_count",
PML searches the largest class size - 1 neighbours after dropping each query by index (or, when the query
is not among the k + 1 returned, the last one), exactly like `nearest_neighbours`, and it leaves out the
"lone" queries, whose class has no other item, from every metric, exactly like our R = 0 rule.

Two things may still differ, and each test says how it rules them out:
* PML's kNN is faiss.IndexFlatL2, i.e. ||q||^2 + ||r||^2 - 2 q.r in float32, where we rank by q.r; for unit
  vectors the orders agree except where two scores lie within rounding (~1e-7) of each other.
* Among exactly tied scores faiss promises no order, where we put the smaller index first. faiss-cpu 1.15
  happens to do the same on the data below, but neither the GPU nor other versions need to.
The metrics themselves are compared on identical neighbour lists (PML given our kNN), where they must agree
on any data; end to end (PML's own faiss kNN), only on data where no tie or near-tie that mixes a hit with
a miss falls within a query's R nearest, so that every tie order gives the same values; on heavily tied
data, PML's values must lie between the worst and the best tie order.
"""

import itertools

import numpy as np
import pytest
import torch

accuracy_calculator = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
pytest.importorskip("faiss")  # PML's default kNN

from evaluation import evaluate_embeddings  # noqa: E402
from retrieval import nearest_neighbours  # noqa: E402

PML_TO_OURS = {"precision_at_1": "recall@1", "mean_average_precision_at_r": "map@r", "r_precision": "r_precision"}
NEAR_TIE = 1e-6  # scores closer than this count as tied: float32 rounding is ~1e-7 for unit vectors


def pml_metrics(embeddings: np.ndarray, labels: np.ndarray, knn_func=None) -> dict[str, float]:
    """PML's three metrics, renamed to ours. Labels become float32 inside PML: keep them small integers."""
    calculator = accuracy_calculator.AccuracyCalculator(include=tuple(PML_TO_OURS), k="max_bin_count",
                                                        device=torch.device("cpu"), knn_func=knn_func)
    x, y = torch.from_numpy(embeddings), torch.from_numpy(labels)
    accuracy = calculator.get_accuracy(x, y, x, y, ref_includes_query=True)
    return {ours: accuracy[theirs] for theirs, ours in PML_TO_OURS.items()}


def our_knn(query, k, reference, ref_includes_query):
    """PML's knn_func interface, answered by our search: (scores, indices), self already excluded."""
    assert ref_includes_query and torch.equal(query, reference)
    return nearest_neighbours(query, k, backend="torch")


def our_metrics(embeddings: np.ndarray, labels: np.ndarray, backend: str) -> dict[str, float]:
    report = evaluate_embeddings(embeddings, labels, recall_ks=[1], backend=backend)
    return {name: report[name] for name in PML_TO_OURS.values()}


def tie_order_bracket(embeddings: np.ndarray, labels: np.ndarray) -> tuple[dict, dict]:
    """The three metrics under the worst and the best order of tied neighbours (float64 scores, ties within
    NEAR_TIE chained): misses first within every tie, or hits first. Any tie order scores in between, since
    moving a hit earlier never lowers precision@1, R-Precision or MAP@R. A per-query loop, as a reference."""
    scores = embeddings.astype(np.float64) @ embeddings.astype(np.float64).T
    low, high = [], []
    for query in range(len(labels)):
        others = np.array([j for j in range(len(labels)) if j != query])
        order = np.argsort(-scores[query, others], kind="stable")
        sorted_scores, hits = scores[query, others][order], labels[others][order] == labels[query]
        num_relevant = int(hits.sum())
        if num_relevant == 0:
            continue  # lone query: left out by both
        tie_group = np.concatenate([[0], np.cumsum(np.diff(sorted_scores) < -NEAR_TIE)])
        for result, hits_first in ((low, False), (high, True)):
            ranked = hits[np.lexsort((hits if not hits_first else ~hits, tie_group))][:num_relevant]
            precision = np.cumsum(ranked) / np.arange(1, num_relevant + 1)
            result.append((float(ranked[0]), float((precision * ranked).sum() / num_relevant),
                           float(ranked.sum() / num_relevant)))
    names = ("recall@1", "map@r", "r_precision")
    return tuple(dict(zip(names, np.mean(values, axis=0))) for values in (low, high))


# ----------------------------------------------------------------------------------------------------------
# data: small integer labels, some classes of one item (lone queries)


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def class_labels(num_items: int, rng: np.random.Generator, largest: int = 9) -> np.ndarray:
    """Classes of 1..largest items in random positions; singletons included."""
    sizes = rng.integers(1, largest + 1, num_items)
    return rng.permutation(np.repeat(np.arange(num_items), sizes)[:num_items])


def random_data(seed: int = 0):
    rng = np.random.default_rng(seed)
    return unit_rows(rng.standard_normal((400, 16))), class_labels(400, rng)


def clustered_data(seed: int = 1):
    """Each class a tight-ish cluster around its own random centre: high, non-trivial metric values."""
    rng = np.random.default_rng(seed)
    labels = class_labels(500, rng, largest=12)
    centres = rng.standard_normal((labels.max() + 1, 32))
    return unit_rows(centres[labels] + 0.9 * rng.standard_normal((500, 32))), labels


def duplicated_data(seed: int = 2):
    """Clustered data where most items have exact duplicates within their class: exact ties, but between
    items of one class, so their order never changes a metric."""
    embeddings, labels = clustered_data(seed)
    source = np.random.default_rng(seed).integers(0, 200, 250)  # 250 copies of the first 200 items
    return np.concatenate([embeddings, embeddings[source]]), np.concatenate([labels, labels[source]])


def tied_grid_data(seed: int = 3):
    """Unit vectors with four entries +-1/2 and two zeros: every inner product (and every squared L2
    distance) is a multiple of 1/4, exact in float32 in any summation order, so scores tie exactly and
    massively, between classes too."""
    grid = np.array([[0.5 * sign for sign in signs] + [0.0, 0.0] for signs in itertools.product((-1, 1), repeat=4)],
                    dtype=np.float32)
    rng = np.random.default_rng(seed)
    rows = grid[rng.integers(0, len(grid), 300)]
    return np.stack([row[rng.permutation(6)] for row in rows]), class_labels(300, rng, largest=6)


TIE_ORDER_INDEPENDENT = {"random": random_data, "clustered": clustered_data, "duplicates": duplicated_data}
ALL_DATA = {**TIE_ORDER_INDEPENDENT, "tied_grid": tied_grid_data}


# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ALL_DATA)
def test_metrics_agree_on_identical_neighbours(dataset):
    """PML's metric code given our neighbour lists: the definitions must agree on any data, ties included."""
    embeddings, labels = ALL_DATA[dataset]()
    assert (np.bincount(labels) == 1).any()  # lone queries present, and left out by both
    ours = our_metrics(embeddings, labels, backend="torch")
    assert pml_metrics(embeddings, labels, knn_func=our_knn) == pytest.approx(ours, abs=1e-4)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("dataset", TIE_ORDER_INDEPENDENT)
def test_agree_end_to_end_where_tie_order_cannot_matter(dataset, backend):
    embeddings, labels = TIE_ORDER_INDEPENDENT[dataset]()
    worst, best = tie_order_bracket(embeddings, labels)
    assert worst == pytest.approx(best, abs=1e-12)  # precondition: the data decides every metric exactly
    ours = our_metrics(embeddings, labels, backend)
    assert ours == pytest.approx(best, abs=1e-4)
    assert pml_metrics(embeddings, labels) == pytest.approx(ours, abs=1e-4)
    if dataset != "random":
        assert ours["recall@1"] > 0.3  # non-trivial values, not a contest of zeros


def test_end_to_end_with_exact_ties_between_classes():
    """Ties mixing hits and misses within the R nearest: the values depend on the tie order. Ours follow the
    smaller-index rule (checked in test_retrieval_metrics.py); PML's, whatever faiss's tie order, must lie
    between the worst and the best order."""
    embeddings, labels = tied_grid_data()
    worst, best = tie_order_bracket(embeddings, labels)
    assert all(best[name] - worst[name] > 0.01 for name in best)  # the ties really matter here
    for metrics in (our_metrics(embeddings, labels, "faiss"), pml_metrics(embeddings, labels)):
        for name, value in metrics.items():
            assert worst[name] - 1e-4 <= value <= best[name] + 1e-4, name
