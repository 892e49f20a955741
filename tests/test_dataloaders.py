"""Tests for dataloaders/: list parsing, splits, samplers, transforms and the dataset. CPU, seconds."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dataloaders import (
    DataFormatError,
    ImageDataset,
    ImageList,
    PKBatchSampler,
    RandomTripletBatchSampler,
    build_transforms,
    decode_size,
    read_folder_tree,
    read_sop_list,
    split_classes,
    write_sop_list,
)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SOP_SAMPLE = SHARED_DATA / "sop_format_sample"


# ----------------------------------------------------------------------------- SOP lists


@pytest.mark.parametrize(
    "name, num_images, num_classes", [("Ebay_train.txt", 9131, 2051), ("Ebay_test.txt", 9091, 2050)]
)
def test_read_sop_sample(name, num_images, num_classes):
    if not SOP_SAMPLE.is_dir():
        pytest.skip(f"{SOP_SAMPLE} not present")
    images = read_sop_list(SOP_SAMPLE / name, root=SOP_SAMPLE)
    assert len(images) == num_images
    assert images.num_classes == num_classes
    assert images.labels.dtype == np.int64 and images.super_labels.dtype == np.int64
    assert images.labels.min() >= 1  # the file's 1-based class ids are kept
    assert (images.super_labels == 1).all()  # this shop's list has one super class
    first = (SOP_SAMPLE / name).read_text().splitlines()[1].split()
    assert images.paths[0] == first[3] and images.labels[0] == int(first[1])
    assert images.root == SOP_SAMPLE


def test_sop_sample_train_and_test_classes_are_disjoint_and_split():
    if not SOP_SAMPLE.is_dir():
        pytest.skip(f"{SOP_SAMPLE} not present")
    train = read_sop_list(SOP_SAMPLE / "Ebay_train.txt", SOP_SAMPLE)
    test = read_sop_list(SOP_SAMPLE / "Ebay_test.txt", SOP_SAMPLE)
    assert not set(train.labels.tolist()) & set(test.labels.tolist())
    train_idx, val_idx = split_classes(train.labels, 0.2, seed=0)
    assert train.subset(val_idx).num_classes == round(0.2 * 2051)


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD_LINES = ["image_id class_id super_class_id path", "1 1 1 a/0.jpg", "2 1 1 a/1.jpg"]


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ("3 2 1", "expected 4 columns"),
        ("3 2 1 b/0.jpg extra", "expected 4 columns"),
        ("3 two 1 b/0.jpg", "class_id is not an integer"),
        ("3 2.0 1 b/0.jpg", "class_id is not an integer"),
        ("3 0 1 b/0.jpg", "class_id must be >= 1"),
        ("0 2 1 b/0.jpg", "image_id must be >= 1"),
        ("3 2 -1 b/0.jpg", "super_class_id must be >= 1"),
        ("", "expected 4 columns"),  # a blank line before more data is not a trailing blank
    ],
)
def test_malformed_sop_line_names_file_and_line(tmp_path, bad_line, problem):
    list_path = _write_lines(tmp_path / "Ebay_bad.txt", GOOD_LINES + [bad_line, "4 2 1 b/1.jpg"])
    with pytest.raises(DataFormatError) as error:
        read_sop_list(list_path, tmp_path)
    message = str(error.value)
    assert message.startswith(f"{list_path}:4: ")  # header is line 1, the bad line is line 4
    assert problem in message and repr(bad_line) in message
    assert "\n" not in message


def test_sop_list_header_missing_file_and_header_only(tmp_path):
    no_header = _write_lines(tmp_path / "no_header.txt", GOOD_LINES[1:])
    with pytest.raises(DataFormatError, match=r"no_header\.txt:1: expected header"):
        read_sop_list(no_header, tmp_path)
    with pytest.raises(DataFormatError, match=r"missing\.txt: list file not found"):
        read_sop_list(tmp_path / "missing.txt", tmp_path)
    header_only = _write_lines(tmp_path / "header_only.txt", GOOD_LINES[:1])
    with pytest.raises(DataFormatError, match="no images"):
        read_sop_list(header_only, tmp_path)


def test_sop_list_trailing_blank_lines_and_crlf_are_fine(tmp_path):
    list_path = tmp_path / "list.txt"
    list_path.write_bytes(("\r\n".join(GOOD_LINES) + "\r\n\r\n  \n").encode())
    images = read_sop_list(list_path, tmp_path)
    assert images.paths == ("a/0.jpg", "a/1.jpg") and images.labels.tolist() == [1, 1]


def test_write_then_read_sop_list_round_trips(tmp_path):
    paths = ["x/1.jpg", "x/2.jpg", "y/1.JPG"]
    list_path = tmp_path / "sub" / "Ebay_train.txt"
    write_sop_list(list_path, paths, np.array([7, 7, 9]), super_labels=[2, 2, 3])
    images = read_sop_list(list_path, tmp_path)
    assert images.paths == tuple(paths)
    assert images.labels.tolist() == [7, 7, 9] and images.super_labels.tolist() == [2, 2, 3]
    assert list_path.read_text().splitlines()[1] == "1 7 2 x/1.jpg"  # image ids are 1-based
    write_sop_list(list_path, paths[:1], [1])
    assert read_sop_list(list_path, tmp_path).super_labels.tolist() == [1]
    with pytest.raises(ValueError, match="1-based"):
        write_sop_list(list_path, paths[:1], [0])
    with pytest.raises(ValueError, match="whitespace"):
        write_sop_list(list_path, ["a b.jpg"], [1])


def test_image_list_subset_and_validation():
    images = ImageList(Path("r"), ("a", "b", "c"), np.array([5, 6, 5]), np.zeros(3, dtype=np.int64))
    part = images.subset(np.array([2, 0]))
    assert part.paths == ("c", "a") and part.labels.tolist() == [5, 5] and part.num_classes == 1
    assert images.num_classes == 2
    with pytest.raises(ValueError, match="3 paths but 2 labels"):
        ImageList(Path("r"), ("a", "b", "c"), np.array([1, 2]), np.zeros(2, dtype=np.int64))


# ----------------------------------------------------------------------------- folder trees


def _make_tree(root: Path, class_sizes: dict[str, int], size=(20, 16)) -> Path:
    """root/<class>/<i>.png|jpg with a distinct colour per image; alternate PNG and JPEG."""
    for c, (name, count) in enumerate(sorted(class_sizes.items())):
        (root / name).mkdir(parents=True)
        for i in range(count):
            image = Image.new("RGB", size, (40 * c % 256, 30 * i % 256, 100))
            image.save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_read_folder_tree(tmp_path):
    root = _make_tree(tmp_path / "tree", {"b_cat": 2, "a_dog": 3, "c_empty": 0})
    (root / "a_dog" / "notes.txt").write_text("not an image")
    (root / "a_dog" / "UPPER.JPG").write_bytes((root / "a_dog" / "0.jpg").read_bytes())
    (root / "stray.png").write_bytes((root / "a_dog" / "0.jpg").read_bytes())  # not in a class folder
    images = read_folder_tree(root)
    assert images.class_names == ("a_dog", "b_cat")  # sorted; the empty folder is no class
    assert images.paths == (
        "a_dog/0.jpg", "a_dog/1.png", "a_dog/2.jpg", "a_dog/UPPER.JPG", "b_cat/0.jpg", "b_cat/1.png"
    )
    assert images.labels.tolist() == [0, 0, 0, 0, 1, 1] and images.num_classes == 2
    assert (images.super_labels == 0).all()


def test_read_folder_tree_errors(tmp_path):
    with pytest.raises(DataFormatError, match="not found"):
        read_folder_tree(tmp_path / "absent")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataFormatError, match="no class folders with images"):
        read_folder_tree(tmp_path)


# ----------------------------------------------------------------------------- splits


def test_split_classes_is_class_disjoint_complete_and_deterministic():
    labels = np.repeat(np.arange(50), np.arange(50) % 5 + 1)
    train, val = split_classes(labels, 0.2, seed=3)
    assert not set(labels[train]) & set(labels[val])
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(labels.size))
    assert len(set(labels[val])) == 10
    again = split_classes(labels, 0.2, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, split_classes(labels, 0.2, seed=4)[1])


def test_split_classes_sop_reference_count_and_edges():
    labels = np.arange(11318)
    assert split_classes(labels, 0.2048, seed=0)[1].size == 2318
    train, val = split_classes(labels, 0.0, seed=0)
    assert train.size == labels.size and val.size == 0
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            split_classes(labels, bad, seed=0)
    with pytest.raises(ValueError, match="at least one class"):
        split_classes(np.array([0, 0, 1]), 0.1, seed=0)  # rounds to 0 validation classes


# ----------------------------------------------------------------------------- PK sampler


def _batches(sampler) -> list[list[int]]:
    return [list(b) for b in sampler]


def _assert_pk_layout(batch, labels, P, K):
    block = labels[np.array(batch)].reshape(P, K)
    assert (block == block[:, :1]).all(), "K consecutive indices must share a class"
    assert len(set(block[:, 0])) == P, "a batch needs P distinct classes"


def test_pk_batches_have_p_classes_of_k_and_cover_every_item():
    labels = np.repeat(np.arange(12), [4, 8, 4, 8, 8, 4, 4, 8, 4, 8, 4, 8])  # 18 chunks of K=4
    P, K = 3, 4
    sampler = PKBatchSampler(labels, P, K, seed=0)
    assert len(sampler) == 18 // P
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = _batches(sampler)
        assert len(batches) == len(sampler)
        for batch in batches:
            _assert_pk_layout(batch, labels, P, K)
        seen = np.concatenate(batches)
        assert np.array_equal(np.sort(seen), np.arange(labels.size)), "each item exactly once"


def test_pk_uneven_classes_every_item_at_least_once_len_constant():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(40), rng.integers(2, 11, size=40))
    P, K = 4, 3
    total_chunks = sum(-(-n // K) for n in np.bincount(labels))
    labels = np.concatenate([labels, np.full((P - total_chunks % P) % P * K, 99)])  # make chunks % P == 0
    sampler = PKBatchSampler(labels, P, K, seed=1)
    lengths = set()
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = _batches(sampler)
        lengths.add(len(batches))
        for batch in batches:
            _assert_pk_layout(batch, labels, P, K)
        assert set(np.concatenate(batches)) == set(range(labels.size))
    assert lengths == {len(sampler)}


def test_pk_len_is_floor_of_chunks_and_layout_holds_with_leftovers():
    labels = np.repeat(np.arange(7), [2, 3, 5, 9, 2, 4, 6])  # K=2: 1+2+3+5+1+2+3 = 17 chunks
    sampler = PKBatchSampler(labels, 3, 2, seed=0)
    assert len(sampler) == 17 // 3
    for epoch in range(5):
        sampler.set_epoch(epoch)
        for batch in sampler:
            _assert_pk_layout(batch, labels, 3, 2)


def test_pk_dominant_class_still_gives_distinct_classes():
    labels = np.repeat(np.arange(3), [40, 2, 2])  # class 0 has more chunks than there are batches
    sampler = PKBatchSampler(labels, 2, 2, seed=0)
    assert len(sampler) == 22 // 2
    for batch in sampler:
        _assert_pk_layout(batch, labels, 2, 2)


def test_pk_small_classes_repeat_their_own_items_and_singletons_are_excluded():
    labels = np.repeat(np.arange(6), [1, 2, 3, 5, 1, 2])  # K=4: classes 1, 2, 5 are short
    sampler = PKBatchSampler(labels, 2, 4, seed=0)
    assert sampler.num_excluded_classes == 2
    singletons = {0, 11}  # the items of classes 0 and 4
    for epoch in range(10):
        sampler.set_epoch(epoch)
        for batch in sampler:
            _assert_pk_layout(batch, labels, 2, 4)
            assert not singletons & set(batch)
            for chunk in np.array(batch).reshape(2, 4):
                n = np.sum(labels == labels[chunk[0]])
                assert len(set(chunk)) == min(n, 4)  # repeats only when the class is smaller than K
                counts = np.bincount(chunk)[np.unique(chunk)]
                assert counts.max() - counts.min() <= 1  # repeats spread evenly (a b b a, not a a a b)


def test_pk_plan_is_reproducible_and_changes_with_epoch():
    labels = np.repeat(np.arange(30), 5)
    a, b = PKBatchSampler(labels, 4, 2, seed=7), PKBatchSampler(labels, 4, 2, seed=7)
    a.set_epoch(2)
    b.set_epoch(2)
    assert _batches(a) == _batches(b)
    assert _batches(a) == _batches(a)  # iterating twice gives the same plan until set_epoch
    b.set_epoch(3)
    assert _batches(a) != _batches(b)
    other_seed = PKBatchSampler(labels, 4, 2, seed=8)
    other_seed.set_epoch(2)
    assert _batches(a) != _batches(other_seed)


def test_pk_set_start_batch_skips_until_the_next_epoch():
    labels = np.repeat(np.arange(30), 5)
    sampler = PKBatchSampler(labels, 4, 2, seed=0)
    sampler.set_epoch(1)
    full = _batches(sampler)
    sampler.set_start_batch(5)
    assert _batches(sampler) == full[5:]
    assert _batches(sampler) == full[5:]  # DataLoader workers call iter() twice: the skip must survive that
    sampler.set_epoch(1)
    assert _batches(sampler) == full  # a new set_epoch starts the epoch from its first batch
    sampler.set_start_batch(len(sampler))
    assert _batches(sampler) == []
    with pytest.raises(ValueError, match="start batch"):
        sampler.set_start_batch(len(sampler) + 1)


@pytest.mark.parametrize(
    "labels, P, K, message",
    [
        (np.repeat(np.arange(5), 3), 1, 2, r"classes_per_batch \(P\) must be >= 2"),
        (np.repeat(np.arange(5), 3), 2, 1, r"images_per_class \(K\) must be >= 2"),
        (np.array([0, 0, 1, 1, 2, 3, 4]), 3, 2, r"only 2 classes have >= 2 images \(3 single-image"),
        (np.array([0.5, 1.5]), 2, 2, "integer"),
    ],
)
def test_pk_impossible_settings_raise_clear_errors(labels, P, K, message):
    with pytest.raises(ValueError, match=message):
        PKBatchSampler(labels, P, K, seed=0)


# ----------------------------------------------------------------------------- triplet sampler


def test_random_triplet_batches_are_valid_and_cover_anchors():
    labels = np.repeat(np.arange(9), [1, 2, 3, 4, 5, 2, 1, 6, 3])
    T = 4
    sampler = RandomTripletBatchSampler(labels, T, seed=0)
    num_anchors = labels.size - 2
    assert len(sampler) == num_anchors // T and sampler.num_excluded_classes == 2
    anchors = []
    for batch in sampler:
        assert len(batch) == 3 * T
        a, p, n = np.array(batch).reshape(3, T)
        assert (labels[a] == labels[p]).all() and (a != p).all()
        assert (labels[a] != labels[n]).all()
        anchors += a.tolist()
    assert len(set(anchors)) == len(anchors) == len(sampler) * T  # each anchor once
    assert not {0, 17} & set(anchors)  # single-image classes are never anchors
    sampler.set_epoch(1)
    first = _batches(sampler)
    sampler.set_start_batch(2)
    assert _batches(sampler) == first[2:]
    with pytest.raises(ValueError, match="only 2 images"):
        RandomTripletBatchSampler(np.array([0, 0, 1]), 3, seed=0)


# ----------------------------------------------------------------------------- dataset + transforms


def test_shuffle_batches_are_a_pure_function_of_seed_and_epoch_each_image_at_most_once():
    from dataloaders.samplers import ShuffleBatchSampler

    sampler = ShuffleBatchSampler(num_items=23, batch_size=5, seed=3)
    assert len(sampler) == 4
    plans = [sampler.epoch_plan(epoch) for epoch in (0, 0, 1)]
    assert np.array_equal(plans[0], plans[1]) and not np.array_equal(plans[0], plans[2])
    assert plans[0].shape == (4, 5) and len(np.unique(plans[0])) == 20 and plans[0].max() < 23
    sampler.set_epoch(1)
    sampler.set_start_batch(2)
    assert _batches(sampler) == plans[2][2:].tolist()
    assert sampler.repeat_rates(0) == {"repeated_slots": 0.0, "repeated_slots_within_batch": 0.0,
                                       "batches_with_a_repeat": 0.0}
    with pytest.raises(ValueError, match="no whole batch"):
        ShuffleBatchSampler(num_items=4, batch_size=5, seed=0)


def test_plan_repeat_rates_count_repeats_in_the_epoch_and_within_batches():
    from dataloaders.samplers import plan_repeat_rates

    plan = np.array([[0, 1, 2, 2],   # 2 twice in this batch: 1 slot repeated within the batch
                     [3, 4, 0, 5],   # 0 seen in batch 0: repeated in the epoch, not within the batch
                     [6, 7, 8, 9]])
    assert plan_repeat_rates(plan) == pytest.approx({"repeated_slots": 2 / 12, "repeated_slots_within_batch": 1 / 12,
                                                     "batches_with_a_repeat": 1 / 3})


def test_pk_repeat_rates_on_the_real_sop_format_sample():
    """Issue 14's measurement: epoch 0 of P=32, K=4 on the sample's class sizes repeats 23% of the slots."""
    if not SOP_SAMPLE.is_dir():
        pytest.skip(f"{SOP_SAMPLE} not present")
    labels = read_sop_list(SOP_SAMPLE / "Ebay_train.txt", root=SOP_SAMPLE).labels
    rates = PKBatchSampler(labels, 32, 4, seed=0).repeat_rates(0)
    assert rates["repeated_slots"] == pytest.approx(0.23, abs=0.01)
    assert rates["repeated_slots_within_batch"] == pytest.approx(0.055, abs=0.005)


def test_image_dataset_with_train_and_eval_transforms(tmp_path):
    images = read_folder_tree(_make_tree(tmp_path / "tree", {"a": 3, "b": 2, "c": 2}, size=(40, 24)))
    for train in (True, False):
        dataset = ImageDataset(images, build_transforms(32, train=train))
        image, label, index = dataset[4]
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
        assert label == 1 and index == 4


def test_eval_transform_is_deterministic_and_keeps_uint8_pixels(tmp_path):
    image = Image.new("RGB", (50, 30), (255, 0, 0))
    transform = build_transforms(16, train=False)
    out = transform(image)
    assert torch.equal(out, transform(image))
    assert out[:, 8, 8].tolist() == [255, 0, 0]  # normalisation happens on the device, in the model


def test_decode_size_keeps_enough_pixels():
    assert decode_size(256, train=False) == 292
    # the smallest training crop (16% of the area) at aspect ratio 3/4 has a short side of
    # sqrt(0.16 * 0.75) = 34.6% of the side, which must still reach 256 px: 256 / 0.3464 = 739.01 -> 740
    assert decode_size(256, train=True, min_crop_scale=0.16) == 740


def test_reduced_jpeg_decoding_keeps_the_requested_short_side(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (800, 600), (10, 20, 30)).save(tmp_path / "a" / "0.jpg", quality=90)
    Image.new("RGB", (800, 600), (10, 20, 30)).save(tmp_path / "a" / "1.png")
    images = read_folder_tree(tmp_path)
    dataset = ImageDataset(images, transform=lambda picture: picture, decode_size=140)
    jpeg, png = dataset[0][0], dataset[1][0]
    assert jpeg.shape == (3, 150, 200)  # decoded at 1/4 scale: the largest reduction with a short side >= 140
    assert png.shape == (3, 600, 800)  # other formats decode at full size


def test_exif_rotated_photo_comes_upright(tmp_path):
    (tmp_path / "a").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: stored sideways, viewers rotate 90 degrees clockwise
    Image.new("RGB", (30, 10), (0, 200, 0)).save(tmp_path / "a" / "0.jpg", exif=exif)
    dataset = ImageDataset(read_folder_tree(tmp_path), transform=lambda picture: picture)
    image, _, _ = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 10)


def test_dataloader_with_pk_batch_sampler(tmp_path):
    images = read_folder_tree(_make_tree(tmp_path / "tree", {"a": 2, "b": 3, "c": 2, "d": 1}))
    dataset = ImageDataset(images, build_transforms(16, train=True))
    sampler = PKBatchSampler(images.labels, 2, 2, seed=0)
    batches = list(DataLoader(dataset, batch_sampler=sampler))
    assert len(batches) == len(sampler)
    pixels, labels, indices = batches[0]
    assert pixels.shape == (4, 3, 16, 16)
    assert torch.equal(labels, torch.as_tensor(images.labels[indices.numpy()]))
