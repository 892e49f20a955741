import numpy as np
import pytest
from PIL import Image

import main
from conftest import REPO_ROOT
from dataloaders import ImageList
from dataloaders.cache import MANIFEST, CacheError, build_cache, use_cache


def make_list(root, sizes):
    (root / "a").mkdir(parents=True)
    paths = []
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (i * 40, 100, 200)).save(root / "a" / f"{i}.jpg", quality=90)
        paths.append(f"a/{i}.jpg")
    n = len(paths)
    return ImageList(root, tuple(paths), np.arange(n), np.zeros(n, dtype=np.int64))


def test_cache_shrinks_short_side_keeps_paths_and_small_images(tmp_path):
    images = make_list(tmp_path / "src", [(500, 400), (120, 90)])
    summary = build_cache([images], tmp_path / "cache", short_side=100)
    assert summary == {"written": 2, "reused": 0, "failed": []}
    with Image.open(tmp_path / "cache" / "a" / "0.jpg") as big, Image.open(tmp_path / "cache" / "a" / "1.jpg") as small:
        assert min(big.size) == 100 and big.size == (125, 100)  # aspect ratio kept
        assert small.size == (120, 90)  # never upsampled
    cached = use_cache(images, tmp_path / "cache", 100)
    assert cached.root == tmp_path / "cache" and cached.paths == images.paths
    assert np.array_equal(cached.labels, images.labels)
    assert build_cache([images], tmp_path / "cache", short_side=100)["reused"] == 2


def test_incomplete_or_stale_cache_is_refused(tmp_path):
    images = make_list(tmp_path / "src", [(300, 300), (300, 300)])
    with pytest.raises(CacheError, match="no complete cache"):
        use_cache(images, tmp_path / "cache", 100)
    build_cache([images], tmp_path / "cache", short_side=100)
    with pytest.raises(CacheError, match="short side of 100"):
        use_cache(images, tmp_path / "cache", 200)
    (tmp_path / "cache" / "a" / "1.jpg").unlink()
    with pytest.raises(CacheError, match="lacks 1"):
        use_cache(images, tmp_path / "cache", 100)


def test_a_bad_source_image_leaves_the_cache_unmarked(tmp_path):
    images = make_list(tmp_path / "src", [(300, 300), (300, 300)])
    (tmp_path / "src" / "a" / "1.jpg").write_bytes(b"not a jpeg")
    summary = build_cache([images], tmp_path / "cache", short_side=100)
    assert len(summary["failed"]) == 1 and "1.jpg" in summary["failed"][0]
    assert not (tmp_path / "cache" / MANIFEST).exists()


def test_cache_mode_then_training_reads_the_cache(tmp_path):
    overrides = [f"data.root={tmp_path / 'demo'}", "data.demo_classes=8", "data.demo_images_per_class=4",
                 "data.image_size=32", "data.val_fraction=0.25", "data.classes_per_batch=3", "data.images_per_class=2",
                 "train.epochs=1", f"output.dir={tmp_path / 'run'}", "wandb.mode=disabled",
                 f"data.cache_dir={tmp_path / 'cache'}"]
    config = REPO_ROOT / "configs" / "demo.yaml"
    assert main.main(["--mode", "train", "--config", str(config), *overrides]) == 1  # no cache yet: refused
    assert main.main(["--mode", "cache", "--config", str(config), *overrides]) == 0
    assert (tmp_path / "cache" / MANIFEST).is_file()
    assert len(list((tmp_path / "cache" / "images").rglob("*.jpg"))) == 32
    assert main.main(["--mode", "train", "--config", str(config), *overrides]) == 0
