"""Bad and unusual images, in training and evaluation: handled, skipped (counted, listed) or stopped, by file name.

Every image here is written by the test in a temporary folder; colours encode the class, so a test can
see that an image arrived with its own label.
"""

import io
import json
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import main
from conftest import REPO_ROOT
from dataloaders import (BadImageError, ImageDataset, SkippedImage, build_transforms, collate_skipping_bad_images,
                         load_rgb_image, read_folder_tree)
from dataloaders.image_files import load_rgb_tensor

CLASS_COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40), (200, 40, 210), (40, 210, 220)]
EXIF_ORIENTATION = 0x0112


def class_picture(label, seed, size=(40, 32)):
    """The class colour with mild noise (the noise keeps JPEG scan data long enough to truncate)."""
    noise = np.random.default_rng(seed).integers(-12, 13, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.array(CLASS_COLOURS[label]) + noise, 0, 255).astype(np.uint8))


def write_tree(root, num_classes=6, per_class=4, first_label=0):
    """root/c<label>/<i>.jpg class pictures; returns {relative path: label}."""
    labels = {}
    for label in range(first_label, first_label + num_classes):
        for i in range(per_class):
            path = root / f"c{label}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            class_picture(label, seed=100 * label + i).save(path, quality=95)
            labels[path.relative_to(root).as_posix()] = label
    return labels


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_png_bomb(path, width=20_000, height=20_000):
    """A real PNG whose header declares width x height pixels (far beyond PIL's limit); a few hundred bytes."""
    buffer = io.BytesIO()
    Image.new("1", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = bytearray(data[16:29])  # after the 8-byte signature, the IHDR length and type
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    path.write_bytes(bytes(data))


def mean_colour(image_tensor):
    return image_tensor.float().mean(dim=(1, 2)).numpy()


def nearest_class(image_tensor):
    distances = np.linalg.norm(np.array(CLASS_COLOURS) - mean_colour(image_tensor), axis=1)
    return int(np.argmin(distances))


# ---- unusual but valid images are converted, the way a viewer shows them ---------------------------
def test_cmyk_jpeg_becomes_the_same_rgb(tmp_path):
    class_picture(0, seed=1).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    image = load_rgb_image(tmp_path / "cmyk.jpg", draft_size=16)  # draft as in training
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image).reshape(-1, 3).mean(0) - CLASS_COLOURS[0]).max() < 12


def test_16_bit_grey_keeps_its_tones_instead_of_turning_white(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (8, 1))  # black to white, 16 bits
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    pixels = np.asarray(load_rgb_image(tmp_path / "grey16.png")).astype(int)
    expected = np.rint(ramp.astype(float) * 255 / 65535).astype(int)
    assert np.abs(pixels[..., 0] - expected).max() <= 1
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()


def test_transparent_pixels_show_white_for_rgba_la_and_palette(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (200, 20, 20, 255)  # left half opaque red, right half fully transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., [0, 3]], "LA").save(tmp_path / "la.png")
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 20, 20] + [0] * 762)
    palette.paste(0, (4, 0, 8, 8))  # right half: palette entry 0, declared transparent
    palette.save(tmp_path / "palette.png", transparency=0)
    for name, left in (("rgba.png", (200, 20, 20)), ("la.png", (200, 200, 200)), ("palette.png", (200, 20, 20))):
        pixels = np.asarray(load_rgb_image(tmp_path / name))
        assert (pixels[:, :4] == left).all(), name
        assert (pixels[:, 4:] == 255).all(), name


def test_exif_rotated_photo_is_upright(tmp_path):
    stored = np.zeros((30, 60, 3), dtype=np.uint8)
    stored[:, :30] = (220, 30, 30)  # left half red
    stored[:, 30:] = (40, 60, 220)  # right half blue
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to display" (a phone held upright)
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    shown = np.asarray(load_rgb_image(tmp_path / "rotated.jpg")).astype(int)
    expected = np.rot90(stored, k=-1).astype(int)  # clockwise: the stored left half is now on top
    assert shown.shape == expected.shape == (60, 30, 3)
    away_from_the_edge = np.r_[0:24, 36:60]  # JPEG blurs the red/blue edge at row 30
    assert np.abs(shown - expected)[away_from_the_edge].max() < 40


def test_grey_and_one_bit_images_become_three_equal_channels(tmp_path):
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) * 4, "L").save(tmp_path / "grey.png")
    Image.new("1", (8, 8), 1).save(tmp_path / "bits.png")
    for name in ("grey.png", "bits.png"):
        pixels = np.asarray(load_rgb_image(tmp_path / name))
        assert pixels.shape == (8, 8, 3)
        assert (pixels[..., 0] == pixels[..., 2]).all()
    assert (np.asarray(load_rgb_image(tmp_path / "bits.png")) == 255).all()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_the_fast_jpeg_decoder_gives_the_picture_pil_gives(tmp_path, orientation, mode):
    """Items decode full-size JPEGs with torchvision (load_rgb_tensor); the data check and the cache use PIL
    (load_rgb_image). Same orientation and size; pixels within JPEG decoders' rounding."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    picture = class_picture(orientation % 6, seed=orientation, size=(48, 32))
    picture.paste((250, 250, 250), (0, 0, 12, 8))  # a marker in one corner: a wrong rotation moves it
    picture.convert(mode).save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    fast = load_rgb_tensor(tmp_path / "photo.jpg").permute(1, 2, 0).numpy().astype(int)
    reference = np.asarray(load_rgb_image(tmp_path / "photo.jpg")).astype(int)
    assert fast.shape == reference.shape == ((48, 32, 3) if orientation >= 5 else (32, 48, 3))
    assert np.abs(fast - reference).mean() < 2 and np.abs(fast - reference).max() <= 40


def test_the_fast_decoder_is_skipped_where_a_draft_decode_is_cheaper(tmp_path):
    class_picture(1, seed=3, size=(400, 300)).save(tmp_path / "big.jpg", quality=95)
    assert load_rgb_tensor(tmp_path / "big.jpg", draft_size=100).shape == (3, 150, 200)  # PIL's 1/2-scale decode
    assert load_rgb_tensor(tmp_path / "big.jpg", draft_size=200).shape == (3, 300, 400)  # full size


# ---- bad images: skipped with the reason, or stopped naming the file ---------------------------------
def damaged_list(tmp_path):
    """A 6-class tree where items 2 (truncated), 5 (zero bytes), 9 (decompression bomb) and 13 (text) are bad."""
    write_tree(tmp_path)
    image_list = read_folder_tree(tmp_path)
    root = image_list.root
    truncate(root / image_list.paths[2])
    (root / image_list.paths[5]).write_bytes(b"")
    write_png_bomb(root / image_list.paths[9])
    (root / image_list.paths[13]).write_text("a text file with a .jpg name\n")
    return image_list, {2: "truncated", 5: "empty", 9: "too_large", 13: "not_an_image"}


def test_skipped_images_never_shift_labels_and_are_reported_with_their_reason(tmp_path):
    image_list, bad = damaged_list(tmp_path)
    dataset = ImageDataset(image_list, build_transforms(24, train=True, min_crop_scale=0.5), skip_bad_images=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, shuffle=False, collate_fn=collate_skipping_bad_images)
    seen, skipped = [], []
    for images, labels, indices, batch_skipped in loader:
        assert len(images) == len(labels) == len(indices)
        for image, label, index in zip(images, labels.tolist(), indices.tolist()):
            assert label == image_list.labels[index]
            assert nearest_class(image) == label  # the picture itself belongs to the label it travels with
            seen.append(index)
        skipped += batch_skipped
    assert {index: reason for index, reason, _ in skipped} == bad
    assert sorted(seen) == sorted(set(range(len(image_list))) - set(bad))


def test_without_skipping_a_bad_image_raises_naming_the_file_and_the_reason(tmp_path):
    image_list, bad = damaged_list(tmp_path)
    dataset = ImageDataset(image_list, build_transforms(24, train=False))
    for index, reason in bad.items():
        with pytest.raises(BadImageError) as raised:
            dataset[index]
        assert str(image_list.root / image_list.paths[index]) in str(raised.value)
        assert reason in str(raised.value)
    assert isinstance(ImageDataset(image_list, lambda picture: picture, skip_bad_images=True)[9][0], SkippedImage)


def test_a_batch_of_only_bad_images_collates_to_nothing_but_the_report():
    items = [(SkippedImage("empty", "0 bytes"), 3, 7), (SkippedImage("missing", "gone"), 1, 8)]
    images, labels, indices, skipped = collate_skipping_bad_images(items)
    assert images is None and len(labels) == len(indices) == 0
    assert skipped == [(7, "empty", "0 bytes"), (8, "missing", "gone")]


# ---- through the CLI: training and evaluation ------------------------------------------------------
def folder_run(tmp_path, *extra):
    """A folder-format run: 6 training classes, 4 test classes, tiny model on the CPU."""
    return ["--config", REPO_ROOT / "configs/demo.yaml", "data.format=folder", f"data.root={tmp_path / 'train'}",
            f"data.test_root={tmp_path / 'test'}", "data.image_size=32", "data.val_fraction=0.34",
            "data.classes_per_batch=2", "data.images_per_class=2", "train.epochs=1", f"output.dir={tmp_path / 'run'}",
            "wandb.mode=disabled", "eval.recall_ks=[1,2]", "eval.map_ks=[]", *extra]


def run_cli(*argv):
    return main.main([str(a) for a in argv])


@pytest.fixture
def folders(tmp_path):
    write_tree(tmp_path / "train", num_classes=6)
    write_tree(tmp_path / "test", num_classes=4, first_label=2)
    return tmp_path


@pytest.fixture(scope="module")
def trained_folders(tmp_path_factory):
    """`folders` after one clean training run (`folder_run`), made once for the module: copy it before use."""
    root = tmp_path_factory.mktemp("trained_folders")
    write_tree(root / "train", num_classes=6)
    write_tree(root / "test", num_classes=4, first_label=2)
    assert run_cli("--mode", "train", *folder_run(root)) == 0
    return root


@pytest.fixture
def trained_copy(trained_folders, tmp_path):
    """A private copy of `trained_folders` (images and run folder), free to damage and to write into."""
    shutil.copytree(trained_folders, tmp_path, dirs_exist_ok=True)
    return tmp_path


def test_training_runs_on_every_kind_of_unusual_valid_image_and_skips_only_the_bad_ones(folders, capsys):
    """CMYK, 16-bit grey, palette with transparency, RGBA, EXIF-rotated and LA images train like any other; with
    data.on_bad_image=skip the startup check leaves out exactly the two planted bad files, and lists them."""
    train = folders / "train"
    class_picture(0, seed=7).convert("CMYK").save(train / "c0/1.jpg")
    grey16 = (np.asarray(class_picture(1, seed=8).convert("L")).astype(np.uint16) * 257)
    (train / "c1/1.jpg").unlink()
    Image.fromarray(grey16).save(train / "c1/1.png")
    class_picture(2, seed=9).convert("P", palette=Image.Palette.ADAPTIVE).save(train / "c2/1.png", transparency=0)
    (train / "c2/1.jpg").unlink()
    class_picture(3, seed=10).convert("RGBA").save(train / "c3/1.png")
    (train / "c3/1.jpg").unlink()
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 8
    class_picture(4, seed=11).save(train / "c4/1.jpg", exif=exif.tobytes())
    class_picture(5, seed=12).convert("LA").save(train / "c5/1.png")
    (train / "c5/1.jpg").unlink()
    truncate(folders / "train/c3/2.jpg")
    (folders / "train/c0/0.jpg").write_bytes(b"")
    assert run_cli("--mode", "train", *folder_run(folders, "data.on_bad_image=skip")) == 0
    out = capsys.readouterr().out
    assert "24 images, 2 bad" in out  # the full startup check decoded every one of them
    assert "skipping 2 unreadable image(s)" in out
    assert (folders / "run" / "best.pt").is_file()
    lines = (folders / "run" / "skipped_images.jsonl").read_text().splitlines()
    entries = sorted((entry["path"], entry["reason"], entry["when"]) for entry in map(json.loads, lines))
    # no unusual image among them, neither at the startup check nor later in the loader
    assert entries == [("c0/0.jpg", "empty", "startup check"), ("c3/2.jpg", "truncated", "startup check")]


def test_startup_check_stops_training_before_the_model_naming_the_file(folders, capsys):
    truncate(folders / "train/c3/2.jpg")
    assert run_cli("--mode", "train", *folder_run(folders)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "c3/2.jpg: truncated" in err and "data.on_bad_image=skip" in err
    report = json.loads((folders / "run" / "data_check.json").read_text())
    bad = [item for split in report["splits"].values() for item in split["bad_images"]]
    assert [(item["path"], item["reason"]) for item in bad] == [("c3/2.jpg", "truncated")]
    assert not (folders / "run" / "last.pt").exists()


def an_image_going_bad_mid_training_is_skipped_or_stops_the_run(folders, capsys, workers):
    """startup_check=none: the loader itself meets the bad file (in a worker process with workers=1)."""
    truncate(folders / "train/c1/3.jpg")
    common = ("data.startup_check=none", f"data.num_workers={workers}")
    assert run_cli("--mode", "train", *folder_run(folders, *common)) == 1
    err = capsys.readouterr().err  # tqdm's progress bar, then the one error line
    assert "Traceback" not in err and err.endswith("\n") and "\n" not in err.split("error: ", 1)[1][:-1]
    assert f"{folders / 'train/c1/3.jpg'}: truncated" in err

    assert run_cli("--mode", "train", "--overwrite", *folder_run(folders, *common, "data.on_bad_image=skip")) == 0
    lines = (folders / "run" / "skipped_images.jsonl").read_text().splitlines()
    assert [(e["split"], e["path"], e["reason"]) for e in map(json.loads, lines)] == [("train", "c1/3.jpg", "truncated")]
    assert json.loads(lines[0])["when"] == "epoch 1"  # met by the loader, listed once however often it comes up


def test_an_image_going_bad_mid_training_in_a_loader_worker_is_skipped_or_stops_the_run(folders, capsys):
    an_image_going_bad_mid_training_is_skipped_or_stops_the_run(folders, capsys, workers=1)
    # (workers=0: test_an_image_going_bad_mid_training_is_skipped_then_resume_keeps_one_skip_entry_per_image)


def test_eval_with_skip_states_how_many_images_were_evaluated(trained_copy, capsys):
    folders = trained_copy
    (folders / "test/c3/1.jpg").write_text("not an image")
    assert run_cli("--mode", "eval", *folder_run(folders)) == 1
    assert f"{folders / 'test/c3/1.jpg'}: not_an_image" in capsys.readouterr().err

    assert run_cli("--mode", "eval", *folder_run(folders, "data.on_bad_image=skip")) == 0
    assert "1 of 16 test images could not be read" in capsys.readouterr().err
    run = folders / "run"
    report = json.loads((run / "report.json").read_text())
    assert (report["num_images_listed"], report["num_images_skipped"], report["num_items"]) == (16, 1, 15)
    paths = (run / "test_paths.txt").read_text().splitlines()
    assert len(paths) == 15 and "c3/1.jpg" not in paths
    labels = np.load(run / "test_labels.npy")
    assert np.load(run / "test_embeddings.npy").shape[0] == len(labels) == 15
    test_list = read_folder_tree(folders / "test")
    label_by_path = dict(zip(test_list.paths, test_list.labels.tolist()))
    assert labels.tolist() == [label_by_path[path] for path in paths]  # rows, labels and paths still line up
    skipped = [json.loads(line) for line in (run / "skipped_images.jsonl").read_text().splitlines()]
    assert [(e["split"], e["path"], e["reason"]) for e in skipped] == [("test", "c3/1.jpg", "not_an_image")]


@pytest.mark.parametrize("kept", [[], [0], [0, -1]])  # none, one, and two images of different classes
def test_eval_with_no_query_left_after_skipping_stops_in_one_line(folders, capsys, kept):
    test_images = sorted((folders / "test").rglob("*.jpg"))
    readable = {test_images[i] for i in kept}
    assert len({path.parent for path in readable}) == len(readable)
    for path in set(test_images) - readable:
        path.write_bytes(b"")
    code = run_cli("--mode", "eval", "--checkpoint", "none", *folder_run(folders, "data.on_bad_image=skip"))
    error = capsys.readouterr().err
    assert code == 1 and "Traceback" not in error
    assert f"test: only {len(readable)} of {len(test_images)} images could be read" in error
    assert "no class has two of them" in error
    skipped = (folders / "run" / "skipped_images.jsonl").read_text().splitlines()
    assert len(skipped) == len(test_images) - len(readable)  # the list the message points to is complete
    assert not (folders / "run" / "untrained_report.json").exists()


def test_eval_warns_when_skipping_leaves_a_k_beyond_the_gallery(folders, capsys):
    test_images = sorted((folders / "test").rglob("*.jpg"))
    for path in test_images[3:]:
        path.write_bytes(b"")  # 3 of 16 readable: the first class's images, a gallery of 2 per query
    code = run_cli("--mode", "eval", "--checkpoint", "none",
                   *folder_run(folders, "data.on_bad_image=skip", "eval.recall_ks=[1,2,4,8]"))
    error = capsys.readouterr().err
    assert code == 0
    assert "k = 4, 8 now reach past the 2 other images" in error


def test_eval_of_a_test_split_without_two_images_of_any_class_stops_in_one_line(tmp_path, capsys):
    write_tree(tmp_path / "train", num_classes=6)
    write_tree(tmp_path / "test", num_classes=4, first_label=2)
    for class_folder in (tmp_path / "test").iterdir():
        for extra in sorted(class_folder.glob("*.jpg"))[1:]:
            extra.unlink()
    code = run_cli("--mode", "eval", "--checkpoint", "none", *folder_run(tmp_path, "eval.recall_ks=[1]"))
    error = capsys.readouterr().err
    assert code == 1 and "Traceback" not in error
    assert "test: no class has two of its 4 images" in error


def test_validation_with_no_readable_image_stops_training_in_one_line(folders, capsys):
    from config import load_config
    from dataloaders import split_classes

    config = load_config(REPO_ROOT / "configs/demo.yaml", [])
    train = read_folder_tree(folders / "train")
    _, validation_items = split_classes(train.labels, 0.34, config.data.split_seed)
    for index in validation_items:
        (train.root / train.paths[index]).write_bytes(b"")
    code = run_cli("--mode", "train", *folder_run(folders, "data.on_bad_image=skip", "data.startup_check=none"))
    error = capsys.readouterr().err
    assert code == 1 and "Traceback" not in error
    assert f"validation: only 0 of {len(validation_items)} images could be read" in error
    assert (folders / "run" / "skipped_images.jsonl").read_text().count("\n") == len(validation_items)


# ---- configuration problems: one line, non-zero, before heavy work --------------------------------
@pytest.mark.parametrize("override, words", [
    ("data.classes_per_batch=6", ["data.classes_per_batch x data.images_per_class = 24", "16 images"]),
    ("train.lr=-0.1", ["train.lr", "positive"]),
    ("model.embedding_dim=-1", ["model.embedding_dim"]),
    ("data.images_per_class=1", ["data.images_per_class", "at least 2"]),
    ("data.on_bad_image=ignore", ["data.on_bad_image", "skip"]),
])
def test_config_problems_are_one_line_exit_2_before_any_model(folders, capsys, override, words):
    assert run_cli("--mode", "train", *folder_run(folders, "data.images_per_class=4", override)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    for word in words:
        assert word in err
    assert not (folders / "run" / "config.yaml").exists()


def test_k_larger_than_the_gallery_is_refused_before_the_model_loads(folders, capsys):
    code = run_cli("--mode", "eval", "--checkpoint", "none", *folder_run(folders, "eval.recall_ks=[1,10,100]"))
    assert code == 2
    err = capsys.readouterr().err
    assert "k = 100" in err and "16 images" in err and "eval.recall_ks=[1,10]" in err
    assert not (folders / "run" / "untrained_report.json").exists()


def test_an_output_folder_that_cannot_be_written_is_refused_at_once(folders, capsys):
    (folders / "a_file").write_text("")
    for mode in ("train", "eval", "check"):
        code = run_cli("--mode", mode, *folder_run(folders, f"output.dir={folders / 'a_file' / 'run'}"))
        assert code == 2, mode
        err = capsys.readouterr().err
        assert "output.dir" in err and "a_file" in err and "Traceback" not in err, mode


def test_a_real_process_with_loader_workers_exits_after_a_bad_image(folders):
    """Workers ignore SIGTERM, so workers left running would make the interpreter wait at exit forever."""
    import subprocess
    import sys

    truncate(folders / "train/c1/3.jpg")
    arguments = [str(a) for a in folder_run(folders, "data.startup_check=none", "data.num_workers=2")]
    finished = subprocess.run([sys.executable, "main.py", "--mode", "train", *arguments], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300)
    assert finished.returncode == 1
    assert finished.stderr.strip().splitlines()[-1].startswith(f"error: unreadable image {folders / 'train/c1/3.jpg'}")


# ---- follow-ups from review: resume, torn logs, header checks, depth, machine errors -----------------
def test_an_image_going_bad_mid_training_is_skipped_then_resume_keeps_one_skip_entry_per_image(folders, capsys):
    """In the main process (workers=0): the bad file stops the run, or with skip is listed once; a resume lists it
    no second time, a resume whose startup check would drop it is refused, and --overwrite starts the log afresh."""
    an_image_going_bad_mid_training_is_skipped_or_stops_the_run(folders, capsys, workers=0)
    skip = ("data.on_bad_image=skip", "data.startup_check=none")
    assert run_cli("--mode", "train", "--resume", *folder_run(folders, *skip, "train.epochs=2")) == 0
    log = folders / "run" / "skipped_images.jsonl"
    assert [json.loads(line)["when"] for line in log.read_text().splitlines()] == ["epoch 1"]  # met again in epoch 2

    # With the full startup check the bad image leaves the list, so the epoch plan would change: refused.
    before = (folders / "run" / "last.pt").read_bytes()
    code = run_cli("--mode", "train", "--resume", *folder_run(folders, "data.on_bad_image=skip", "train.epochs=3"))
    assert code == 2
    assert "training list differs" in capsys.readouterr().err
    assert (folders / "run" / "last.pt").read_bytes() == before

    assert run_cli("--mode", "train", "--overwrite", *folder_run(folders, "data.on_bad_image=skip")) == 0
    assert [json.loads(line)["when"] for line in log.read_text().splitlines()] == ["startup check"]


def test_a_torn_last_line_of_the_skip_log_is_neither_fatal_nor_glued_to_the_next(tmp_path):
    from dataloaders import ImageList, SkippedImageLog

    images = ImageList(tmp_path, ("a.jpg", "b.jpg"), np.array([0, 1]), np.zeros(2, dtype=np.int64))
    log_path = tmp_path / "skipped_images.jsonl"
    log_path.write_text(json.dumps({"split": "train", "path": "a.jpg", "reason": "empty", "detail": "", "when": "x"})
                        + '\n{"split": "train", "path": "b.j')  # killed mid-append
    log = SkippedImageLog(log_path)
    assert log.count() == 1
    assert log.record("train", images, [(1, "truncated", "cut")], "epoch 2") == 1
    assert SkippedImageLog(log_path).count() == 2  # the new record stands on its own line


def test_header_only_startup_check_finds_missing_and_empty_files_but_not_cut_ones(folders, capsys):
    (folders / "train/c0/0.jpg").write_bytes(b"")
    assert run_cli("--mode", "train", *folder_run(folders, "data.startup_check=headers")) == 1
    assert "c0/0.jpg: empty" in capsys.readouterr().err
    (folders / "train/c0/0.jpg").unlink()
    class_picture(0, seed=0).save(folders / "train/c0/0.jpg")
    class_picture(2, seed=5, size=(400, 300)).save(folders / "train/c2/1.jpg")  # big enough that half of it
    truncate(folders / "train/c2/1.jpg")  # keeps the whole header: only decoding finds it, in the loader
    assert run_cli("--mode", "train", "--overwrite", *folder_run(folders, "data.startup_check=headers")) == 1
    captured = capsys.readouterr()
    assert "headers only" in captured.out and "0 bad" in captured.out  # the check passed it...
    assert "unreadable image" in captured.err and "c2/1.jpg: truncated" in captured.err  # ...the loader did not


def test_an_epoch_in_which_no_image_could_be_read_stops_the_run(folders, capsys):
    for path in (folders / "train").rglob("*.jpg"):
        path.write_bytes(b"")
    code = run_cli("--mode", "train", *folder_run(folders, "data.on_bad_image=skip", "data.startup_check=none",
                                                  "data.val_fraction=0"))
    assert code == 1
    assert "no training image could be read" in capsys.readouterr().err


def test_high_depth_grey_is_scaled_by_its_mode_and_keeps_its_transparent_value(tmp_path):
    integers = np.array([[0, 255, 256, 65535], [-5, 1000, 32768, 70000]], dtype=np.int32)
    Image.fromarray(integers, mode="I").save(tmp_path / "i32.tif")
    pixels = np.asarray(load_rgb_image(tmp_path / "i32.tif"))[..., 0]
    # one scale for every "I" image (16-bit), so 255 and 256 come out nearly alike, not white and black
    assert pixels.tolist() == [[0, 1, 1, 255], [0, 4, 128, 255]]
    grey16 = Image.fromarray(np.array([[1000, 1001, 50000]], dtype=np.uint16))
    grey16.save(tmp_path / "keyed.png", transparency=1000)
    assert Image.open(tmp_path / "keyed.png").info.get("transparency") == 1000
    keyed = np.asarray(load_rgb_image(tmp_path / "keyed.png"))
    assert keyed[0, 0].tolist() == [255, 255, 255]  # exactly the keyed 16-bit value is transparent...
    assert keyed[0, 1].tolist() == [4, 4, 4]  # ...not its 8-bit look-alike
    assert keyed[0, 2].tolist() == [195, 195, 195]


def test_machine_errors_are_raised_not_recorded_as_bad_images(tmp_path, monkeypatch):
    import errno

    import dataloaders.datasets as datasets_module

    image_list, _ = damaged_list(tmp_path)

    def too_many_open_files(path, *args, **options):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(datasets_module, "load_rgb_tensor", too_many_open_files)
    with pytest.raises(OSError) as raised:
        ImageDataset(image_list, lambda picture: picture, skip_bad_images=True)[0]
    assert raised.value.errno == errno.EMFILE and not isinstance(raised.value, BadImageError)

    # The data check too: the file is not reported bad, the error comes through.
    import dataloaders.checks as checks_module

    monkeypatch.setattr(checks_module, "load_rgb_image", too_many_open_files)
    with pytest.raises(OSError) as raised:
        checks_module.check_image(image_list.root / image_list.paths[0])
    assert raised.value.errno == errno.EMFILE


def test_a_single_k_is_accepted(folders):
    code = run_cli("--mode", "eval", "--checkpoint", "none", *folder_run(folders, "eval.recall_ks=[1]", "eval.map_ks=[]"))
    assert code == 0
    assert json.loads((folders / "run" / "untrained_report.json").read_text())["recall@1"] >= 0


def test_a_non_finite_loss_stops_naming_the_step_and_leaves_the_last_checkpoint_intact(trained_copy, capsys,
                                                                                       monkeypatch):
    import objective

    folders = trained_copy
    last = folders / "run" / "last.pt"
    before = last.read_bytes()
    real_call = objective.MetricLearningObjective.__call__
    calls = []

    def nan_on_the_second_step(self, *args):
        loss, signals = real_call(self, *args)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), signals

    monkeypatch.setattr(objective.MetricLearningObjective, "__call__", nan_on_the_second_step)
    assert run_cli("--mode", "train", "--resume", *folder_run(folders, "train.epochs=2")) == 1
    steps_per_epoch = torch.load(last, weights_only=True)["global_step"]
    err = capsys.readouterr().err
    assert f"loss is nan at step {steps_per_epoch + 2} (epoch 2)" in err and "Traceback" not in err
    assert last.read_bytes() == before  # nothing from the failed epoch was written
    for name in ("last.pt", "best.pt"):
        weights = torch.load(folders / "run" / name, weights_only=True)["model"]
        assert all(torch.isfinite(value).all() for value in weights.values() if value.is_floating_point()), name
