import json

import numpy as np
import pytest
from PIL import Image

from dataloaders.demo_data import ensure_demo_dataset, generate_demo_dataset

HEADER = "image_id class_id super_class_id path"


def read_sop_list(path):
    """Rows of (image_id, class_id, super_class_id, path) after checking the header."""
    lines = path.read_text().splitlines()
    assert lines[0] == HEADER
    rows = [line.split() for line in lines[1:]]
    return [(int(i), int(c), int(s), p) for i, c, s, p in rows]


def load_pixels(root, rows):
    return np.stack([np.asarray(Image.open(root / p), dtype=np.float32) for *_, p in rows])


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "sop_demo"
    generate_demo_dataset(root, num_classes=10, images_per_class=4, image_size=32, seed=0)
    return root


def test_lists_follow_sop_format(small_dataset):
    train = read_sop_list(small_dataset / "Ebay_train.txt")
    test = read_sop_list(small_dataset / "Ebay_test.txt")
    assert len(train) == len(test) == 5 * 4
    for rows in (train, test):
        assert [image_id for image_id, *_ in rows] == list(range(1, len(rows) + 1))
    assert {c for _, c, _, _ in train} == set(range(1, 6))
    assert {c for _, c, _, _ in test} == set(range(6, 11))  # numbered on after train, as in SOP
    assert all(1 <= s <= 8 for _, _, s, _ in train + test)
    assert not (small_dataset.with_name("sop_demo.tmp")).exists()
    params = json.loads((small_dataset / "DONE.json").read_text())
    assert params["num_classes"] == 10 and params["image_size"] == 32


def test_every_listed_image_is_rgb_of_the_right_size(small_dataset):
    rows = read_sop_list(small_dataset / "Ebay_train.txt")
    rows += read_sop_list(small_dataset / "Ebay_test.txt")
    for _, class_id, _, path in rows:
        assert path.startswith(f"images/{class_id:04d}/")
        with Image.open(small_dataset / path) as image:
            assert image.mode == "RGB" and image.size == (32, 32)


def test_images_of_one_class_differ(small_dataset):
    rows = [r for r in read_sop_list(small_dataset / "Ebay_train.txt") if r[1] == 1]
    pixels = load_pixels(small_dataset, rows)  # (4, 32, 32, 3)
    for i in range(len(pixels)):
        for j in range(i + 1, len(pixels)):
            assert np.abs(pixels[i] - pixels[j]).mean() > 5


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        generate_demo_dataset(
            tmp_path / name, num_classes=4, images_per_class=2, image_size=16, seed=seed
        )
    sample = "images/0003/01.jpg"
    a, b, c = ((tmp_path / name / sample).read_bytes() for name in "abc")
    assert a == b and a != c
    assert (tmp_path / "a/Ebay_test.txt").read_text() == (tmp_path / "b/Ebay_test.txt").read_text()


def test_ensure_reuses_then_regenerates_on_new_parameters(tmp_path, capsys):
    root = tmp_path / "sop_demo"
    params = dict(num_classes=4, images_per_class=2, image_size=16, seed=0)
    assert ensure_demo_dataset(root, **params) == root
    assert "generated" in capsys.readouterr().out
    marker_mtime = (root / "DONE.json").stat().st_mtime_ns
    image_mtime = (root / "images/0001/00.jpg").stat().st_mtime_ns

    ensure_demo_dataset(root, **params)
    assert "reusing" in capsys.readouterr().out
    assert (root / "DONE.json").stat().st_mtime_ns == marker_mtime
    assert (root / "images/0001/00.jpg").stat().st_mtime_ns == image_mtime

    ensure_demo_dataset(root, **{**params, "images_per_class": 3})
    assert "generated" in capsys.readouterr().out
    assert len(read_sop_list(root / "Ebay_train.txt")) == 2 * 3
    assert json.loads((root / "DONE.json").read_text())["images_per_class"] == 3


def test_rejects_too_few_classes(tmp_path):
    with pytest.raises(ValueError, match="num_classes"):
        generate_demo_dataset(
            tmp_path / "d", num_classes=1, images_per_class=2, image_size=16, seed=0
        )


def test_colour_histogram_nearest_neighbour_beats_chance(tmp_path):
    """The classes carry signal: a colour histogram retrieves same-class images far above chance."""
    root = tmp_path / "sop_demo"
    generate_demo_dataset(root, num_classes=20, images_per_class=6, image_size=32, seed=0)
    rows = read_sop_list(root / "Ebay_train.txt") + read_sop_list(root / "Ebay_test.txt")
    labels = np.array([c for _, c, _, _ in rows])
    pixels = load_pixels(root, rows).reshape(len(rows), -1, 3)  # (N, H*W, 3)

    # 4 bins per channel -> 64 colours.
    bins = (pixels // 64).astype(np.int64) @ np.array([16, 4, 1])  # (N, H*W)
    histograms = np.stack([np.bincount(b, minlength=64) for b in bins]).astype(np.float64)
    features = np.sqrt(histograms / histograms.sum(1, keepdims=True))  # Hellinger: unit L2
    similarity = features @ features.T
    np.fill_diagonal(similarity, -np.inf)  # exclude each query itself, by index
    recall_at_1 = (labels[similarity.argmax(1)] == labels).mean()

    chance = 5 / (len(rows) - 1)  # five other images of the query's class among N - 1
    assert recall_at_1 > 4 * chance
