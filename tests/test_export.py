"""`--mode export`: the Hugging Face style folder, its model card's snippet run as written, and the way back in."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import main
from catalogue.embedding import ImageEmbedder
from checkpoint import embedder_from_checkpoint, load_checkpoint
from model import BackboneLoadError, build_embedder
from test_catalogue import one_thread, write_run  # noqa: F401 (one_thread: a module-wide fixture)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    checkpoint = write_run(base / "run", base / "demo", seed=3, dim=8)
    (base / "run" / "report.json").write_text(json.dumps({"recall@1": 0.4167, "map@r": 0.3125, "num_queries": 12,
                                                          "model": f"{checkpoint} (epoch 3)"}))
    generator = np.random.default_rng(0)
    images = []
    for number, (height, width) in enumerate(((45, 37), (64, 64), (30, 90))):
        images.append(base / f"photo{number}.png")
        Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(images[-1])
    assert main.main(["--mode", "export", "--checkpoint", str(checkpoint), "--output", str(base / "export")]) == 0
    return base / "export", checkpoint, images


def test_the_export_holds_the_backbone_head_preprocessing_and_a_card_with_the_metrics(exported):
    folder, _, _ = exported
    assert sorted(path.name for path in folder.iterdir()) == [
        "README.md", "config.json", "model.safetensors", "preprocessor_config.json", "projection.safetensors"]
    preprocessing = json.loads((folder / "preprocessor_config.json").read_text())
    assert (preprocessing["image_size"], preprocessing["resize_short_side"], preprocessing["embedding_dim"]) == (32, 36, 8)
    card = (folder / "README.md").read_text()
    assert "| recall@1 | 25.00 |" in card  # validation, from the checkpoint
    assert "| recall@1 | 41.67 |" in card and "| map@r | 31.25 |" in card  # test, from the run's report.json
    assert "embedding_dim: 8" in card  # the training configuration


def test_the_card_snippet_alone_gives_the_checkpoint_embeddings(exported):
    folder, checkpoint_path, images = exported
    snippet = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    assert "import catalogue" not in snippet and "from model" not in snippet
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    project = ImageEmbedder(load_checkpoint(checkpoint_path), precision="fp32").embed(images)
    for image, expected in zip(images, project):
        np.testing.assert_allclose(namespace["embed"](image).numpy(), expected, atol=1e-5)


def test_model_backbone_set_to_the_export_loads_the_head_too(exported):
    folder, checkpoint_path, _ = exported
    original = embedder_from_checkpoint(load_checkpoint(checkpoint_path)).eval()
    reloaded = build_embedder(str(folder), 32, 8).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(pixels), original(pixels), atol=1e-6, rtol=0)
    with pytest.raises(BackboneLoadError, match="8-d projection head; set model.embedding_dim=8"):
        build_embedder(str(folder), 32, 16)


def test_export_refuses_a_folder_that_holds_something(exported, capsys):
    folder, checkpoint_path, _ = exported
    assert main.main(["--mode", "export", "--checkpoint", str(checkpoint_path), "--output", str(folder)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
