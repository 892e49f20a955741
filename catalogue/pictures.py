"""The `--mode search --visualize` picture: each query image with its results (visualize.retrieval_grid)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def search_grid(queries: list, results: list[list[dict]], output: Path) -> Path:
    """One row per query (unknown label, blue frame), then its results captioned by label and distance."""
    from visualize import retrieval_grid

    k = min(len(rows) for rows in results)  # an approximate index may return fewer hits for some query
    results = [rows[:k] for rows in results]
    paths = [Path(query) for query in queries] + [Path(row["path"]) for rows in results for row in rows]
    labels = [-1] * len(queries) + [-1 if row["label"] is None else row["label"] for rows in results for row in rows]
    neighbours = len(queries) + np.arange(len(queries) * k).reshape(len(queries), k)
    scores = np.array([[row["score"] for row in rows] for rows in results], dtype=np.float64).reshape(len(queries), k)
    return retrieval_grid(np.arange(len(queries)), neighbours, scores, np.array(labels), paths, Path(output))
