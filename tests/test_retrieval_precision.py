"""The exact search computes in IEEE fp32 whatever TF32 settings training left behind, and backend="auto" on the
CPU times both backends on the first queries and keeps the faster one."""

import logging

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import retrieval
from evaluation import evaluate_embeddings
from retrieval import ieee_fp32, nearest_neighbours, query_neighbours
from test_retrieval_metrics import brute_force_knn, exact_grid, with_duplicates

# ----------------------------------------------------------------------------------------------------------
# IEEE fp32 inside the search

REFUSED = "refused"  # torch 2.9+ refuses to read a legacy flag after a mix of its legacy and new precision APIs
# The public fp32_precision switches of torch >= 2.9, parents before children: setting a parent rewrites its
# children, so a restore goes top down. (torch.backends.mkldnn.fp32_precision reads oneDNN's own value but
# writes the generic one; oneDNN's is written through torch.backends.mkldnn.set_flags.)
PRECISION_PARENTS = {"generic": torch.backends, "cudnn": torch.backends.cudnn}
PRECISION_LEAVES = {
    "cuda.matmul": torch.backends.cuda.matmul, "cudnn.conv": torch.backends.cudnn.conv,
    "cudnn.rnn": torch.backends.cudnn.rnn, "mkldnn.matmul": torch.backends.mkldnn.matmul,
    "mkldnn.conv": torch.backends.mkldnn.conv, "mkldnn.rnn": torch.backends.mkldnn.rnn,
}
IEEE = (False, False, "highest")  # (cuda matmul allow_tf32, cudnn allow_tf32, float32 matmul precision)


def read_or_refused(getter):
    try:
        return getter()
    except RuntimeError:
        return REFUSED


def legacy_flags() -> tuple:
    return (read_or_refused(lambda: torch.backends.cuda.matmul.allow_tf32),
            read_or_refused(lambda: torch.backends.cudnn.allow_tf32),
            read_or_refused(torch.get_float32_matmul_precision))


def fp32_settings() -> dict:
    """Everything a reader can see of torch's fp32 precision state, through the public API only."""
    modules = {**PRECISION_PARENTS, "mkldnn": torch.backends.mkldnn, **PRECISION_LEAVES}
    return {"legacy": legacy_flags(), **{name: module.fp32_precision for name, module in modules.items()}}


def restore_fp32_settings(saved: dict) -> None:
    allow_tf32, cudnn_allow_tf32, precision = saved["legacy"]
    if allow_tf32 != REFUSED:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    if cudnn_allow_tf32 != REFUSED:
        torch.backends.cudnn.allow_tf32 = cudnn_allow_tf32
    if precision != REFUSED:
        torch.set_float32_matmul_precision(precision)
    torch.backends.fp32_precision = saved["generic"]
    torch.backends.mkldnn.set_flags(_fp32_precision=saved["mkldnn"])
    torch.backends.cudnn.fp32_precision = saved["cudnn"]
    for name, module in PRECISION_LEAVES.items():
        module.fp32_precision = saved[name]


@pytest.fixture
def fp32_settings_kept():
    """Whatever a test sets, the next test starts from this test's starting state."""
    saved = fp32_settings()
    yield saved
    restore_fp32_settings(saved)
    assert fp32_settings() == saved


def enable_tf32():  # what main.py does for train.tf32=true on CUDA; these flags can be set without a GPU
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


TF32_ON = (True, True, "high")


MATRIX_PRODUCTS = {"matmul", "mm", "bmm", "addmm", "baddbmm", "linear", "einsum", "tensordot", "dot", "mv", "inner"}


class MatmulSpy(TorchFunctionMode):
    """Records the precision flags in force at every matrix product called on tensors (`@`, torch.mm, ...);
    raises on the first one with raise_on_matmul, as a search failing midway would."""

    def __init__(self, raise_on_matmul: bool = False):
        super().__init__()
        self.flags_seen, self.raise_on_matmul = [], raise_on_matmul

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in MATRIX_PRODUCTS:
            self.flags_seen.append(legacy_flags())
            if self.raise_on_matmul:
                raise RuntimeError("matmul failed")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_search_runs_in_ieee_fp32_and_restores_tf32(backend, fp32_settings_kept):
    # faiss computes its own products; its tied rows (exact_grid ties everywhere) are rescored by a torch matmul.
    embeddings = torch.from_numpy(exact_grid(60, seed=0))
    enable_tf32()
    assert legacy_flags() == TF32_ON
    with MatmulSpy() as spy:
        _, indices = nearest_neighbours(embeddings, 9, backend=backend, block_size=16)
    assert spy.flags_seen and set(spy.flags_seen) == {IEEE}
    assert legacy_flags() == TF32_ON
    np.testing.assert_array_equal(indices.numpy(), brute_force_knn(embeddings.numpy(), 9)[1])


def test_query_neighbours_runs_in_ieee_fp32_and_restores_tf32(fp32_settings_kept):
    enable_tf32()
    with MatmulSpy() as spy:
        query_neighbours(torch.from_numpy(exact_grid(30, seed=1)), torch.tensor([0, 7]), 5)
    assert spy.flags_seen and set(spy.flags_seen) == {IEEE}
    assert legacy_flags() == TF32_ON


@pytest.mark.parametrize("search", ["nearest_neighbours", "query_neighbours"])
def test_tf32_is_restored_when_the_search_raises(search, fp32_settings_kept):
    embeddings = torch.from_numpy(exact_grid(30, seed=2))
    enable_tf32()
    with pytest.raises(RuntimeError, match="matmul failed"), MatmulSpy(raise_on_matmul=True) as spy:
        if search == "nearest_neighbours":
            nearest_neighbours(embeddings, 4, backend="torch")
        else:
            query_neighbours(embeddings, torch.tensor([3]), 4)
    assert spy.flags_seen == [IEEE]
    assert legacy_flags() == TF32_ON


def test_evaluation_does_every_matmul_in_ieee_fp32(fp32_settings_kept):
    """The metrics themselves do no float matmul (indexing, sums, cumsum): only the search's show up here."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 80)
    embeddings = exact_grid(80, seed=3)
    enable_tf32()
    with MatmulSpy() as spy:
        report = evaluate_embeddings(embeddings, labels, recall_ks=[1, 5], map_ks=[5], backend="torch")
    assert spy.flags_seen and set(spy.flags_seen) == {IEEE}
    assert legacy_flags() == TF32_ON
    assert 0.0 <= report["map@r"] <= 1.0


PRECISION_STATES = {
    "train.tf32=true": enable_tf32,
    "matmul precision high": lambda: torch.set_float32_matmul_precision("high"),
    "matmul precision medium (bf16 oneDNN matmuls on the CPU)": lambda: torch.set_float32_matmul_precision("medium"),
    # torch then refuses to say which precision is set: the search must neither fail nor change that.
    "legacy and new APIs mixed": lambda: (torch.set_float32_matmul_precision("high"),
                                          setattr(torch.backends.cuda.matmul, "allow_tf32", False)),
    "new API: tf32 everywhere": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
}


@pytest.mark.parametrize("state", PRECISION_STATES)
def test_ieee_fp32_forces_ieee_inside_and_restores_every_setting(state, fp32_settings_kept):
    PRECISION_STATES[state]()
    before = fp32_settings()
    assert before != fp32_settings_kept  # the state differs from torch's defaults, so restoring is tested
    with ieee_fp32():
        inside = fp32_settings()
    assert inside["legacy"] == IEEE
    assert inside["cuda.matmul"] == inside["mkldnn.matmul"] == "ieee"
    assert fp32_settings() == before

    with pytest.raises(ValueError, match="inside"), ieee_fp32():
        raise ValueError("inside")
    assert fp32_settings() == before


# ----------------------------------------------------------------------------------------------------------
# backend="auto" on the CPU: both backends timed on the first queries, the faster one searches the rest


def spy_on_backends(monkeypatch, seconds: dict[str, tuple[float, float]] | None = None) -> list[tuple[str, int, int]]:
    """Lists (backend, first query, end query) for each block searched. With seconds = {backend: (per call,
    per query)}, a fake clock (the search's perf_counter) advances by that much during each call: no real timing."""
    calls, clock = [], [0.0]
    if seconds is not None:
        monkeypatch.setattr(retrieval, "perf_counter", lambda: clock[0])
    for name in ("torch", "faiss"):
        make_searcher = getattr(retrieval, f"_{name}_searcher")

        def spied_make_searcher(*args, name=name, make_searcher=make_searcher, **kwargs):
            search = make_searcher(*args, **kwargs)

            def spied_search(start, stop, *outputs):
                calls.append((name, start, stop))
                per_call, per_query = (seconds or {}).get(name, (0.0, 0.0))
                clock[0] += per_call + per_query * (stop - start)
                return search(start, stop, *outputs)
            return spied_search
        monkeypatch.setattr(retrieval, f"_{name}_searcher", spied_make_searcher)
    return calls


DATASETS_WITH_TIES = {"duplicates": lambda: with_duplicates(90, seed=4), "exact_grid": lambda: exact_grid(90, seed=5)}


@pytest.mark.parametrize("dataset", DATASETS_WITH_TIES)
def test_auto_with_timing_equals_torch_and_faiss(dataset, monkeypatch, caplog):
    embeddings = torch.from_numpy(DATASETS_WITH_TIES[dataset]())
    monkeypatch.setattr(retrieval, "TIMED_CHOICE_MIN_WORK", 0)  # time the backends even for 90 items
    for k in (1, 10, 89):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="retrieval"):
            auto_scores, auto_indices = nearest_neighbours(embeddings, k, backend="auto", block_size=7)
        assert "timed both CPU backends on queries 0..6" in caplog.text  # 7 = min(block, N / 8), none untimed
        np.testing.assert_array_equal(auto_indices.numpy(), brute_force_knn(embeddings.numpy(), k)[1])
        for backend in ("torch", "faiss"):
            scores, indices = nearest_neighbours(embeddings, k, backend=backend, block_size=7)
            assert torch.equal(indices, auto_indices)
            if dataset == "exact_grid":  # every product exact in float32
                assert torch.equal(scores, auto_scores)
            else:  # the last bit may differ between the backends, and between a 1-query and a 7-query product
                torch.testing.assert_close(scores, auto_scores, rtol=0, atol=1e-6)


@pytest.mark.parametrize("faster", ["faiss", "torch"])
def test_auto_searches_the_rest_with_the_faster_backend(faster, monkeypatch, caplog):
    embeddings = exact_grid(200, seed=6)
    monkeypatch.setattr(retrieval, "TIMED_CHOICE_MIN_WORK", 0)
    slower = {"faiss": "torch", "torch": "faiss"}[faster]
    calls = spy_on_backends(monkeypatch, {faster: (0.0, 1.0), slower: (0.0, 3.0)})  # seconds per call, per query
    with caplog.at_level(logging.INFO, logger="retrieval"):
        _, indices = nearest_neighbours(embeddings, 6, backend="auto", block_size=24)

    # Both backends on the same first 24 queries (a block; N / 8 = 25): 3 untimed, then 6 and 15 timed.
    first = [(0, 3), (3, 9), (9, 24)]
    assert calls[:6] == [("torch", *queries) for queries in first] + [("faiss", *queries) for queries in first]
    assert calls[6:] == [(faster, start, min(start + 24, 200)) for start in range(24, 200, 24)]
    np.testing.assert_array_equal(indices.numpy(), brute_force_knn(embeddings, 6)[1])
    timed = {faster: "21.000", slower: "63.000"}  # 21 timed queries
    predicted = {faster: "176.0", slower: "528.0"}  # the other 176 queries
    assert (f"torch {timed['torch']} s, faiss {timed['faiss']} s; the other 176 queries predicted: "
            f"torch {predicted['torch']} s, faiss {predicted['faiss']} s: {faster} is faster") in caplog.text
    assert f"backend={faster} " in caplog.text


def test_auto_counts_the_cost_per_call_at_each_backends_block_size(monkeypatch, caplog):
    """faiss slower per call of a few queries, faster over its bigger blocks: the prediction sees it."""
    embeddings = exact_grid(400, seed=8)
    monkeypatch.setattr(retrieval, "TIMED_CHOICE_MIN_WORK", 0)
    monkeypatch.setattr(retrieval, "_block_rows", lambda backend, *_: (400, 400) if backend == "faiss" else (50, 50))
    calls = spy_on_backends(monkeypatch, {"torch": (0.0, 1.0), "faiss": (20.0, 0.5)})
    with caplog.at_level(logging.INFO, logger="retrieval"):
        _, indices = nearest_neighbours(embeddings, 6, backend="auto")
    # Timed on queries 6..49: torch 44 s, faiss 2 * 20 + 22 = 62 s. The other 350 queries: torch 350 s, faiss
    # in one call 20 + 175 = 195 s.
    assert ("torch 44.000 s, faiss 62.000 s; the other 350 queries predicted: torch 350.0 s, faiss 195.0 s"
            in caplog.text)
    assert calls[6:] == [("faiss", 50, 400)]
    np.testing.assert_array_equal(indices.numpy(), brute_force_knn(embeddings, 6)[1])


def test_predicted_seconds_fits_a_cost_per_call_and_per_query():
    # 2 s per call + 1 ms per query, timed on calls of 500 and 1500 queries; 10,000 queries in calls of 4,000.
    assert retrieval._predicted_seconds((500, 2.5), (1500, 3.5), 10_000, 4_000) == pytest.approx(3 * 2 + 10)
    # Noise making the larger call look cheaper per call: no negative cost per query.
    assert retrieval._predicted_seconds((500, 3.0), (1500, 2.0), 10_000, 4_000) == pytest.approx(3 * 2.0)
    assert retrieval._predicted_seconds((0, 0.0), (10, 1.0), 100, 10) == pytest.approx(10.0)  # one call timed


def test_auto_does_not_time_a_small_search(monkeypatch, caplog):
    calls = spy_on_backends(monkeypatch)
    embeddings = exact_grid(40, seed=7)  # N * N * D = 9,600, far below the threshold
    with caplog.at_level(logging.INFO, logger="retrieval"):
        _, indices = nearest_neighbours(embeddings, 5, backend="auto", block_size=16)
    assert {name for name, _, _ in calls} == {"torch"}
    assert "timed both" not in caplog.text and "backend=torch" in caplog.text
    np.testing.assert_array_equal(indices.numpy(), brute_force_knn(embeddings, 5)[1])


def test_auto_choice_on_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    sop_work = 60_502 * 60_502 * 512
    assert retrieval._resolve_backend("auto", cpu, 1000, work=sop_work)[:2] == ("auto", cpu)  # to be timed
    assert retrieval._resolve_backend("auto", cpu, 1000, work=1000 * 1000 * 512)[0] == "torch"
    assert retrieval._resolve_backend("torch", cpu, 1000, work=sop_work)[0] == "torch"
    monkeypatch.setattr(retrieval, "faiss_installed", lambda: False)
    backend, _, reason = retrieval._resolve_backend("auto", cpu, 1000, work=sop_work)
    assert backend == "torch" and "not installed" in reason
