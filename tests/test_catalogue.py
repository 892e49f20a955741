"""The catalogue index through the CLI a user types and the Python API: build, search, add, remove, resume, refuse.

A dozen generated demo images, the tiny random backbone at 32 px, checkpoints written directly (no training).
"""

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import main
from catalogue import Catalogue, CatalogueError
from catalogue import build as catalogue_build
from checkpoint import save_checkpoint_atomically, weights_digest
from config import load_config, save_config
from conftest import REPO_ROOT
from retrieval import nearest_neighbours

TEST_IMAGES = 12  # 4 test classes x 3 images


def write_run(run_dir, data_root, seed=0, dim=8):
    """A run folder as training leaves it (best.pt, config.yaml), with random tiny weights drawn from `seed`."""
    from model import build_embedder

    config = load_config(None, [
        "model.backbone=tiny", f"model.embedding_dim={dim}", "data.image_size=32", "data.format=demo",
        f"data.root={data_root}", "data.demo_classes=8", "data.demo_images_per_class=3", "data.num_workers=0",
        "train.precision=fp32", "train.device=cpu", "wandb.mode=disabled", "eval.recall_ks=[1,2]", "eval.map_ks=[2]",
        f"output.dir={run_dir}"])
    torch.manual_seed(seed)
    model = build_embedder("tiny", 32, dim)
    weights = model.state_dict()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint_atomically({
        "model": weights, "weights_sha256": weights_digest(weights), "config": config.to_dict(), "epoch": 3,
        "metrics": {"recall@1": 0.25}, "backbone_config_json": model.backbone.config.to_json_string(),
        "embedding_dim": dim, "normalisation": {"mean": model.input_mean, "std": model.input_std},
        "wandb_run_id": None}, run_dir / "best.pt")
    save_config(config, run_dir / "config.yaml")
    return run_dir / "best.pt"


def foreign_eval_outputs(checkpoint, index, folder, dim):
    """`folder`: a copy of `checkpoint`'s run folder whose saved test outputs come from another model (random
    unit vectors of `dim` dimensions) for the images of `index`."""
    shutil.copytree(checkpoint.parent, folder)
    items = Catalogue.load(index).items
    root = Catalogue.load(index).manifest["source"]["root"]
    vectors = np.random.default_rng(dim).normal(size=(len(items), dim)).astype(np.float32)
    np.save(folder / "test_embeddings.npy", vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    np.save(folder / "test_labels.npy", np.array([item["label"] for item in items]))
    (folder / "test_paths.txt").write_text("".join(f"{item['path'][len(root) + 1:]}\n" for item in items))
    return folder


def run_cli(*argv):
    return main.main([str(a) for a in argv])


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model and faiss's k-means run many tiny parallel loops: on a busy 2-core machine each waits for a
    descheduled thread, and a 20 ms forward takes a second. One thread keeps these tests fast anywhere."""
    import faiss

    threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(threads[0])
    faiss.omp_set_num_threads(threads[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("catalogue")
    checkpoints = {name: write_run(base / name, base / "demo", seed, dim)
                   for name, seed, dim in (("run", 0, 8), ("other", 1, 8), ("wide", 2, 16))}  # wide: index types
    assert run_cli("--mode", "index", "--index", base / "index", "--checkpoint", checkpoints["run"],
                   "index.chunk_images=5") == 0
    new_image = base / "new_product.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(new_image)
    return base, checkpoints


@pytest.fixture
def index(runs, tmp_path):
    """A fresh copy of the module's index, to change."""
    shutil.copytree(runs[0] / "index", tmp_path / "index")
    return tmp_path / "index"


def test_index_then_search_returns_the_neighbours_of_eval_knn(runs, capsys):
    base, checkpoints = runs
    catalogue = Catalogue.load(base / "index")
    assert len(catalogue) == TEST_IMAGES and catalogue.dim == 8
    assert run_cli("--mode", "eval", "--checkpoint", checkpoints["run"]) == 0
    embeddings = np.load(base / "run" / "test_embeddings.npy")
    paths = (base / "run" / "test_paths.txt").read_text().splitlines()
    assert [item["path"] for item in catalogue.items] == [str(base / "demo" / path) for path in paths]
    np.testing.assert_allclose(catalogue.vectors, embeddings, atol=1e-6)

    # eval excludes the query itself by index; a search by an item's own vector returns it too: drop it by id.
    expected = nearest_neighbours(embeddings, TEST_IMAGES - 1, backend="torch")[1].numpy()
    results = catalogue.search_vectors(catalogue.vectors, k=TEST_IMAGES)
    for item, row, expected_row in zip(catalogue.items, results, expected):
        found = [result["id"] for result in row if result["id"] != item["id"]]
        assert found == expected_row.tolist()
        assert row[0]["id"] == item["id"] and row[0]["score"] == pytest.approx(1.0, abs=1e-5)

    capsys.readouterr()
    query = catalogue.items[4]["path"]
    assert run_cli("--mode", "search", "--index", base / "index", "--query", query, "--top-k", 3) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["rank"] for line in lines] == [1, 2, 3]
    assert list(lines[0]) == ["query", "rank", "id", "path", "label", "score"]
    assert lines[0]["id"] == 4 and lines[0]["label"] == catalogue.items[4]["label"]
    assert [line["id"] for line in lines[1:]] == [result["id"] for result in results[4][1:3]]

    # the same index from the saved eval outputs, without embedding the catalogue again
    assert run_cli("--mode", "index", "--index", base / "from_eval", "--from-eval", base / "run") == 0
    from_eval = Catalogue.load(base / "from_eval")
    np.testing.assert_allclose(from_eval.vectors, embeddings, atol=1e-6)  # normalised again on load
    assert from_eval.items == catalogue.items


def test_add_then_search_finds_the_new_item_and_remove_forgets_it(runs, index, tmp_path, capsys):
    base, _ = runs
    new_image = base / "new_product.png"
    duplicate = tmp_path / "copy.jpg"
    shutil.copy(Catalogue.load(index).items[0]["path"], duplicate)
    assert run_cli("--mode", "add", "--index", index, "--images", new_image, duplicate) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["id"] for line in captured.out.splitlines()] == [TEST_IMAGES]
    assert "refused" in captured.err and "item 0" in captured.err

    def top_ids():
        assert run_cli("--mode", "search", "--index", index, "--query", new_image, "--top-k", 2) == 0
        return [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()]

    assert top_ids()[0] == TEST_IMAGES
    assert run_cli("--mode", "remove", "--index", index, "--ids", TEST_IMAGES) == 0
    assert TEST_IMAGES not in top_ids()
    catalogue = Catalogue.load(index)
    assert len(catalogue) == TEST_IMAGES and catalogue.manifest["next_id"] == TEST_IMAGES + 1
    assert sorted(path.name for path in index.iterdir()) == ["index.3.faiss", "items.3.jsonl", "manifest.json",
                                                              "vectors.3.npy"]  # older generations deleted
    assert run_cli("--mode", "remove", "--index", index, "--ids", 999) == 1
    assert "no item with id 999" in one_error_line(capsys)


def count_chunks_embedded(monkeypatch, embed_chunk, calls: list) -> None:
    """The build's embed_chunk, appending each chunk's first list position to `calls`."""
    def counted(*args, **kwargs):
        calls.append(args[2])
        return embed_chunk(*args, **kwargs)

    monkeypatch.setattr(catalogue_build, "embed_chunk", counted)


class Killed(BaseException):
    """Stands in for SIGKILL: nothing of the build's own clean-up runs after it."""


def test_an_interrupted_build_resumes_and_equals_an_uninterrupted_one(runs, tmp_path, monkeypatch):
    base, checkpoints = runs
    embed_chunk = catalogue_build.embed_chunk
    calls = []

    def killed_after_the_first_chunk(*args, **kwargs):
        if calls:
            raise Killed
        calls.append(args[2])
        return embed_chunk(*args, **kwargs)

    monkeypatch.setattr(catalogue_build, "embed_chunk", killed_after_the_first_chunk)
    arguments = ("--mode", "index", "--index", tmp_path / "index", "--checkpoint", checkpoints["run"],
                 "index.chunk_images=5")
    with pytest.raises(Killed):
        run_cli(*arguments)
    assert not (tmp_path / "index").exists()  # never a half index under the final name
    assert [path.name for path in (tmp_path / "index.partial" / "chunks").glob("chunk_*")] == ["chunk_000000.npz"]

    count_chunks_embedded(monkeypatch, embed_chunk, calls)
    assert run_cli(*arguments) == 0
    assert calls == [0, 5, 10]  # the first chunk was embedded once, before the kill
    assert not (tmp_path / "index.partial").exists() and not (tmp_path / "index" / "chunks").exists()
    resumed, uninterrupted = Catalogue.load(tmp_path / "index"), Catalogue.load(base / "index")
    np.testing.assert_array_equal(resumed.vectors, uninterrupted.vectors)
    assert resumed.items == uninterrupted.items
    assert resumed.manifest["files"] == uninterrupted.manifest["files"]


def test_a_build_killed_by_sigkill_resumes_and_equals_an_uninterrupted_one(runs, tmp_path, monkeypatch):
    """A real `--mode index` process killed (SIGKILL: no clean-up of its own) once its first chunk is on disk,
    then the same command: the chunks on disk are kept, only the missing ones are embedded, and the index
    equals the uninterrupted build. One image per chunk, so the kill lands mid-build (12 chunks)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    base, checkpoints = runs
    arguments = ["--mode", "index", "--index", str(tmp_path / "index"), "--checkpoint", str(checkpoints["run"]),
                 "index.chunk_images=1"]
    chunks = tmp_path / "index.partial" / "chunks"
    for _ in range(3):  # a build that finished before the kill (a starved test process) is tried again
        shutil.rmtree(tmp_path / "index", ignore_errors=True)
        shutil.rmtree(tmp_path / "index.partial", ignore_errors=True)
        child = subprocess.Popen([sys.executable, str(REPO_ROOT / "main.py"), *arguments], cwd=REPO_ROOT,
                                 env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120  # imports and the model load: seconds on a busy 2-core machine
            while not list(chunks.glob("chunk_*.npz")) and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            child.send_signal(signal.SIGKILL)
        finally:
            child.wait(timeout=30)
        if child.returncode == -signal.SIGKILL:
            break
    assert child.returncode == -signal.SIGKILL, "the build ended before it was killed, three times"
    assert not (tmp_path / "index").exists()  # never a half index under the final name
    kept = sorted(int(path.stem.split("_")[1]) for path in chunks.glob("chunk_*.npz"))
    assert kept and len(kept) < TEST_IMAGES

    embed_chunk, calls = catalogue_build.embed_chunk, []
    count_chunks_embedded(monkeypatch, embed_chunk, calls)
    assert run_cli(*arguments) == 0
    assert calls == [start for start in range(TEST_IMAGES) if start not in kept]  # nothing embedded twice
    assert not (tmp_path / "index.partial").exists()
    # The same build uninterrupted (one image per chunk too: batches of 1 and of 5 differ in the last bits).
    monkeypatch.setattr(catalogue_build, "embed_chunk", embed_chunk)
    assert run_cli(*arguments[:2], "--index", tmp_path / "uninterrupted", *arguments[4:]) == 0
    resumed, uninterrupted = Catalogue.load(tmp_path / "index"), Catalogue.load(tmp_path / "uninterrupted")
    np.testing.assert_array_equal(resumed.vectors, uninterrupted.vectors)
    assert resumed.items == uninterrupted.items


def test_index_types_search_add_and_remove_consistently(runs, tmp_path):
    """flat, hnsw, ivf_flat, ivf_pq over 400 clustered vectors: near-exact recall, and rows stay paired with ids."""
    from catalogue.build import build_from_vectors
    from checkpoint import load_checkpoint

    generator = np.random.default_rng(0)
    centres = generator.normal(size=(20, 16))
    vectors = (centres[generator.integers(0, 20, 400)] + 0.3 * generator.normal(size=(400, 16))).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [{"id": row, "path": f"/nowhere/{row}.jpg", "label": None, "sha256": f"{row:064d}"} for row in range(400)]
    checkpoint_path = runs[1]["wide"]
    parameters = {"hnsw_m": 16, "hnsw_ef_construction": 64, "hnsw_ef_search": 64, "ivf_lists": 8, "pq_bytes": 8,
                  "nprobe": 8, "chunk_images": 100}
    exact = nearest_neighbours(vectors, 10, backend="torch")[1].numpy()
    for index_type in ("flat", "hnsw", "ivf_flat", "ivf_pq"):
        build_from_vectors(tmp_path / index_type, vectors, items, load_checkpoint(checkpoint_path), checkpoint_path,
                           index_type, parameters, "fp32", {"kind": "test"})
        catalogue = Catalogue.load(tmp_path / index_type)
        found = [[result["id"] for result in row][1:] for row in catalogue.search_vectors(vectors, k=11)]
        recall = np.mean([len(set(row) & set(truth)) / 10 for row, truth in zip(found, exact)])
        assert recall >= (1.0 if index_type in ("flat", "ivf_flat") else 0.6), (index_type, recall)
        catalogue.remove(range(0, 400, 2))
        kept = Catalogue.load(tmp_path / index_type)
        assert [item["id"] for item in kept.items] == list(range(1, 400, 2))
        if index_type != "ivf_pq":  # codes are lossy: a vector need not find itself first
            top = [row[0]["id"] for row in kept.search_vectors(vectors[1::2], k=1)]
            assert top == list(range(1, 400, 2)), index_type


def test_wrong_embedding_size_is_one_clear_line(runs, index, capsys, tmp_path):
    base, checkpoints = runs
    with pytest.raises(CatalogueError, match=r"shape \(1, 16\): the index holds 8-dimensional vectors"):
        Catalogue.load(index).search_vectors(np.ones((1, 16)), k=1)
    # eval outputs of a 16-d model, indexed as if the 8-d checkpoint had made them
    mixed = foreign_eval_outputs(checkpoints["run"], index, tmp_path / "mixed", 16)
    capsys.readouterr()
    assert run_cli("--mode", "index", "--index", tmp_path / "from_eval", "--from-eval", mixed) == 1
    assert re.search(r"16-dimensional embeddings, but .* makes 8-dimensional", one_error_line(capsys))


def test_an_index_refuses_another_checkpoint_and_its_eval_outputs(runs, index, tmp_path, capsys):
    base, checkpoints = runs
    new_image = base / "new_product.png"
    for mode, option in (("search", "--query"), ("add", "--images")):
        assert run_cli("--mode", mode, "--index", index, option, new_image, "--checkpoint", checkpoints["other"]) == 1
        assert "is not the model index" in one_error_line(capsys)
    # a manifest from another checkpoint: the files are the same, the recorded model is not
    manifest = json.loads((index / "manifest.json").read_text())
    manifest["model"]["weights_sha256"] = "0" * 64
    (index / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli("--mode", "search", "--index", index, "--query", new_image) == 1
    assert "is not the model index" in one_error_line(capsys)
    # eval outputs of another model of the same size: the spot check embeds the first images afresh
    mixed = foreign_eval_outputs(checkpoints["run"], index, tmp_path / "mixed", 8)
    capsys.readouterr()
    assert run_cli("--mode", "index", "--index", tmp_path / "from_eval", "--from-eval", mixed) == 1
    assert "was not made by" in one_error_line(capsys)


@pytest.mark.parametrize("damage, message", [
    (lambda index: next(index.glob("index.*.faiss")).unlink(), "is missing"),
    (lambda index: next(index.glob("vectors.*.npy")).write_bytes(b"\x93NUMPY" + b"\0" * 200), "has 206 bytes"),
    (lambda index: (lambda path: path.write_bytes(path.read_bytes()[:-4] + b"\xff" * 4))(next(index.glob("items.*"))),
     "differs from the sha256"),
    (lambda index: (index / "manifest.json").write_text("{not json"), "is damaged"),
    (lambda index: shutil.rmtree(index), "does not exist"),
])
def test_a_damaged_or_missing_index_stops_with_one_line(runs, index, capsys, damage, message):
    damage(index)
    assert run_cli("--mode", "search", "--index", index, "--query", runs[0] / "new_product.png") == 1
    assert message in one_error_line(capsys)


def test_a_list_option_gives_back_the_overrides_that_follow_it():
    arguments = main.parse_arguments(["--mode", "search", "--query", "a.jpg", "b.jpg", "index.nprobe=3"])
    assert arguments.query == ["a.jpg", "b.jpg"] and arguments.overrides == ["index.nprobe=3"]


def test_the_readme_python_example_runs(runs, tmp_path, monkeypatch, capsys):
    base, _ = runs
    readme = (REPO_ROOT / "README.md").read_text()
    example = re.search(r"<!-- catalogue-example -->\s*```python\n(.*?)```\s*<!-- catalogue-example -->", readme,
                        re.S).group(1)
    assert len(example.strip().splitlines()) <= 10
    monkeypatch.chdir(tmp_path)
    shutil.copytree(base / "index", tmp_path / "models_ckpt" / "demo" / "index")
    shutil.copy(Catalogue.load(base / "index").items[5]["path"], tmp_path / "query.jpg")
    shutil.copy(base / "new_product.png", tmp_path / "new_product.jpg")
    exec(compile(example, "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("1 5 ")  # the query is a copy of item 5
