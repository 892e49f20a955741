"""Build an index folder: embed a catalogue in chunks that survive an interruption, or take saved eval outputs.

Everything is written into `<index>.partial/` and renamed to `<index>` at the end, so a crash never leaves
a half index under the final name. The chunks (`<index>.partial/chunks/chunk_NNNNNN.npz`, each written
whole, then renamed) are kept across interruptions: the same command run again reuses those made with the
same checkpoint, image list and settings (`plan.json`), and embeds only the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from errors import UsageError

from . import store
from .api import now
from .embedding import ImageEmbedder, ModelMismatchError, model_record, output_size, preprocessing
from .index_types import build_index, factory_string

PLAN = "plan.json"
SPOT_CHECK_IMAGES = 2  # saved eval embeddings are compared with these many images embedded afresh
SPOT_CHECK_MIN_COSINE = 0.99  # bf16 against fp32 embedding stays above 0.999; another checkpoint falls far below


def partial_folder(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def refuse_existing(target: Path) -> None:
    if target.exists():
        raise UsageError(f"--index {target} already exists: add images to it with --mode add, or delete it (or "
                         f"choose another folder) to build anew")


def package_versions() -> dict:
    import faiss
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "faiss": faiss.__version__, "numpy": np.__version__}


def list_digest(image_list) -> str:
    digest = hashlib.sha256(str(Path(image_list.root).resolve()).encode())
    digest.update("\n".join(image_list.paths).encode())
    digest.update(image_list.labels.tobytes())
    return digest.hexdigest()


def new_manifest(checkpoint: dict, checkpoint_path: Path, precision: str, index_type: str, parameters: dict,
                 count: int, dim: int, source: dict) -> dict:
    return {"format": store.FORMAT, "format_version": store.FORMAT_VERSION, "generation": 0, "created": now(),
            "updated": now(), "source": source, "model": model_record(checkpoint, checkpoint_path, precision),
            "preprocessing": preprocessing(checkpoint),
            "index": {"type": index_type, "factory": factory_string(index_type, parameters, count, dim),
                      "parameters": parameters},
            "next_id": count, "versions": package_versions()}


@contextmanager
def building(target: Path):
    """Hold `<target>.partial/chunks` (locked) while a build runs; after it, delete what the build no longer needs."""
    from run_folder import run_folder_lock

    chunks = partial_folder(target) / "chunks"
    with run_folder_lock(chunks, "index"):
        yield chunks
    shutil.rmtree(target / "chunks", ignore_errors=True)  # moved along with the folder


def write_index_folder(target: Path, manifest: dict, vectors: np.ndarray, items: list[dict]) -> dict:
    """Build the faiss index, write generation 1 into `<target>.partial`, rename it to `target`."""
    partial = partial_folder(target)
    index = build_index(vectors, manifest["index"]["type"], manifest["index"]["parameters"])
    manifest = store.commit(partial, manifest, vectors, items, index)
    refuse_existing(target)  # another build may have finished meanwhile
    os.rename(partial, target)
    return manifest


def items_of(image_list, positions: np.ndarray, hashes: list[str]) -> list[dict]:
    return [{"id": item_id, "path": os.path.abspath(Path(image_list.root) / image_list.paths[position]),
             "label": None if image_list.labels[position] < 0 else int(image_list.labels[position]), "sha256": digest}
            for item_id, (position, digest) in enumerate(zip(positions.tolist(), hashes))]


def note_duplicates(items: list[dict]) -> None:
    seen, repeats = set(), 0
    for item in items:
        repeats += item["sha256"] in seen
        seen.add(item["sha256"])
    if repeats:
        print(f"note: {repeats} images have the same content as an earlier one in the catalogue; all are kept "
              f"(--mode add refuses such images)", file=sys.stderr)


# ---- from images, in resumable chunks ------------------------------------------------------------
def embed_chunk(model, image_list, start: int, stop: int, data_config, batch_size: int, device, precision: str):
    """Images start..stop-1 of the list -> (embeddings (n, D), list positions (n,), sha256 of each, skipped)."""
    from dataloaders import stop_loader_workers
    from dataloaders.loaders import evaluation_loader
    from evaluation import extract_embeddings

    loader = evaluation_loader(image_list.subset(np.arange(start, stop)), data_config, batch_size, device)
    try:
        embedded = extract_embeddings(model, loader, device, precision, f"images {start}-{stop - 1}")
    finally:
        stop_loader_workers(loader)
    positions = embedded.indices.numpy() + start
    hashes = [store.file_sha256(Path(image_list.root) / image_list.paths[position]) for position in positions.tolist()]
    skipped = [[int(index) + start, reason, detail] for index, reason, detail in embedded.skipped]
    vectors = embedded.embeddings.numpy().reshape(len(positions), -1).astype(np.float32)
    return vectors, positions, hashes, skipped


def save_chunk(path: Path, vectors, positions, hashes, skipped) -> None:
    store.write_durably(path, lambda stream: np.savez(stream, vectors=vectors, positions=positions,
                                                       sha256=np.array(hashes, dtype="U64"),
                                                       skipped=np.array(json.dumps(skipped))))


def load_chunk(path: Path):
    with np.load(path, allow_pickle=False) as chunk:
        return (chunk["vectors"], chunk["positions"], chunk["sha256"].tolist(), json.loads(str(chunk["skipped"])))


def prepared_chunks_folder(chunks: Path, plan: dict) -> int:
    """Keep the chunks of an interrupted build with the same plan, delete those of another; returns how many kept."""
    plan_path = chunks / PLAN
    try:
        previous = json.loads(plan_path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: the chunks cannot be trusted
        previous = None
    existing = sorted(chunks.glob("chunk_*.npz"))
    if previous != plan:
        if existing:
            print(f"note: {chunks} holds {len(existing)} chunks of another build (other checkpoint, images or "
                  f"settings); starting afresh", file=sys.stderr)
        for path in existing:
            path.unlink()
        store.write_durably(plan_path, lambda stream: stream.write(json.dumps(plan, indent=2).encode()))
        return 0
    return len(existing)


def build_from_images(target: Path, image_list, checkpoint_path: Path, index_type: str, parameters: dict,
                      data_config, batch_size: int, device, precision: str, attention: str = "sdpa") -> dict:
    """Embed `image_list` with the checkpoint and write the index folder `target`; returns its manifest."""
    from checkpoint import load_checkpoint

    target = Path(target)
    refuse_existing(target)
    checkpoint = load_checkpoint(checkpoint_path)
    chunk_images = parameters["chunk_images"]
    plan = {"weights_sha256": checkpoint["weights_sha256"], "images": list_digest(image_list),
            "count": len(image_list), "chunk_images": chunk_images, "precision": precision, "attention": attention,
            "preprocessing": preprocessing(checkpoint), "on_bad_image": data_config.on_bad_image}
    model = None
    with building(target) as chunks:
        reused = prepared_chunks_folder(chunks, plan)
        if reused:
            print(f"resuming: {reused} chunks already embedded in {chunks}", file=sys.stderr)
        parts = []
        with tqdm(total=len(image_list), desc="index", unit="image") as progress:
            for start in range(0, len(image_list), chunk_images):
                stop = min(start + chunk_images, len(image_list))
                path = chunks / f"chunk_{start // chunk_images:06d}.npz"
                if not path.is_file():
                    if model is None:
                        model = ImageEmbedder(checkpoint, device, precision, attention).model
                    save_chunk(path, *embed_chunk(model, image_list, start, stop, data_config, batch_size,
                                                  torch.device(device), precision))
                parts.append(load_chunk(path))
                progress.update(stop - start)
        vectors = np.concatenate([part[0] for part in parts]).reshape(-1, output_size(checkpoint))
        positions = np.concatenate([part[1] for part in parts])
        skipped = [entry for part in parts for entry in part[3]]
        items = items_of(image_list, positions, [digest for part in parts for digest in part[2]])
        if not items:
            raise UsageError(f"none of the {len(image_list)} images could be read: nothing to index")
        if skipped:
            first = skipped[0]
            print(f"warning: {len(skipped)} of {len(image_list)} images could not be read and were left out "
                  f"(data.on_bad_image=skip), e.g. {image_list.paths[first[0]]}: {first[1]}", file=sys.stderr)
        note_duplicates(items)
        source = {"kind": "images", "root": str(Path(image_list.root).resolve()), "images_sha256": plan["images"],
                  "images_listed": len(image_list), "images_skipped": len(skipped)}
        return build_from_vectors(target, vectors, items, checkpoint, checkpoint_path, index_type, parameters,
                                  precision, source)


# ---- from saved evaluation outputs ---------------------------------------------------------------
def build_from_eval_outputs(target: Path, run_dir: Path, prefix: str, image_root: Path, checkpoint_path: Path,
                            index_type: str, parameters: dict, device, precision: str, attention: str = "sdpa") -> dict:
    """Index `<prefix>test_embeddings.npy` + `test_labels.npy` + `test_paths.txt` of an evaluation (no embedding),
    after checking that `checkpoint_path` made them: the embedding size, and the first images embedded afresh."""
    from checkpoint import load_checkpoint
    from modes.evaluate import read_array, unit_embeddings

    target = Path(target)
    refuse_existing(target)
    files = [run_dir / f"{prefix}test_{name}" for name in ("embeddings.npy", "labels.npy", "paths.txt")]
    for path in files:
        if not path.is_file():
            raise UsageError(f"--from-eval: {path} does not exist (run --mode eval with this checkpoint first)")
    vectors = unit_embeddings(read_array(files[0], "--from-eval embeddings"))
    labels = read_array(files[1], "--from-eval labels")
    paths = files[2].read_text(encoding="utf-8").splitlines()
    if not (len(vectors) == len(labels) == len(paths)) or labels.ndim != 1:
        raise UsageError(f"--from-eval: {len(vectors)} embeddings, {len(labels)} labels and {len(paths)} paths in "
                         f"{run_dir}: they must pair up, row by row")
    checkpoint = load_checkpoint(checkpoint_path)
    if vectors.shape[1] != output_size(checkpoint):
        raise ModelMismatchError(f"{files[0]} holds {vectors.shape[1]}-dimensional embeddings, but {checkpoint_path} "
                                 f"makes {output_size(checkpoint)}-dimensional ones: they come from another model")
    image_paths = [Path(image_root) / path for path in paths]
    fresh = ImageEmbedder(checkpoint, device, precision, attention).embed(image_paths[:SPOT_CHECK_IMAGES])
    cosines = np.sum(fresh * vectors[:SPOT_CHECK_IMAGES], axis=1)
    if cosines.min() < SPOT_CHECK_MIN_COSINE:
        raise ModelMismatchError(f"{files[0]} was not made by {checkpoint_path}: its first images embedded afresh "
                                 f"differ (cosine {cosines.min():.3f}); pass the checkpoint that was evaluated")
    hashes = [store.file_sha256(path) for path in tqdm(image_paths, desc="hash images", unit="image", leave=False)]
    items = [{"id": row, "path": os.path.abspath(path), "label": int(label), "sha256": digest}
             for row, (path, label, digest) in enumerate(zip(image_paths, labels.tolist(), hashes))]
    note_duplicates(items)
    source = {"kind": "eval outputs", "run_dir": str(Path(run_dir).resolve()), "prefix": prefix,
              "root": str(Path(image_root).resolve()), "images_listed": len(items), "images_skipped": 0}
    return build_from_vectors(target, vectors, items, checkpoint, checkpoint_path, index_type, parameters, precision,
                              source)


def build_from_vectors(target: Path, vectors: np.ndarray, items: list[dict], checkpoint: dict, checkpoint_path: Path,
                       index_type: str, parameters: dict, precision: str, source: dict) -> dict:
    """The index folder `target` over vectors already made by `checkpoint`: (N, D) unit rows and N item dicts
    {"id": 0..N-1, "path", "label", "sha256"}; returns its manifest."""
    target = Path(target)
    refuse_existing(target)
    manifest = new_manifest(checkpoint, checkpoint_path, precision, index_type, parameters, len(items),
                            vectors.shape[1], source)
    with building(target):
        return write_index_folder(target, manifest, vectors, items)
