"""data.eval_decode=device: the workers read JPEG bytes, the evaluation device decodes and resizes a batch at once.

On the CPU the device path must give the workers' pictures bit for bit (the same libjpeg-turbo decode and uint8
resize), so every test here compares the two paths image by image; CUDA's nvjpeg is measured by
bench/jpeg_decode_bench.py and bench/gpu_session.sh instead.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

import main
from config import load_config
from dataloaders import BadImageError, read_folder_tree
import dataloaders.device_decode as device_decode
from dataloaders.device_decode import upright
from dataloaders.image_files import load_rgb_tensor, read_jpeg_bytes
from dataloaders.loaders import evaluation_loader
from test_bad_images import EXIF_ORIENTATION, class_picture, damaged_list, folder_run, write_tree

CPU = torch.device("cpu")
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # torchvision 0.29's notice


def marked_jpeg(path, orientation=1, size=(48, 32), mode="RGB"):
    """A class picture with a bright marker in one corner (a wrong turn moves it), saved with an EXIF orientation."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    picture = class_picture(orientation % 6, seed=orientation, size=size)
    picture.paste((250, 250, 250), (0, 0, 12, 8))
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.convert(mode).save(path, exif=exif.tobytes(), quality=95)
    return path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_turned_upright_as_the_loader_turns_it(tmp_path, orientation):
    path = marked_jpeg(tmp_path / "photo.jpg", orientation)
    data, read_orientation = read_jpeg_bytes(path)
    assert read_orientation == orientation
    turned = upright(decode_jpeg(data, mode=ImageReadMode.RGB), read_orientation)
    assert torch.equal(turned, load_rgb_tensor(path))


def test_files_the_device_should_not_decode_are_left_to_the_workers(tmp_path):
    for mode in ("L", "CMYK"):
        assert read_jpeg_bytes(marked_jpeg(tmp_path / f"{mode}.jpg", mode=mode)) is None
    class_picture(1, seed=1).save(tmp_path / "picture.png")
    assert read_jpeg_bytes(tmp_path / "picture.png") is None


def data_section(**overrides):
    return load_config(None, [f"data.{key}={value}" for key, value in overrides.items()]).data


def every_batch(loader):
    """(images, labels, indices, skipped) of the whole loader, concatenated."""
    images, labels, indices, skipped = [], [], [], []
    for batch_images, batch_labels, batch_indices, batch_skipped in loader:
        if batch_images is not None:
            assert batch_images.is_contiguous(memory_format=torch.channels_last)
            images.append(batch_images)
        labels.append(batch_labels)
        indices.append(batch_indices)
        skipped += batch_skipped
    return torch.cat(images), torch.cat(labels), torch.cat(indices), skipped


def mixed_tree(root):
    """Plain JPEGs of one size and EXIF-turned ones of another, in 3 classes: 17 images."""
    write_tree(root, num_classes=3, per_class=3)
    for orientation in range(1, 9):
        marked_jpeg(root / f"c{orientation % 3}" / f"turned{orientation}.jpg", orientation, size=(60, 44))
    return read_folder_tree(root)


def test_device_decoding_gives_the_workers_batches_bit_for_bit(tmp_path):
    """Plain JPEGs of two sizes (two resize groups in a batch), every EXIF orientation, and files left to the
    workers (grey and CMYK JPEGs, a PNG) in the same batches, through one worker process."""
    mixed_tree(tmp_path)
    marked_jpeg(tmp_path / "c0/grey.jpg", mode="L")
    marked_jpeg(tmp_path / "c1/cmyk.jpg", mode="CMYK")
    class_picture(2, seed=5).save(tmp_path / "c2/picture.png")
    # Short side >= 2 x 27 (the decode size at 24 px): the workers decode it at reduced scale, so it stays theirs.
    large = marked_jpeg(tmp_path / "c1/large.jpg", orientation=6, size=(200, 150))
    assert read_jpeg_bytes(large, draft_size=27) is None and read_jpeg_bytes(large) is not None
    image_list = read_folder_tree(tmp_path)
    assert len(image_list) == 21
    on_workers = every_batch(evaluation_loader(image_list, data_section(image_size=24, num_workers=1), 6, CPU))
    on_device = every_batch(evaluation_loader(image_list, data_section(image_size=24, num_workers=1,
                                                                        eval_decode="device"), 6, CPU))
    for workers_part, device_part in zip(on_workers, on_device):
        if isinstance(workers_part, torch.Tensor):
            assert torch.equal(workers_part, device_part)
        else:
            assert workers_part == device_part == []
    assert on_device[2].tolist() == list(range(21))


def test_jpegs_the_device_decoder_refuses_are_read_on_the_cpu_turned_once(tmp_path, monkeypatch):
    """A JPEG the device decoder refuses (here: all of them) is read by load_rgb_tensor, which turns it itself:
    the pictures are still the workers' own, and the refusal of a whole batch is said once."""
    image_list = mixed_tree(tmp_path)
    expected = every_batch(evaluation_loader(image_list, data_section(image_size=24, num_workers=0), 6, CPU))

    def refusing(*_, **__):
        raise RuntimeError("unsupported JPEG (stand-in for nvjpeg)")

    monkeypatch.setattr(device_decode, "decode_jpeg", refusing)
    with pytest.warns(RuntimeWarning, match="refused every JPEG of a batch"):
        read = every_batch(evaluation_loader(image_list, data_section(image_size=24, num_workers=0,
                                                                      eval_decode="device"), 6, CPU))
    assert torch.equal(read[0], expected[0]) and torch.equal(read[2], expected[2])


def test_where_lists_fail_but_each_jpeg_decodes_alone_lists_are_given_up_once(tmp_path, monkeypatch):
    """The GPU machine once answered a list with "Failed to decode batch" (../shared/GPU-NOTES.md): the batch is
    decoded one JPEG per call, and so is every later batch, without trying a list again."""
    image_list = mixed_tree(tmp_path)
    expected = every_batch(evaluation_loader(image_list, data_section(image_size=24, num_workers=0), 6, CPU))
    real_decode, list_calls = device_decode.decode_jpeg, []

    def lists_fail(data, **options):
        if isinstance(data, list):
            list_calls.append(len(data))
            raise RuntimeError("Failed to decode batch")
        return real_decode(data, **options)

    monkeypatch.setattr(device_decode, "decode_jpeg", lists_fail)
    with pytest.warns(RuntimeWarning, match="one JPEG per call from now on"):
        decoded = every_batch(evaluation_loader(image_list, data_section(image_size=24, num_workers=0,
                                                                         eval_decode="device"), 6, CPU))
    assert list_calls == [6] and torch.equal(decoded[0], expected[0]) and torch.equal(decoded[2], expected[2])


def test_large_groups_are_resized_in_several_calls_with_the_same_pixels(tmp_path, monkeypatch):
    image_list = mixed_tree(tmp_path)
    loader_settings = data_section(image_size=24, num_workers=0, eval_decode="device")
    whole = every_batch(evaluation_loader(image_list, loader_settings, 9, CPU))
    monkeypatch.setattr(device_decode, "MAX_RESIZE_PIXELS", 2 * 60 * 44)  # two of the larger pictures per call
    calls = []
    original_resize = device_decode.F.resize
    monkeypatch.setattr(device_decode.F, "resize", lambda batch, *a, **k: calls.append(batch.shape) or
                        original_resize(batch, *a, **k))
    chunked = every_batch(evaluation_loader(image_list, loader_settings, 9, CPU))
    assert max(shape.numel() // 3 for shape in calls) <= 2 * 60 * 44  # pixels per call, the last one included
    assert [shape[0] for shape in calls if shape[-2:] == (44, 60)].count(2) >= 2  # the larger ones two by two
    assert torch.equal(chunked[0], whole[0])


def test_a_batch_crosses_from_the_worker_in_two_tensors_however_many_images(tmp_path):
    """Each tensor a worker hands over holds an open file in the main process: one per JPEG ran out of them at
    batch 512 under `ulimit -n 1024`. A batch carries all its JPEG bytes in one tensor and the worker's own
    pictures in another."""
    mixed_tree(tmp_path)
    class_picture(2, seed=5).save(tmp_path / "c2/picture.png")
    marked_jpeg(tmp_path / "c0/grey.jpg", mode="L")
    image_list = read_folder_tree(tmp_path)
    dataset = evaluation_loader(image_list, data_section(image_size=24, num_workers=0, eval_decode="device"), 19,
                                CPU).dataset
    batch, labels, indices, skipped = device_decode.collate_jpeg_bytes([dataset[i] for i in range(len(image_list))])
    tensors = [field for field in batch if isinstance(field, torch.Tensor)]
    assert len(tensors) == 2 and len(batch.jpegs()) == 17 and batch.finished.shape == (2, 3, 24, 24)
    assert all(jpeg.data.untyped_storage().data_ptr() == batch.jpeg_bytes.untyped_storage().data_ptr()
               for jpeg in batch.jpegs())  # views of the one tensor, not copies


def test_bad_images_are_skipped_or_named_as_the_workers_do(tmp_path):
    """A truncated JPEG passes the workers' header read and fails only in the device's decode: its CPU retry names
    it 'truncated' as the workers would; the other bad files fail in the workers as before."""
    image_list, bad = damaged_list(tmp_path)
    skip = {"image_size": 24, "num_workers": 0, "on_bad_image": "skip"}
    on_workers = every_batch(evaluation_loader(image_list, data_section(**skip), 5, CPU))
    on_device = every_batch(evaluation_loader(image_list, data_section(**skip, eval_decode="device"), 5, CPU))
    assert {index: reason for index, reason, _ in on_device[3]} == bad
    assert sorted(on_device[3]) == sorted(on_workers[3])
    for workers_part, device_part in zip(on_workers[:3], on_device[:3]):
        assert torch.equal(workers_part, device_part)

    stop = evaluation_loader(image_list, data_section(image_size=24, num_workers=0, eval_decode="device"), 5, CPU)
    with pytest.raises(BadImageError) as raised:
        every_batch(stop)
    assert f"{image_list.root / image_list.paths[2]}: truncated" in str(raised.value)


def test_eval_through_the_cli_embeds_the_same_with_device_decoding(tmp_path):
    write_tree(tmp_path / "train", num_classes=2, per_class=2)  # eval reads only the test tree, but wants both
    write_tree(tmp_path / "test", num_classes=4, first_label=2)
    marked_jpeg(tmp_path / "test/c2/turned.jpg", orientation=6)
    runs = {}
    for decode in ("workers", "device"):
        run = tmp_path / decode
        argv = ["--mode", "eval", "--checkpoint", "none",
                *folder_run(tmp_path, "data.num_workers=1", f"data.eval_decode={decode}", f"output.dir={run}")]
        assert main.main([str(word) for word in argv]) == 0
        runs[decode] = (np.load(run / "untrained_test_embeddings.npy"), json.loads((run / "untrained_report.json").read_text()))
    (workers_rows, workers_report), (device_rows, device_report) = runs["workers"], runs["device"]
    assert workers_rows.shape == (17, 64) and np.array_equal(device_rows, workers_rows)
    assert device_report["recall@1"] == workers_report["recall@1"]


def test_eval_decode_is_a_checked_choice():
    from config import ConfigError

    with pytest.raises(ConfigError, match="data.eval_decode"):
        load_config(None, ["data.eval_decode=gpu"])


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_session.sh)")


@needs_cuda
def test_cuda_nvjpeg_pictures_are_the_workers_pictures_within_decoder_rounding(tmp_path):
    """nvjpeg and the float resize on CUDA may round differently from libjpeg-turbo and the uint8 resize; a wrong
    turn, crop or channel order would differ by far more than that."""
    write_tree(tmp_path, num_classes=3, per_class=4)
    for orientation in range(1, 9):
        marked_jpeg(tmp_path / f"c{orientation % 3}" / f"turned{orientation}.jpg", orientation, size=(120, 88))
    marked_jpeg(tmp_path / "c0/grey.jpg", mode="L")
    image_list = read_folder_tree(tmp_path)
    on_workers = every_batch(evaluation_loader(image_list, data_section(image_size=32, num_workers=0), 7, CPU))
    on_cuda = every_batch(evaluation_loader(image_list, data_section(image_size=32, num_workers=0,
                                                                      eval_decode="device"), 7, torch.device("cuda")))
    assert on_cuda[0].is_cuda and on_cuda[0].shape == on_workers[0].shape
    gap = (on_cuda[0].cpu().int() - on_workers[0].int()).abs()
    assert gap.float().mean() < 2 and gap.max() <= 40
    assert torch.equal(on_cuda[1], on_workers[1]) and torch.equal(on_cuda[2], on_workers[2])


@needs_cuda
def test_cuda_decoding_beside_a_busy_forward_gives_the_same_pictures(tmp_path):
    """As in evaluation: every batch is followed by long queued work on the current stream that reads memory
    freed right after, while the next batch is decoded (on the decode stream, which must not reuse it)."""
    image_list = mixed_tree(tmp_path)
    cuda = torch.device("cuda")
    quiet = every_batch(evaluation_loader(image_list, data_section(image_size=32, num_workers=0,
                                                                    eval_decode="device"), 4, cuda))
    busy = []
    for images, *_ in evaluation_loader(image_list, data_section(image_size=32, num_workers=0, eval_decode="device"),
                                        4, cuda):
        work = torch.randn(2048, 2048, device=cuda)
        for _ in range(30):
            work = torch.tanh(work @ work / 64)
        busy.append(images.clone())
        del work
    assert torch.equal(torch.cat(busy), quiet[0])


@needs_cuda
def test_cuda_bad_images_are_skipped_as_the_workers_skip_them(tmp_path):
    image_list, bad = damaged_list(tmp_path)
    data = data_section(image_size=24, num_workers=0, on_bad_image="skip", eval_decode="device")
    on_cuda = every_batch(evaluation_loader(image_list, data, 5, torch.device("cuda")))
    assert {index: reason for index, reason, _ in on_cuda[3]} == bad
    assert sorted(on_cuda[2].tolist()) == sorted(set(range(len(image_list))) - set(bad))
