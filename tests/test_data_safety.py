"""Data safety: lists cannot reach outside the dataset root, odd names and odd files are refused without
reading them, and a stop signal during the data check or the cache build leaves no process or temp file behind.

Everything runs on small trees written in tmp_path; the signal tests run the CLI a user types, in a subprocess.
"""

import os
import signal
import subprocess
import sys
import time
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, SHARED_DATA
from dataloaders import BadImageError, DataFormatError, ImageDataset, ImageList, read_folder_tree, read_sop_list
from dataloaders.cache import build_cache, use_cache
from dataloaders.checks import check_image_lists
from dataloaders.image_files import load_rgb_image, load_rgb_tensor

HEADER = "image_id class_id super_class_id path"


def save_picture(path, colour=(200, 40, 40), size=(24, 20)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_list(path, relative_paths, header=HEADER, prefix=""):
    """An SOP list, one image per line, classes 1, 1, 2, 2, ..."""
    lines = [header] + [f"{i} {1 + (i - 1) // 2} 1 {p}" for i, p in enumerate(relative_paths, 1)]
    path.write_text(prefix + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def image_list(root, relative_paths):
    n = len(relative_paths)
    return ImageList(root, tuple(relative_paths), np.arange(n) // 2, np.zeros(n, dtype=np.int64))


def reasons(report, split="test"):
    return {item["path"]: item["reason"] for item in report["splits"][split]["bad_images"]}


def files_under(folder):
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


@contextmanager
def fails_instead_of_hanging(seconds=10):
    """A FIFO opened for reading blocks until a writer comes: turn such a hang into a failure."""
    def give_up(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s (a FIFO opened for reading?)")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---- 1. every list path stays inside the dataset root ---------------------------------------------
@pytest.mark.parametrize("escaping", ["../../etc/passwd", "/etc/passwd", "images/../../outside.png", ".."])
def test_a_list_line_leaving_the_root_is_refused_with_file_and_line(tmp_path, escaping):
    root = tmp_path / "root"
    save_picture(root / "images" / "a.png")
    listed = write_list(root / "Ebay_test.txt", ["images/a.png", escaping, "images/a.png"])
    with pytest.raises(DataFormatError) as raised:
        read_sop_list(listed, root)
    message = str(raised.value)
    assert message.startswith(f"{listed}:3: ") and "outside" in message and repr(f"2 1 1 {escaping}") in message
    assert "\n" not in message
    assert read_sop_list(listed, root, allow_outside_root=True).paths[1] == escaping  # another mount, on purpose


def test_a_symlink_inside_the_root_pointing_outside_is_never_opened_unless_allowed(tmp_path):
    root = tmp_path / "root"
    secret = save_picture(tmp_path / "elsewhere" / "secret.png", colour=(10, 250, 10))
    save_picture(root / "images" / "a.png")
    (root / "images" / "link.png").symlink_to(secret)
    (root / "linked_folder").symlink_to(secret.parent, target_is_directory=True)
    inside_link = root / "images" / "inside_link.png"
    inside_link.symlink_to(root / "images" / "a.png")
    images = image_list(root, ["images/a.png", "images/link.png", "linked_folder/secret.png", "images/inside_link.png"])

    report = check_image_lists({"test": images})
    assert reasons(report) == {"images/link.png": "outside_root", "linked_folder/secret.png": "outside_root"}
    assert reasons(check_image_lists({"test": images}, allow_outside_root=True)) == {}

    skipping = ImageDataset(images, lambda picture: picture, skip_bad_images=True)
    assert skipping[1][0].reason == "outside_root" and skipping[2][0].reason == "outside_root"
    assert skipping[3][0].shape == (3, 20, 24)  # a link that stays inside is fine
    with pytest.raises(BadImageError, match="link.png: outside_root"):
        ImageDataset(images, lambda picture: picture)[1]
    allowed = ImageDataset(images, lambda picture: picture, allow_outside_root=True)
    assert allowed[1][0][:, 0, 0].tolist() == [10, 250, 10]


def test_a_folder_tree_entry_leaving_the_root_is_refused_naming_it(tmp_path):
    outside = tmp_path / "elsewhere"
    save_picture(outside / "birds" / "x.png")
    root = tmp_path / "tree"
    save_picture(root / "cats" / "0.png")
    save_picture(root / "cats" / "1.png")
    (root / "cats" / "2.png").symlink_to(root / "cats" / "0.png")  # inside: fine
    assert len(read_folder_tree(root)) == 3

    (root / "cats" / "3.png").symlink_to(outside / "birds" / "x.png")
    with pytest.raises(DataFormatError, match=r"cats/3\.png.*outside"):
        read_folder_tree(root)
    assert len(read_folder_tree(root, allow_outside_root=True)) == 4
    (root / "cats" / "3.png").unlink()

    (root / "birds").symlink_to(outside / "birds", target_is_directory=True)
    with pytest.raises(DataFormatError, match=r"tree/birds.*outside"):
        read_folder_tree(root)
    assert read_folder_tree(root, allow_outside_root=True).class_names == ("birds", "cats")


def test_the_cache_never_writes_outside_its_folder_whatever_the_list_says(tmp_path):
    root = tmp_path / "root"
    save_picture(root / "images" / "a.png")
    outside = save_picture(tmp_path / "mount" / "b.png", colour=(0, 0, 250))
    outside_bytes = outside.read_bytes()
    (root / "images" / "link.png").symlink_to(outside)
    escaping = ["images/a.png", "../mount/b.png", str(outside), "images/link.png", "images/../../mount/b.png"]
    images = image_list(root, escaping)
    cache = tmp_path / "run" / "cache"  # deeper than the root: "../x" from each is a different place
    before = files_under(tmp_path)

    def created_outside_the_cache():
        return {f for f in files_under(tmp_path) - before if f != "run" and not f.startswith(("run/cache", "cache2"))}

    # Three lines name the same outside file: it is cached once, inside the cache.
    summary = build_cache([images], cache, short_side=16, allow_outside_root=True)
    assert summary == {"written": 3, "reused": 0, "failed": []}
    assert created_outside_the_cache() == set() and outside.read_bytes() == outside_bytes
    cached = use_cache(images, cache, 16)
    assert all((cache / p).resolve().is_relative_to(cache.resolve()) for p in cached.paths)
    assert cached.paths[0] == "images/a.png" and cached.paths[3] == "images/link.png"  # inside: same path
    for index in range(1, 5):  # each line still gets its own picture (blue), read from the cache
        assert ImageDataset(cached, lambda picture: picture)[index][0][:, 0, 0].tolist()[2] > 200

    # Without allow_outside_root they are refused, and still nothing is written outside.
    refused = build_cache([images], tmp_path / "cache2", short_side=16)
    assert len(refused["failed"]) == 2 and all("outside_root" in message for message in refused["failed"])
    assert created_outside_the_cache() == set() and outside.read_bytes() == outside_bytes


# ---- 2. names with control characters -------------------------------------------------------------
@pytest.mark.parametrize("character", ["\r", "\x1b", "\x00", "\x85", "\u2028", "\x0c"])
def test_a_list_path_holding_a_control_character_is_refused_on_its_own_line(tmp_path, character):
    listed = write_list(tmp_path / "Ebay_test.txt", ["a.png", f"b{character}c.png", "d.png", "e.png x"])
    with pytest.raises(DataFormatError) as raised:
        read_sop_list(listed, tmp_path)
    message = str(raised.value)
    assert message.startswith(f"{listed}:3: ") and "control" in message and "\n" not in message


@pytest.mark.parametrize("name", ["new\nline.png", "carriage\rreturn.png", "escape\x1b[2J.png", "tab\t.png"])
def test_a_folder_tree_file_name_holding_a_control_character_is_refused(tmp_path, name):
    save_picture(tmp_path / "cats" / "0.png")
    save_picture(tmp_path / "cats" / name)
    with pytest.raises(DataFormatError) as raised:
        read_folder_tree(tmp_path)
    assert repr(f"cats/{name}") in str(raised.value) and "\n" not in str(raised.value)
    (tmp_path / "cats" / name).unlink()
    save_picture(tmp_path / f"bad{name}class" / "0.png")
    with pytest.raises(DataFormatError, match="control"):
        read_folder_tree(tmp_path)


# ---- 3. a byte-order mark ------------------------------------------------------------------------
def test_a_list_starting_with_a_utf8_byte_order_mark_is_read(tmp_path):
    plain = read_sop_list(write_list(tmp_path / "plain.txt", ["a.png", "b.png"]), tmp_path)
    marked = read_sop_list(write_list(tmp_path / "bom.txt", ["a.png", "b.png"], prefix="\ufeff"), tmp_path)
    assert marked.paths == plain.paths and marked.labels.tolist() == plain.labels.tolist()


# ---- 4. bounded resources on bad input ------------------------------------------------------------
def peak_python_allocation(function):
    """(result or exception, the largest amount of memory Python held at once while running it, in bytes)."""
    tracemalloc.start()
    try:
        try:
            result = function()
        except Exception as error:  # noqa: BLE001 - what it raised is the result here
            result = error
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_huge_file_is_refused_before_reading_and_only_its_header_is_ever_read(tmp_path):
    huge = tmp_path / "images" / "huge.jpg"
    huge.parent.mkdir()
    with open(huge, "wb") as stream:
        stream.truncate(200_000_000)  # sparse: 200 MB that take no disk
    images = image_list(tmp_path, ["images/huge.jpg"])

    item, peak = peak_python_allocation(lambda: ImageDataset(images, lambda p: p, skip_bad_images=True)[0])
    assert item[0].reason == "too_large" and "100000000" in item[0].detail and peak < 2_000_000
    report, peak = peak_python_allocation(lambda: check_image_lists({"test": images}))
    assert reasons(report) == {"images/huge.jpg": "too_large"} and peak < 2_000_000
    with pytest.raises(BadImageError, match="huge.jpg: too_large"):
        ImageDataset(images, lambda p: p)[0]

    # Under a higher limit it is opened, and refused as not an image after reading the header only.
    raised, peak = peak_python_allocation(lambda: load_rgb_tensor(huge, max_bytes=300_000_000))
    assert isinstance(raised, Exception) and peak < 2_000_000
    item, peak = peak_python_allocation(
        lambda: ImageDataset(images, lambda p: p, skip_bad_images=True, max_image_bytes=300_000_000)[0])
    assert item[0].reason == "not_an_image" and peak < 2_000_000
    save_picture(tmp_path / "images" / "small.png")
    with pytest.raises(Exception):
        load_rgb_image(tmp_path / "images" / "small.png", max_bytes=10)


def test_fifos_devices_and_folders_are_refused_without_opening_them(tmp_path):
    root = tmp_path / "root"
    save_picture(root / "images" / "a.png")
    os.mkfifo(root / "images" / "pipe.jpg")
    (root / "images" / "zero.jpg").symlink_to("/dev/zero")
    (root / "images" / "folder.jpg").mkdir()
    images = image_list(root, ["images/a.png", "images/pipe.jpg", "images/zero.jpg", "images/folder.jpg"])
    expected = {"images/pipe.jpg": "not_a_file", "images/zero.jpg": "not_a_file", "images/folder.jpg": "not_a_file"}

    with fails_instead_of_hanging():
        assert reasons(check_image_lists({"test": images}, allow_outside_root=True)) == expected
        assert reasons(check_image_lists({"test": images}, decode=False, allow_outside_root=True)) == expected
        skipping = ImageDataset(images, lambda p: p, skip_bad_images=True, allow_outside_root=True)
        assert [skipping[i][0].reason for i in (1, 2, 3)] == ["not_a_file"] * 3
        with pytest.raises(BadImageError, match="pipe.jpg: not_a_file"):
            ImageDataset(images, lambda p: p, allow_outside_root=True)[1]
        summary = build_cache([images], tmp_path / "cache", short_side=16, allow_outside_root=True)
        assert len(summary["failed"]) == 3 and all("not_a_file" in message for message in summary["failed"])
        # Without allow_outside_root the device is not even looked at: /dev lies outside the root.
        assert reasons(check_image_lists({"test": images}))["images/zero.jpg"] == "outside_root"


# ---- 5. stop signals leave nothing behind ---------------------------------------------------------
def descendants(pid):
    """PIDs of the living processes below `pid`, read from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stream:
                    fields = stream.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pids):
    living = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stream:
                if stream.read().rsplit(")", 1)[1].split()[0] != "Z":
                    living.add(pid)
        except OSError:
            pass
    return living


def wait_until(condition, seconds):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_an_exception_in_the_main_process_stops_the_pool_workers_at_once():
    from dataloaders.datasets import map_in_worker_processes

    class Stop(BaseException):
        pass

    seen, before = {}, descendants(os.getpid())

    def stop(signum, frame):
        seen["workers"] = descendants(os.getpid()) - before
        raise Stop

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    started = time.monotonic()
    try:
        with pytest.raises(Stop):
            map_in_worker_processes(time.sleep, [30.0] * 4, workers=2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 10  # the sleeping workers were not waited for
    assert len(seen["workers"]) >= 2
    assert wait_until(lambda: not alive(seen["workers"]), 5), alive(seen["workers"])
    assert map_in_worker_processes(abs, [-1, 2, -3], workers=2) == [1, 2, 3]


def test_an_interrupted_cache_build_leaves_no_temporary_file(tmp_path, monkeypatch):
    import dataloaders.cache as cache_module

    images = image_list(tmp_path / "root", ["a/0.png", "a/1.png", "a/2.png"])
    for i, relative in enumerate(images.paths):
        save_picture(images.root / relative, colour=(i * 50, 0, 0), size=(64, 48))
    real_replace, calls = os.replace, []

    def interrupted_on_the_second_image(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a stop signal would, with the second image's temporary file written
        real_replace(source, target)

    monkeypatch.setattr(cache_module.os, "replace", interrupted_on_the_second_image)
    with pytest.raises(KeyboardInterrupt):
        build_cache([images], tmp_path / "cache", short_side=16)
    monkeypatch.undo()
    assert files_under(tmp_path / "cache") == {"a", "a/0.png"}  # the finished image stays, to be reused
    assert build_cache([images], tmp_path / "cache", short_side=16) == {"written": 2, "reused": 1, "failed": []}


def slow_folder_dataset(root, classes=10, per_class=6):
    """Copies of one 2000 x 2000 PNG: a few KB each on disk, but a tenth of a second each to decode."""
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (2000, 2000), (120, 30, 30)).save(buffer, "PNG")
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"class{c}" / f"{i}.png").write_bytes(buffer.getvalue())


@pytest.mark.parametrize("mode", ["check", "cache"])
def test_sigterm_stops_a_data_mode_with_exit_code_3_one_line_and_no_process_left(tmp_path, mode):
    slow_folder_dataset(tmp_path / "images")
    command = [sys.executable, str(REPO_ROOT / "main.py"), "--mode", mode, "data.format=folder",
               f"data.root={tmp_path / 'images'}", "data.num_workers=2", "data.image_size=32",
               f"output.dir={tmp_path / 'run'}", "wandb.mode=disabled"]
    if mode == "cache":
        command.append(f"data.cache_dir={tmp_path / 'cache'}")
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = set()
    try:
        # Bounded, but generous: on a loaded machine the imports alone can take a minute.
        started = wait_until(lambda: process.poll() is not None or len(descendants(process.pid)) >= 2, 180)
        assert started and process.poll() is None, process.communicate()
        workers = descendants(process.pid)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 3, stderr
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("interrupted: "), stderr
        assert "SIGTERM" in stderr
        assert wait_until(lambda: not alive(workers), 5), alive(workers)
        if mode == "cache":
            assert not [path for path in (tmp_path / "cache").rglob("*") if path.is_file()
                        and not path.name.endswith(".png")]  # only whole images: no temporary file
    finally:
        for pid in alive(workers | descendants(process.pid) | {process.pid}):
            os.kill(pid, signal.SIGKILL)
        process.wait()


def test_list_reading_resolves_symlinks_only_where_it_must(monkeypatch):
    """Resolving every path costs a few file-system calls per image, seconds for SOP's 120k on a network drive:
    readers resolve only the symlinks they meet, and opening an image checks the rest."""
    cub, sop = SHARED_DATA / "cub100" / "images", SHARED_DATA / "sop_format_sample"
    if not (cub.is_dir() and sop.is_dir()):
        pytest.skip(f"{cub} or {sop} not present")
    calls = []
    real_realpath = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda path, **options: calls.append(path) or real_realpath(path, **options))
    assert len(read_folder_tree(cub)) == 5902
    assert len(read_sop_list(sop / "Ebay_test.txt", sop)) == 9091
    assert len(calls) <= 2


# ---- 6. the batch-shape hint never asks for a P below 2 ----------------------------------------------
def test_the_batch_hint_lowers_k_when_p_is_already_the_smallest():
    from types import SimpleNamespace

    from dataloaders.loaders import batch_shape_hint

    pk = SimpleNamespace(sampler="pk", classes_per_batch=2, images_per_class=4)
    assert batch_shape_hint(pk, num_images=6, usable_classes=3) == \
        "with data.classes_per_batch=2, use data.images_per_class <= 3"
    assert batch_shape_hint(pk, num_images=40, usable_classes=3).endswith("data.classes_per_batch <= 3")
    assert "1 class(es) with 2 or more images" in batch_shape_hint(pk, num_images=9, usable_classes=1)
