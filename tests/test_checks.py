"""The data check: planted damage in small image trees is found, named and classified; clean data passes."""

import json
import shutil

import numpy as np
import pytest
from conftest import SHARED_DATA
from PIL import Image, ImageFile

from dataloaders import ImageList, read_folder_tree
from dataloaders.checks import check_image_lists, format_check_report

CUB = SHARED_DATA / "cub100" / "images"


def save_image(path, seed, size=(48, 40)):
    """A noisy RGB image (noise keeps a JPEG's scan data long enough to cut)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def truncate_to_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def list_of(root, labels_by_path):
    paths = sorted(labels_by_path)
    labels = [labels_by_path[p] for p in paths]
    return ImageList(root, paths, np.array(labels), np.zeros(len(paths), dtype=np.int64))


def clean_tree(root):
    """Classes 0 and 1 with 3 JPEGs each, class 2 with 2 PNGs."""
    labels = {}
    for label, suffix, count in ((0, "jpg", 3), (1, "jpg", 3), (2, "png", 2)):
        for i in range(count):
            relative = f"class{label}/{i}.{suffix}"
            save_image(root / relative, seed=10 * label + i)
            labels[relative] = label
    return labels


def damaged_tree(root):
    """clean_tree plus every kind of damage and a class of one image; returns (labels, expected bad)."""
    labels = clean_tree(root)
    labels["class0/missing.jpg"] = 0  # listed, never written
    (root / "class1/empty.jpg").write_bytes(b"")
    labels["class1/empty.jpg"] = 1
    (root / "class2/notes.jpg").write_text("not a picture\n")
    labels["class2/notes.jpg"] = 2
    save_image(root / "class2/cut.jpg", seed=99)
    truncate_to_half(root / "class2/cut.jpg")
    labels["class2/cut.jpg"] = 2
    save_image(root / "class3/only.png", seed=7)
    labels["class3/only.png"] = 3
    expected = {
        "class0/missing.jpg": "missing",
        "class1/empty.jpg": "empty",
        "class2/cut.jpg": "truncated",
        "class2/notes.jpg": "not_an_image",
    }
    return labels, expected


def reasons(split_report):
    return {item["path"]: item["reason"] for item in split_report["bad_images"]}


def test_planted_damage_is_named_with_its_reason_and_the_singleton_class_is_a_warning(tmp_path):
    labels, expected = damaged_tree(tmp_path)
    report = check_image_lists({"train": list_of(tmp_path, labels)})
    json.dumps(report)  # must be serialisable as is

    train = report["splits"]["train"]
    assert reasons(train) == expected
    assert [item["path"] for item in train["bad_images"]] == sorted(expected)
    assert "truncated" in next(i["detail"] for i in train["bad_images"] if i["path"] == "class2/cut.jpg")
    assert report["ok"] is False and report["num_bad_images"] == 4
    assert train["num_images"] == 13 and train["num_classes"] == 4
    # class sizes as listed: 0 -> 4, 1 -> 4, 2 -> 4, 3 -> 1
    assert train["class_size_histogram"] == {"1": 1, "4": 3}
    assert train["classes_with_fewer_than_2_images"] == [3]
    assert len(report["warnings"]) == 1 and "train" in report["warnings"][0]


def test_a_clean_tree_passes_and_the_pool_gives_the_same_report(tmp_path):
    clean = list_of(tmp_path / "clean", clean_tree(tmp_path / "clean"))
    report = check_image_lists({"train": clean, "test": clean})
    assert report["ok"] is True and report["num_bad_images"] == 0 and report["warnings"] == []
    assert report["splits"]["test"]["class_size_histogram"] == {"2": 1, "3": 2}

    labels, expected = damaged_tree(tmp_path / "damaged")
    damaged = {"train": list_of(tmp_path / "damaged", labels), "test": clean}
    in_pool = check_image_lists(damaged, workers=2)
    assert in_pool == check_image_lists(damaged, workers=1)
    assert reasons(in_pool["splits"]["train"]) == expected and in_pool["splits"]["test"]["bad_images"] == []
    assert in_pool["num_bad_images"] == 4


def test_images_over_the_decompression_bomb_limit_are_too_large(tmp_path, monkeypatch):
    save_image(tmp_path / "a/big.png", seed=1, size=(20, 20))  # 400 pixels
    save_image(tmp_path / "a/huge.png", seed=2, size=(40, 40))  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # big: PIL warns (< 2x limit); huge: PIL raises
    report = check_image_lists({"train": list_of(tmp_path, {"a/big.png": 0, "a/huge.png": 0})})
    assert reasons(report["splits"]["train"]) == {"a/big.png": "too_large", "a/huge.png": "too_large"}


def test_refuses_to_run_when_pil_would_accept_truncated_images(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        check_image_lists({"train": list_of(tmp_path, {"a/x.jpg": 0})})


def test_format_lists_counts_histogram_bad_images_and_warnings(tmp_path):
    labels, expected = damaged_tree(tmp_path)
    text = format_check_report(check_image_lists({"train": list_of(tmp_path, labels)}))
    assert "FAILED: 4 bad image(s)" in text
    assert "[train] 13 images, 4 classes" in text
    assert any(line.split() == ["4", "3"] for line in text.splitlines())  # 3 classes of 4 images
    for path, reason in expected.items():
        assert f"{path}  {reason}" in text
    assert "warning: train: 1 class(es) with fewer than 2 images" in text

    many_missing = list_of(tmp_path, {f"gone/{i:03d}.jpg": i % 2 for i in range(57)})
    text = format_check_report(check_image_lists({"test": many_missing}))
    assert "gone/049.jpg" in text and "gone/050.jpg" not in text and "... and 7 more" in text


@pytest.mark.skipif(not CUB.is_dir(), reason="../shared/data/cub100 is not on this machine")
def test_real_photos_pass_and_exactly_the_three_corrupted_copies_are_reported(tmp_path):
    tree = read_folder_tree(CUB)
    # The first 3 images of 10 classes, copied: /work/shared is read-only and must stay untouched.
    chosen = [i for label in range(10) for i in np.flatnonzero(tree.labels == label)[:3].tolist()]
    for i in chosen:
        (tmp_path / tree.paths[i]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tree.root / tree.paths[i], tmp_path / tree.paths[i])
    copies = read_folder_tree(tmp_path)
    assert len(copies) == 30
    assert check_image_lists({"train": copies})["ok"] is True

    cut, emptied, overwritten = copies.paths[1], copies.paths[14], copies.paths[28]
    truncate_to_half(tmp_path / cut)
    (tmp_path / emptied).write_bytes(b"")
    (tmp_path / overwritten).write_bytes(b"<html>404 Not Found</html>\n")
    report = check_image_lists({"train": copies})
    assert report["ok"] is False and report["num_bad_images"] == 3
    assert reasons(report["splits"]["train"]) == {
        cut: "truncated", emptied: "empty", overwritten: "not_an_image",
    }
    assert report["splits"]["train"]["class_size_histogram"] == {"3": 10}


def test_check_mode_reports_planted_damage_with_exit_code_1(tmp_path):
    import json

    import main
    from conftest import REPO_ROOT

    overrides = [f"data.root={tmp_path / 'demo'}", "data.demo_classes=8", "data.demo_images_per_class=4",
                 "data.image_size=32", f"output.dir={tmp_path / 'run'}", "wandb.mode=disabled"]
    config = str(REPO_ROOT / "configs" / "demo.yaml")
    assert main.main(["--mode", "check", "--config", config, *overrides]) == 0
    assert json.loads((tmp_path / "run" / "data_check.json").read_text())["ok"] is True
    (tmp_path / "demo" / "images" / "0002" / "01.jpg").write_bytes(b"")  # a train-class image, emptied
    assert main.main(["--mode", "check", "--config", config, *overrides]) == 1
    report = json.loads((tmp_path / "run" / "data_check.json").read_text())
    bad = [item for split in report["splits"].values() for item in split["bad_images"]]
    assert [(item["path"], item["reason"]) for item in bad] == [("images/0002/01.jpg", "empty")]
