"""Faiss index types on synthetic clustered vectors: build time, memory, query latency and recall@10 against exact.

    python bench/index_bench.py [--n 1000000] [--d 512] [--queries 1024] [--types flat,ivf_flat,ivf_pq,hnsw]
                                [--threads 2] [--clusters 10000] [--spread 1.0] [--hnsw-ef-construction 40,100]
                                [--index-cache DIR] [--out FILE.json]
    python bench/index_bench.py --tiny        # 20,000 vectors: a smoke test of a minute

Data: `--clusters` centres drawn uniformly on the unit sphere; each vector is a centre (picked uniformly) plus
isotropic Gaussian noise of norm about `--spread`, normalised. Queries are drawn the same way, apart from the base
set. The metric is the inner product (cosine on unit vectors), as the catalogue searches.

Per type (one index in memory at a time, so memory numbers are the index's own):
  * build: wall seconds for train + add on `--threads` OpenMP threads, and the process CPU seconds it took;
  * index MB: the bytes faiss.write_index writes (counted through a callback); RSS MB: the process's resident
    memory holding the index minus before (in brackets the peak while building, where Linux lets us reset the
    high-water mark);
  * batch 1: one query per call, ms per call (p50, p99 wall; p50 process CPU);
  * batch 256: ms per call of 256 queries (the same);
  * recall@10: |approximate top 10 ∩ exact top 10| / 10, averaged over all queries; the exact top 10 comes from
    the flat index (brute force), which is always measured first.
hnsw sweeps efSearch, the IVF types nprobe; ivf_pq also re-scores its 100 best candidates exactly ("rerank").
Prints the machine and its load, a Markdown table and the goal (recall@10 >= 0.95 at batch-1 p50 <= 5 ms),
judged on wall and on CPU time; `--out` writes the rows as JSON.
On a shared machine wall times are inflated by the other processes; CPU times are what a call costs on an idle
one. OMP_WAIT_POLICY defaults to PASSIVE here (ACTIVE is a little faster on a machine of your own).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

# Spinning OpenMP threads stall each other when the cores are shared (4x slower faiss searches measured on the
# 2-core machine under load); must be set before faiss loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import faiss  # noqa: E402
import numpy as np  # noqa: E402
from eval_bench import cpu_description  # noqa: E402 (bench/ is on the path when this runs as a script)

K = 10
TYPES = ("flat", "ivf_flat", "ivf_pq", "hnsw")  # flat first: its results are the ground truth
EF_SEARCH = (16, 32, 64, 128, 256, 512)
NPROBE = (1, 4, 16, 64)
RERANK, RERANK_NPROBE = 100, (4, 16)  # ivf_pq: also re-score its 100 best exactly, at these nprobe
GOAL_RECALL, GOAL_P50_MS = 0.95, 5.0


# ---- data -----------------------------------------------------------------------------------------------
def clustered_vectors(num: int, centres: np.ndarray, spread: float, rng: np.random.Generator,
                      chunk: int = 100_000) -> np.ndarray:
    """(num, d) float32 unit vectors: a random centre plus N(0, spread^2 / d) per coordinate, normalised.

    Filled in chunks so that 1M x 512 (2 GB) needs no 2 GB temporaries.
    """
    dim = centres.shape[1]
    vectors = np.empty((num, dim), dtype=np.float32)
    for start in range(0, num, chunk):
        stop = min(start + chunk, num)
        block = centres[rng.integers(len(centres), size=stop - start)]
        block += rng.standard_normal(block.shape, dtype=np.float32) * np.float32(spread / math.sqrt(dim))
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        vectors[start:stop] = block
    return vectors


def sphere_centres(num: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.standard_normal((num, dim), dtype=np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


# ---- machine and memory ---------------------------------------------------------------------------------
def rss_bytes() -> int:
    """Resident memory now, after handing freed heap back to the OS (else a freed index's pages, reused by the
    next one, would hide it from the difference)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)  # glibc
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    """Resets VmHWM (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def serialized_bytes(index: faiss.Index) -> int:
    """What faiss.write_index would write, counted without keeping or writing it."""
    total = 0

    def count(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total


# ---- indexes --------------------------------------------------------------------------------------------
def ivf_lists(num: int) -> int:
    """nlist: the power of two nearest 4 * sqrt(n) (faiss's rule of thumb), at least 16."""
    return max(16, 2 ** round(math.log2(4 * math.sqrt(num))))


def make_index(kind: str, dim: int, num: int, pq_bytes: int, ef_construction: int) -> tuple[faiss.Index, str]:
    """An empty index of `kind` (not flat: see `flat_search`) with this bench's parameters, and those in words."""
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, 32, ip)
        index.hnsw.efConstruction = ef_construction
        return index, f"M=32 efC={ef_construction}"
    nlist = ivf_lists(num)
    quantizer = faiss.IndexFlatIP(dim)
    if kind == "ivf_flat":
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, ip)
        words = f"nlist={nlist}"
    elif kind == "ivf_pq":
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_bytes, 8, ip)
        words = f"nlist={nlist} m={pq_bytes}x8b"
    else:
        raise ValueError(f"unknown index type {kind!r}; expected one of {', '.join(TYPES)}")
    index.own_fields = True
    quantizer.this.disown()  # the index frees it
    index.cp.niter = 10  # k-means iterations: 10 is within noise of the default 25 on this data, at 40% of the time
    return index, words


def training_sample(index: faiss.Index, base: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """IVF: 64 points per list (faiss warns under 39), as a random sample; None for types that need no training."""
    if index.is_trained:
        return None
    count = min(len(base), 64 * index.nlist)
    return base[np.sort(rng.choice(len(base), size=count, replace=False))]


def build(index: faiss.Index, base: np.ndarray, rng: np.random.Generator,
          chunk: int = 100_000) -> tuple[float, float]:
    """(wall, process CPU) seconds to train (IVF) and add the whole base set, in chunks (progress on stderr)."""
    sample = training_sample(index, base, rng)
    start, start_cpu = time.perf_counter(), time.process_time()
    if sample is not None:
        index.train(sample)
    for begin in range(0, len(base), chunk):
        index.add(base[begin:begin + chunk])
        if len(base) > chunk:
            print(f"\r  added {begin + chunk:,} / {len(base):,} ({time.perf_counter() - start:.0f} s)",
                  end="", file=sys.stderr, flush=True)
    if len(base) > chunk:
        print(file=sys.stderr)
    return time.perf_counter() - start, time.process_time() - start_cpu


def search_settings(kind: str) -> list[tuple[str, int | None, int]]:
    """(words, efSearch or nprobe, rerank: candidates re-scored exactly from the stored vectors, 0 = none)."""
    if kind == "hnsw":
        return [(f"efSearch={ef}", ef, 0) for ef in EF_SEARCH]
    if kind == "ivf_flat":
        return [(f"nprobe={nprobe}", nprobe, 0) for nprobe in NPROBE]
    if kind == "ivf_pq":
        return ([(f"nprobe={nprobe}", nprobe, 0) for nprobe in NPROBE]
                + [(f"nprobe={nprobe} rerank={RERANK}", nprobe, RERANK) for nprobe in RERANK_NPROBE])
    return [("", None, 0)]


def flat_search(base: np.ndarray):
    """Exact search over `base` itself: faiss.knn runs what IndexFlatIP.search runs (knn_inner_product), without
    the index's 4 N d byte copy of the vectors (2 GB at 1M x 512, on a shared 24 GB machine)."""
    return lambda block: faiss.knn(block, base, K, metric=faiss.METRIC_INNER_PRODUCT)[1]


def searcher(index: faiss.Index, kind: str, value: int | None, rerank: int, base: np.ndarray):
    """block (B, d) -> (B, K) ids, with the setting applied.

    rerank R: the index's R best candidates, re-scored by exact inner products with their stored vectors (what
    the catalogue could do from its vectors file, so that PQ codes need not rank the final K themselves).
    """
    if kind == "hnsw":
        index.hnsw.efSearch = value
    elif kind in ("ivf_flat", "ivf_pq"):
        index.nprobe = value
    if kind == "flat":
        return flat_search(base)
    if not rerank:
        return lambda block: index.search(block, K)[1]

    def search_and_rerank(block: np.ndarray) -> np.ndarray:
        candidates = index.search(block, rerank)[1]  # (B, R)
        scores = np.einsum("brd,bd->br", base[np.maximum(candidates, 0)], block)
        scores[candidates < 0] = -np.inf
        best = np.argpartition(-scores, K - 1, axis=1)[:, :K]  # (B, K), unordered: recall@K needs no order
        return np.take_along_axis(candidates, best, axis=1)

    return search_and_rerank


# ---- measurement ----------------------------------------------------------------------------------------
def timed_searches(search, queries: np.ndarray, batch: int, min_calls: int, max_calls: int,
                   budget_s: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Search `queries` in calls of `batch` rows, cycling over them, after one untimed warm-up call: at least
    `min_calls`, then more while `budget_s` lasts, at most `max_calls`.

    search: (B, d) queries -> (B, K) ids. Returns (wall ms per call, process CPU ms per call, (len(queries), K) ids
    from the first pass, -1 for queries not reached). The CPU time, summed over faiss's threads, is what a call
    costs on an idle machine.
    """
    calls_per_pass = math.ceil(len(queries) / batch)
    ids = np.full((len(queries), K), -1, dtype=np.int64)
    search(queries[:batch])
    times, cpu_times = [], []
    start = time.perf_counter()
    while len(times) < max_calls and (len(times) < min_calls or time.perf_counter() - start < budget_s):
        begin = (len(times) % calls_per_pass) * batch
        block = queries[begin:begin + batch]
        tick, tick_cpu = time.perf_counter(), time.process_time()
        found = search(block)
        times.append((time.perf_counter() - tick) * 1e3)
        cpu_times.append((time.process_time() - tick_cpu) * 1e3)
        if len(times) <= calls_per_pass:
            ids[begin:begin + len(block)] = found
    return np.array(times), np.array(cpu_times), ids


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found[q] ∩ exact[q]| / K; (Q, K) id arrays, -1 (not found) never matches."""
    hits = (found[:, :, None] == exact[:, None, :]) & (found[:, :, None] >= 0)
    return float(hits.any(axis=2).sum(axis=1).mean() / exact.shape[1])


def built_index(kind: str, base: np.ndarray, args, ef_construction: int) -> tuple[faiss.Index, str, dict]:
    """(index, its parameters in words, record: build s, build CPU s, peak RSS growth while building, RSS growth
    holding the index).

    With --index-cache, an index built before for the same data and parameters is read back, with the build
    numbers of that first run. A freshly built IVF index holds more
    than its file size (its inverted lists grow by doubling); one read back holds about its file size.
    """
    index, parameters = make_index(kind, base.shape[1], len(base), args.pq_bytes or base.shape[1] // 8,
                                   ef_construction)
    name = (f"{kind}-{len(base)}x{base.shape[1]}-clusters{args.clusters}-spread{args.spread}-seed{args.seed}-"
            f"{parameters.replace(' ', '-').replace('=', '')}")
    cached = Path(args.index_cache) / name if args.index_cache else None
    rss_before = rss_bytes()
    if cached and Path(f"{cached}.json").is_file():
        print(f"{kind} {parameters}: reading {cached}.faiss", file=sys.stderr, flush=True)
        index, record = faiss.read_index(f"{cached}.faiss"), json.loads(Path(f"{cached}.json").read_text())
        return index, parameters, {**record, "rss_growth_mb": (rss_bytes() - rss_before) / 2**20}
    print(f"{kind} {parameters}: building", file=sys.stderr, flush=True)
    peak_reset = reset_peak_rss()
    # its own generator: the training sample does not depend on which other types ran
    build_s, build_cpu_s = build(index, base, np.random.default_rng([args.seed, TYPES.index(kind)]))
    record = dict(build_s=build_s, build_cpu_s=build_cpu_s,
                  rss_peak_growth_mb=(peak_rss_bytes() - rss_before) / 2**20 if peak_reset else None)
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        faiss.write_index(index, f"{cached}.faiss")
        Path(f"{cached}.json").write_text(json.dumps(record))
    return index, parameters, {**record, "rss_growth_mb": (rss_bytes() - rss_before) / 2**20}


def measure(kind: str, base: np.ndarray, queries: np.ndarray, exact: np.ndarray | None, args,
            ef_construction: int = 0) -> tuple[list[dict], np.ndarray]:
    """One index, one row per search setting. The first call (flat) returns the exact top K for the others."""
    if kind == "flat":  # nothing to build: the vectors are the index
        index, parameters, index_mb = None, "", base.nbytes / 2**20
        record = dict(build_s=0.0, build_cpu_s=0.0, rss_growth_mb=index_mb, rss_peak_growth_mb=None)
    else:
        index, parameters, record = built_index(kind, base, args, ef_construction)
        index_mb = serialized_bytes(index) / 2**20
    rows = []
    for setting, value, rerank in search_settings(kind):
        search = searcher(index, kind, value, rerank, base)
        single_ms, single_cpu_ms, _ = timed_searches(search, queries, 1, 20, args.single_queries, args.budget_s)
        full_pass = math.ceil(len(queries) / 256)  # recall needs every query once
        batch_ms, batch_cpu_ms, found = timed_searches(search, queries, 256, full_pass, max(full_pass, 100),
                                                       args.budget_s)
        if exact is None:  # flat: its batched search is the ground truth
            exact = found
        rows.append(dict(
            type=kind, parameters=parameters, search=setting, n=len(base), d=base.shape[1], **record,
            index_mb=index_mb, batch1_calls=len(single_ms), batch256_calls=len(batch_ms),
            batch1_p50_ms=float(np.median(single_ms)), batch1_p99_ms=float(np.percentile(single_ms, 99)),
            batch1_p50_cpu_ms=float(np.median(single_cpu_ms)),
            batch256_p50_ms=float(np.median(batch_ms)), batch256_p99_ms=float(np.percentile(batch_ms, 99)),
            batch256_p50_cpu_ms=float(np.median(batch_cpu_ms)), recall_at_10=recall_at_k(found, exact)))
        print(f"  {setting or 'exact'}: recall@10 {rows[-1]['recall_at_10']:.3f}, batch-1 p50 "
              f"{rows[-1]['batch1_p50_ms']:.2f} ms ({rows[-1]['batch1_p50_cpu_ms']:.2f} CPU)", file=sys.stderr,
              flush=True)
    return rows, exact


def markdown_table(rows: list[dict]) -> str:
    lines = ["| type | parameters | search | build s (CPU s) | index MB | RSS MB (build peak) "
             "| batch-1 ms p50 / p99 (CPU) | batch-256 ms p50 / p99 (CPU) | recall@10 |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        peak = "" if row["rss_peak_growth_mb"] is None else f" ({row['rss_peak_growth_mb']:,.0f})"
        lines.append(
            f"| {row['type']} | {row['parameters']} | {row['search']} | {row['build_s']:,.0f} "
            f"({row['build_cpu_s']:,.0f}) | {row['index_mb']:,.0f} | {row['rss_growth_mb']:,.0f}{peak} | "
            f"{row['batch1_p50_ms']:.2f} / {row['batch1_p99_ms']:.2f} ({row['batch1_p50_cpu_ms']:.2f}) | "
            f"{row['batch256_p50_ms']:,.0f} / {row['batch256_p99_ms']:,.0f} ({row['batch256_p50_cpu_ms']:,.0f}) | "
            f"{row['recall_at_10']:.3f} |")
    return "\n".join(lines)


def goal_line(rows: list[dict], latency: str) -> str:
    """Which approximate rows reach recall@10 >= 0.95 at a batch-1 p50 (`latency`: the wall or CPU key) <= 5 ms."""
    met = [row for row in rows if row["type"] != "flat" and row["recall_at_10"] >= GOAL_RECALL
           and row[latency] <= GOAL_P50_MS]
    goal = f"goal (recall@10 >= {GOAL_RECALL} at batch-1 p50 <= {GOAL_P50_MS} ms, {latency})"
    if not met:
        return f"{goal}: not met by any approximate type"
    best = min(met, key=lambda row: row[latency])
    return (f"{goal}: met by {len(met)} settings; fastest {best['type']} {best['search']} (recall@10 "
            f"{best['recall_at_10']:.3f}, {best[latency]:.2f} ms); most accurate "
            + ", ".join(f"{row['type']} {row['search']} ({row['recall_at_10']:.3f}, {row[latency]:.2f} ms)"
                        for row in sorted(met, key=lambda row: -row["recall_at_10"])[:2]))


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="base vectors")
    parser.add_argument("--d", type=int, default=512, help="dimension")
    parser.add_argument("--queries", type=int, default=1024,
                        help="queries (recall is averaged over all of them); a multiple of 256 keeps batches full")
    parser.add_argument("--types", default=",".join(TYPES), help=f"comma-separated, of {', '.join(TYPES)}")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="faiss OpenMP threads")
    parser.add_argument("--clusters", type=int, default=10_000)
    parser.add_argument("--spread", type=float, default=1.0,
                        help="noise norm around a centre; 1.0 puts cluster mates at cosine about 0.5")
    parser.add_argument("--pq-bytes", type=int, default=0, help="ivf_pq: bytes per vector (default d / 8)")
    parser.add_argument("--hnsw-ef-construction", default="100",
                        help="hnsw: efConstruction, comma-separated for one index each (100: the catalogue's default)")
    parser.add_argument("--single-queries", type=int, default=500, help="most batch-1 calls per setting")
    parser.add_argument("--budget-s", type=float, default=10.0, help="seconds of timed calls per setting and batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="20,000 vectors, 256 queries, 1 s budgets: a smoke test")
    parser.add_argument("--index-cache", metavar="DIR",
                        help="keep built indexes here and read them back on the next run with the same data and "
                             "parameters (build times are the first run's)")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    if args.tiny:
        args.n, args.queries, args.clusters, args.budget_s, args.single_queries = 20_000, 256, 200, 1.0, 100
    args.hnsw_ef_construction = [int(value) for value in args.hnsw_ef_construction.split(",")]
    unknown = set(args.types.split(",")) - set(TYPES)
    if unknown:
        parser.error(f"unknown --types {', '.join(sorted(unknown))}; expected some of {', '.join(TYPES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    centres = sphere_centres(args.clusters, args.d, rng)
    base = clustered_vectors(args.n, centres, args.spread, rng)
    queries = clustered_vectors(args.queries, centres, args.spread, rng)
    print(f"data: {args.n:,} x {args.d} base, {args.queries:,} queries, {args.clusters:,} clusters, "
          f"spread {args.spread} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    kinds = args.types.split(",")
    rows, exact = measure("flat", base, queries, None, args)
    rows = rows if "flat" in kinds else []
    for kind in (kind for kind in TYPES if kind in kinds and kind != "flat"):
        for ef_construction in (args.hnsw_ef_construction if kind == "hnsw" else [0]):
            rows += measure(kind, base, queries, exact, args, ef_construction)[0]

    # How hard the data is: the cosine of each query to its exact 1st and 10th neighbours.
    cosines = np.einsum("qkd,qd->qk", base[exact[:, [0, K - 1]]], queries)
    print(f"\nmachine: {cpu_description()}; load average {load_at_start:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end; faiss {faiss.__version__}, {args.threads} threads")
    print(f"data: {args.n:,} x {args.d}, {args.clusters:,} clusters, spread {args.spread}; {args.queries:,} queries, "
          f"cosine to exact 1st / 10th neighbour: {cosines[:, 0].mean():.3f} / {cosines[:, 1].mean():.3f}")
    print(f"command: python bench/index_bench.py {' '.join(sys.argv[1:] if argv is None else argv)}\n")
    print(markdown_table(rows))
    print(f"\n{goal_line(rows, 'batch1_p50_ms')}\n{goal_line(rows, 'batch1_p50_cpu_ms')}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.out:
        with open(args.out, "w") as out:
            json.dump(dict(machine=cpu_description(), load_average=(load_at_start, os.getloadavg()[0]),
                           faiss=faiss.__version__, threads=args.threads, arguments=vars(args), rows=rows),
                      out, indent=1)


if __name__ == "__main__":
    main()
