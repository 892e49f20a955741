"""An index folder on disk: `manifest.json` plus one generation of data files, replaced atomically.

    manifest.json       what the index is (model, preprocessing, index type, counts, versions) and which
                        data files are current, with their sizes and sha256
    vectors.G.npy       (N, D) float32 unit vectors, row i = item i
    items.G.jsonl       N lines {"id", "path", "label", "sha256"}: row i of the vectors
    index.G.faiss       the faiss index over the vectors, position i = row i

G is the generation. A change (add, remove) writes generation G + 1 under new names, then replaces
manifest.json (temporary file, fsync, rename): the manifest names either the old complete set or the new
one, never a mix, whenever a crash comes. Files of other generations are deleted after the switch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "image-retrieval-catalogue"
FORMAT_VERSION = 1
DATA_FILES = ("vectors", "items", "index")
SUFFIXES = {"vectors": "npy", "items": "jsonl", "index": "faiss"}


class CatalogueError(Exception):
    """An index folder that cannot be used (missing, damaged, from another model): one line, exit code 1."""


@dataclass
class Stored:
    """What one generation of an index folder holds."""

    manifest: dict
    vectors: np.ndarray  # (N, D) float32, memory-mapped: read (and its sha256 checked) only by add and remove
    items: list[dict]  # N dicts: id, path, label (int or None), sha256
    index: object  # faiss.Index


def file_sha256(path: Path, block_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(block_bytes):
            digest.update(block)
    return digest.hexdigest()


def write_durably(path: Path, write) -> None:
    """write(stream) into a temporary file beside `path`, fsync, rename onto `path`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # makes the renames durable
    finally:
        os.close(descriptor)


def read_manifest(folder: Path) -> dict:
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CatalogueError(f"index folder {folder} does not exist; build one with --mode index")
    if not path.is_file():
        raise CatalogueError(f"{folder} is not a catalogue index (no {MANIFEST}); build one with --mode index")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CatalogueError(f"{path} is damaged ({type(error).__name__}: {str(error)[:120]}); rebuild the index") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CatalogueError(f"{path} is not a manifest of this project's catalogue index")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CatalogueError(f"{path} has format version {manifest.get('format_version')}; this code reads "
                             f"{FORMAT_VERSION}: rebuild the index")
    return manifest


def checked_file(folder: Path, manifest: dict, role: str, verify: bool = True) -> Path:
    entry = manifest["files"][role]
    path = folder / entry["name"]
    if not path.is_file():
        raise CatalogueError(f"index file {path} is missing; restore the folder or rebuild the index")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise CatalogueError(f"index file {path} has {size} bytes, the manifest says {entry['bytes']} (truncated or "
                             f"replaced); rebuild the index")
    if verify and file_sha256(path) != entry["sha256"]:
        raise CatalogueError(f"index file {path} differs from the sha256 in the manifest (damaged); rebuild the index")
    return path


def read_items(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as stream:
        return [json.loads(line) for line in stream]


def load(folder: Path, verify: bool = True) -> Stored:
    """The current generation of `folder`, checked: every file present and of the recorded size, the items and
    the faiss index (verify) of the recorded sha256, and all three agreeing on the count and the embedding size.

    verify costs about a second per GB on this project's CPU machine. The vectors, which searches do not need,
    are memory-mapped; whoever reads them checks their sha256 first (`checked_file(..., "vectors")`).
    """
    import faiss

    folder = Path(folder)
    manifest = read_manifest(folder)
    paths = {role: checked_file(folder, manifest, role, verify and role != "vectors") for role in DATA_FILES}
    count, dim = manifest["count"], manifest["embedding_dim"]
    try:
        vectors = np.load(paths["vectors"], mmap_mode="r", allow_pickle=False)
        items = read_items(paths["items"])
        index = faiss.read_index(str(paths["index"]))
    except (OSError, ValueError, RuntimeError, UnicodeDecodeError) as error:  # json's errors are ValueErrors
        raise CatalogueError(f"{folder}: an index file cannot be read ({type(error).__name__}: "
                             f"{str(error).splitlines()[0][:160] if str(error) else ''}); rebuild the index") from None
    found = {"vectors": (vectors.shape, vectors.dtype == np.float32), "items": len(items),
             "faiss index": (index.ntotal, index.d)}
    if vectors.shape != (count, dim) or vectors.dtype != np.float32 or len(items) != count \
            or (index.ntotal, index.d) != (count, dim):
        raise CatalogueError(f"{folder}: the files disagree with the manifest ({count} items of {dim} dimensions; "
                             f"found {found}); rebuild the index")
    return Stored(manifest, vectors, items, index)


def commit(folder: Path, manifest: dict, vectors: np.ndarray, items: list[dict], index) -> dict:
    """Write generation manifest["generation"] + 1 of the index in `folder` and switch to it; returns the new manifest.

    The caller holds the folder's lock. Files of every other generation are deleted once the new one is in place.
    """
    import faiss

    folder = Path(folder)
    generation = int(manifest.get("generation", 0)) + 1
    names = {role: f"{role}.{generation}.{SUFFIXES[role]}" for role in DATA_FILES}
    writers = {
        "vectors": lambda stream: np.save(stream, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False),
        "items": lambda stream: stream.write("".join(json.dumps(item) + "\n" for item in items).encode()),
        "index": lambda stream: faiss.write_index(index, faiss.PyCallbackIOWriter(stream.write)),
    }
    files = {}
    for role in DATA_FILES:
        path = folder / names[role]
        write_durably(path, writers[role])
        files[role] = {"name": names[role], "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    updated = {**manifest, "generation": generation, "files": files, "count": len(items),
               "embedding_dim": int(vectors.shape[1])}
    write_durably(folder / MANIFEST, lambda stream: stream.write(json.dumps(updated, indent=2).encode() + b"\n"))
    _sync_folder(folder)
    current = set(names.values())
    for role in DATA_FILES:
        for stale in folder.glob(f"{role}.*.{SUFFIXES[role]}"):
            if stale.name not in current:
                stale.unlink(missing_ok=True)
    return updated
