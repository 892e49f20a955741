"""`Catalogue`: an index folder opened for search, and changed (add, remove) atomically under its lock."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from . import store
from .embedding import ImageEmbedder, require_same_model
from .index_types import build_index, search, set_search_parameters
from .store import CatalogueError


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def unit_rows(vectors, dim: int) -> np.ndarray:
    """(Q, D) or (D,) numbers -> (Q, D) float32 unit rows; CatalogueError for another D, NaN or all-zero rows."""
    vectors = np.asarray(vectors, dtype=np.float64)
    vectors = vectors[None] if vectors.ndim == 1 else vectors
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise CatalogueError(f"query vectors of shape {vectors.shape}: the index holds {dim}-dimensional vectors "
                             f"(another model's embeddings?)")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.isfinite(vectors).all() or (norms == 0).any():
        raise CatalogueError("query vectors must be finite and not all zero")
    return (vectors / norms).astype(np.float32)


class Catalogue:
    """A catalogue index (see catalogue/__init__.py for the folder and the result dicts).

    The model is loaded on first use (embedding a query or an added image), from the checkpoint the manifest
    names, or `checkpoint` given to `load`; a checkpoint with other weights is refused.
    """

    def __init__(self, folder: Path, stored: store.Stored, checkpoint: str | Path | None = None, device: str = "cpu",
                 precision: str | None = None, attention: str = "sdpa", max_image_bytes: int = 100_000_000,
                 search_parameters: dict | None = None) -> None:
        self.folder = Path(folder)
        self.checkpoint_path = Path(checkpoint or stored.manifest["model"]["checkpoint"])
        self.device, self.attention, self.max_image_bytes = device, attention, max_image_bytes
        self.precision = precision or stored.manifest["model"]["precision"]
        self.search_parameters = dict(search_parameters or {})
        self._embedder: ImageEmbedder | None = None
        self._embedder_lock = threading.Lock()  # concurrent first queries (a server) load the model once
        self._use(stored)

    @classmethod
    def load(cls, folder: str | Path, checkpoint: str | Path | None = None, device: str = "cpu",
             precision: str | None = None, verify: bool = True, search_parameters: dict | None = None,
             **options) -> "Catalogue":
        """Open an index folder; nothing else is read (no model, no catalogue image) until needed.

        checkpoint: the model file, when not where the manifest says (its weights hash must match).
        precision: of query embedding; default the one the catalogue was embedded with.
        verify: check the sha256 of the items and the faiss index (about a second per GB; the vectors are
            checked when add or remove reads them).
        search_parameters: {"nprobe": ..., "hnsw_ef_search": ...} over the manifest's values.
        options: attention ("sdpa" or "eager", as model.attention), max_image_bytes (as data.max_image_bytes).
        """
        return cls(folder, store.load(folder, verify), checkpoint, device, precision,
                   search_parameters=search_parameters, **options)

    def _use(self, stored: store.Stored) -> None:
        self.manifest, self.vectors, self.items, self.index = stored.manifest, stored.vectors, stored.items, stored.index
        set_search_parameters(self.index, self.index_type, {**self.manifest["index"]["parameters"],
                                                            **self.search_parameters})
        self._rows_of_ids = {item["id"]: row for row, item in enumerate(self.items)}

    def __len__(self) -> int:
        return len(self.items)

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def index_type(self) -> str:
        return self.manifest["index"]["type"]

    def refresh(self) -> bool:
        """Re-read the folder if another process changed it since; True when it did."""
        if store.read_manifest(self.folder)["generation"] == self.manifest["generation"]:
            return False
        self._use(store.load(self.folder))
        return True

    # ---- embedding ----------------------------------------------------------------------------
    @property
    def embedder(self) -> ImageEmbedder:
        with self._embedder_lock:
            if self._embedder is None:
                self._embedder = self._load_embedder()
        return self._embedder

    def _load_embedder(self) -> ImageEmbedder:
        from checkpoint import load_checkpoint

        if not self.checkpoint_path.is_file():
            raise CatalogueError(f"checkpoint {self.checkpoint_path}, which index {self.folder} was built with, "
                                 f"does not exist; pass --checkpoint (checkpoint=) with a copy of it")
        checkpoint = load_checkpoint(self.checkpoint_path)
        require_same_model(checkpoint, self.checkpoint_path, self.manifest)
        return ImageEmbedder(checkpoint, self.device, self.precision, self.attention, self.max_image_bytes)

    def embed_images(self, images) -> np.ndarray:
        """Paths or PIL images -> (Q, D) float32 unit vectors, preprocessed as the catalogue was."""
        return self.embedder.embed(list(images))

    # ---- search -------------------------------------------------------------------------------
    def search(self, queries, k: int = 10) -> list[list[dict]]:
        """Images (paths, PIL images) or vectors ((Q, D) array, or (D,)) -> Q lists of results, best first.
        One path or image alone is one query."""
        if isinstance(queries, (str, Path)) or hasattr(queries, "getpixel"):  # getpixel: a PIL image
            queries = [queries]
        if isinstance(queries, np.ndarray) or (isinstance(queries, (list, tuple)) and queries
                                               and isinstance(queries[0], (float, int, list, np.ndarray))):
            return self.search_vectors(queries, k)
        return self.search_vectors(self.embed_images(queries), k)

    def search_vectors(self, vectors, k: int = 10) -> list[list[dict]]:
        """Each result: {"id", "path", "label" (None when unknown), "score" (inner product), "rank" (1 = best)}."""
        if k < 1:
            raise CatalogueError(f"k must be at least 1; got {k}")
        scores, positions = search(self.index, unit_rows(vectors, self.dim), k)
        return [[{"id": self.items[position]["id"], "path": self.items[position]["path"],
                  "label": self.items[position]["label"], "score": float(score), "rank": rank}
                 for rank, (position, score) in enumerate(zip(row_positions.tolist(), row_scores.tolist()), 1)
                 if position >= 0]
                for row_positions, row_scores in zip(positions, scores)]

    def item(self, item_id: int) -> dict:
        return self.items[self._rows_of_ids[item_id]]

    # ---- changes ------------------------------------------------------------------------------
    def add(self, images, labels=None) -> dict:
        """Embed image files and add them; an image whose content (sha256) is already in the index, or earlier in
        `images`, is refused. Returns {"added": [item dicts], "duplicates": [{"path", "same_as": id}]}."""
        from run_folder import run_folder_lock

        paths = [Path(image) for image in images]
        labels = [None] * len(paths) if labels is None else [None if label is None else int(label) for label in labels]
        if len(labels) != len(paths):
            raise CatalogueError(f"{len(paths)} images but {len(labels)} labels")
        for path in paths:
            if not path.is_file():
                raise CatalogueError(f"image {path} does not exist")
        hashes = [store.file_sha256(path) for path in paths]
        vectors = self.embed_images(paths) if paths else np.empty((0, self.dim), np.float32)
        with run_folder_lock(self.folder, "add"):
            self.refresh()
            known = {item["sha256"]: item["id"] for item in self.items}
            added, duplicates, rows = [], [], []
            next_id = int(self.manifest["next_id"])
            for row, (path, digest, label) in enumerate(zip(paths, hashes, labels)):
                if digest in known:
                    duplicates.append({"path": str(path), "same_as": known[digest]})
                    continue
                known[digest] = next_id
                added.append({"id": next_id, "path": os.path.abspath(path), "label": label, "sha256": digest})
                rows.append(row)
                next_id += 1
            if added:
                new_vectors = vectors[rows]
                old_vectors = self.verified_vectors()
                self.index.add(new_vectors)
                try:
                    self._commit(np.concatenate([old_vectors, new_vectors]), self.items + added, self.index,
                                 next_id=next_id)
                except BaseException:
                    self._use(store.load(self.folder))  # the index object holds vectors that were not saved
                    raise
        return {"added": added, "duplicates": duplicates}

    def remove(self, ids) -> list[int]:
        """Remove items by id; an id not in the index stops the call with nothing removed. Returns the ids removed.

        flat and IVF indexes are refilled from the kept vectors (IVF keeps its training); HNSW is rebuilt.
        """
        from run_folder import run_folder_lock

        ids = sorted({int(item_id) for item_id in ids})
        with run_folder_lock(self.folder, "remove"):
            self.refresh()
            unknown = [item_id for item_id in ids if item_id not in self._rows_of_ids]
            if unknown:
                raise CatalogueError(f"no item with id {', '.join(map(str, unknown[:10]))} in {self.folder}; "
                                     f"nothing removed")
            keep = np.ones(len(self.items), dtype=bool)
            keep[[self._rows_of_ids[item_id] for item_id in ids]] = False
            kept_vectors = self.verified_vectors()[keep]
            index = build_index(kept_vectors, self.index_type, self.manifest["index"]["parameters"], trained=self.index)
            self._commit(kept_vectors, [item for item, kept in zip(self.items, keep) if kept], index)
        return ids

    def verified_vectors(self) -> np.ndarray:
        """The (N, D) vectors read into memory, after checking their file's sha256."""
        store.checked_file(self.folder, self.manifest, "vectors")
        return np.array(self.vectors)

    def _commit(self, vectors: np.ndarray, items: list[dict], index, **changes) -> None:
        manifest = store.commit(self.folder, {**self.manifest, **changes, "updated": now()}, vectors, items, index)
        self._use(store.Stored(manifest, vectors, items, index))
