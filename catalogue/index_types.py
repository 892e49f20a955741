"""The faiss index of a catalogue: which kind (`index.type`), built from unit vectors, searched by inner product.

    flat      exact search (IndexFlatIP): every query scans every vector; the default
    hnsw      graph search (IndexHNSWFlat): fast and accurate, more memory, slow to build, rebuilt on remove
    ivf_flat  inverted lists of full vectors: `nprobe` of `ivf_lists` lists are scanned per query
    ivf_pq    inverted lists of product-quantised codes (`pq_bytes` bytes a vector): the smallest

Position i of the index is row i of the catalogue's vectors: the index stores no ids of its own.
"""

from __future__ import annotations

import math

import numpy as np

from .store import CatalogueError

INDEX_TYPES = ("flat", "hnsw", "ivf_flat", "ivf_pq")
PQ_TRAINING_MINIMUM = 256  # 8-bit codes: each sub-quantiser learns 256 centroids


def index_parameters(index_config) -> dict:
    """The `index` section of a configuration, less its type, as the plain dict a manifest records."""
    return {key: value for key, value in index_config.to_dict().items() if key != "type"}


def inverted_lists(count: int, requested: int) -> int:
    """`index.ivf_lists`, or for 0 about 4 sqrt(N), the usual rule (at least 1, at most N)."""
    lists = requested or round(4 * math.sqrt(count))
    return max(1, min(lists, count))


def factory_string(index_type: str, parameters: dict, count: int, dim: int) -> str:
    """The faiss index_factory description of an index type, checked against the catalogue's size."""
    if index_type == "flat":
        return "Flat"
    if index_type == "hnsw":
        return f"HNSW{parameters['hnsw_m']}"
    lists = inverted_lists(count, parameters["ivf_lists"])
    if parameters["ivf_lists"] > count:
        raise CatalogueError(f"index.ivf_lists={parameters['ivf_lists']} needs at least that many vectors to train "
                             f"on; the catalogue has {count}: use fewer lists, 0 (automatic) or index.type=flat")
    if index_type == "ivf_flat":
        return f"IVF{lists},Flat"
    pq_bytes = parameters["pq_bytes"]
    if dim % pq_bytes:
        raise CatalogueError(f"index.pq_bytes={pq_bytes} must divide the embedding size {dim}")
    if count < PQ_TRAINING_MINIMUM:
        raise CatalogueError(f"index.type=ivf_pq trains its codes on at least {PQ_TRAINING_MINIMUM} vectors; the "
                             f"catalogue has {count}: use index.type=flat")
    return f"IVF{lists},PQ{pq_bytes}"


def set_search_parameters(index, index_type: str, parameters: dict) -> None:
    """How hard a query searches: HNSW's efSearch, IVF's nprobe (not stored reliably in the index file)."""
    import faiss

    if index_type == "hnsw":
        faiss.ParameterSpace().set_index_parameter(index, "efSearch", parameters["hnsw_ef_search"])
    elif index_type.startswith("ivf"):
        faiss.ParameterSpace().set_index_parameter(index, "nprobe", parameters["nprobe"])


def build_index(vectors: np.ndarray, index_type: str, parameters: dict, trained=None):
    """A faiss index of `index_type` over (N, D) float32 unit vectors, inner-product metric.

    trained: an IVF index whose coarse quantiser and codes are kept (emptied, then refilled): what a removal
    does instead of training again.
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count, dim = vectors.shape
    if trained is not None and index_type.startswith("ivf"):
        index = faiss.clone_index(trained)
        index.reset()
    else:
        index = faiss.index_factory(dim, factory_string(index_type, parameters, count, dim), faiss.METRIC_INNER_PRODUCT)
        if index_type == "hnsw":
            index.hnsw.efConstruction = parameters["hnsw_ef_construction"]
        if index_type == "ivf_pq":
            index.do_polysemous_training = False  # for Hamming-filtered search, which is not used; 10x the training
        if not index.is_trained:
            index.train(vectors)
    index.add(vectors)
    set_search_parameters(index, index_type, parameters)
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positions), each (Q, min(k, N)); approximate types may return fewer hits: position -1, score -inf."""
    k = min(k, index.ntotal)
    if k < 1:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    scores, positions = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    scores[positions < 0] = -np.inf
    return scores, positions
