"""JPEG decoding for evaluation, before any code depends on it (issue 17, item 4): does torchvision decode a list
of JPEGs on the GPU on this machine's torchvision, how fast, and how close to the CPU decoders?

    python bench/jpeg_decode_bench.py                 # 512 SOP-like 500 x 500 JPEGs; GPU rows when CUDA is there
    python bench/jpeg_decode_bench.py --tiny          # 32 images: a smoke test of seconds on a CPU

Rows (images/s over --repeats passes of all images, after one untimed pass; file bytes are read beforehand, so
only decoding is timed):
- the loader's decoder, `dataloaders.image_files.load_rgb_tensor` (torchvision's libjpeg-turbo decode for a JPEG
  read at full size, PIL with its draft reduction when the short side is at least twice the resize), at full size
  and with draft_size 292 (the evaluation resize for 256-px input; a 500-px photo is then still read whole), on
  one CPU thread;
- torchvision decode_jpeg on the CPU, one image per call;
- torchvision decode_jpeg on CUDA, one image per call and a list of --batch per call (nvjpeg's batched decode;
  a list failed on an earlier torchvision, which is why this is measured before it is used);
- the whole batch of `data.eval_decode=device` (`dataloaders.device_decode.decoded_batch`: decode, EXIF turn,
  resize to 292 and crop to 256, batches of --batch), on the CPU and on CUDA, compared with the loader's
  evaluation pictures (its decode, then `EvalResizeAndCentreCrop`).
Each row also gives the largest and mean absolute difference (0-255) from the loader's full-size decode: different
decoders (libjpeg-turbo, nvjpeg) may round the IDCT and the chroma upsampling differently.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.synthetic_photos import write_sop_like_jpegs  # noqa: E402
from dataloaders.device_decode import EncodedJpeg, JpegDecoder, decoded_batch, pending_batch  # noqa: E402
from dataloaders.image_files import load_rgb_tensor, read_jpeg_bytes  # noqa: E402
from dataloaders.transforms import build_transforms  # noqa: E402

IMAGE_SIZE = 256  # the evaluation input of Swinv2-B/256: resize to 292, crop 256


def timed(decode_all, repeats: int, count: int, synchronize) -> tuple[float, list[torch.Tensor]]:
    """(images per second, the decoded images of the last pass)."""
    decoded = decode_all()  # untimed: lazy initialisation (nvjpeg handles, CUDA context)
    synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        decoded = decode_all()
    synchronize()
    return repeats * count / (time.perf_counter() - started), decoded


def difference(decoded: list[torch.Tensor], reference: list[torch.Tensor]) -> tuple[float, float]:
    """(largest, mean) absolute difference over all pixels; nan when a shape differs (a draft decode)."""
    if any(a.shape != b.shape for a, b in zip(decoded, reference)):
        return float("nan"), float("nan")
    gaps = [(a.cpu().int() - b.int()).abs() for a, b in zip(decoded, reference)]
    return float(max(g.max() for g in gaps)), float(torch.cat([g.flatten() for g in gaps]).float().mean())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--size", type=int, default=500, help="side of the square JPEGs (SOP: about 500)")
    parser.add_argument("--batch", type=int, default=128, help="images per list call on the GPU")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="32 images, one repeat")
    parser.add_argument("--out", type=Path, default=None, help="rows as JSON")
    arguments = parser.parse_args(argv)
    if arguments.tiny:
        arguments.images, arguments.repeats, arguments.batch = 32, 1, 16
    torch.set_num_threads(1)  # one loader worker's view: decoding scales by workers, not by threads

    with tempfile.TemporaryDirectory() as folder:
        paths = [f"{i:05d}.jpg" for i in range(arguments.images)]
        write_sop_like_jpegs(Path(folder), paths, unique=min(arguments.images, 64), workers=2, size=arguments.size)
        files = [Path(folder) / path for path in paths]
        data = [torch.frombuffer(bytearray(file.read_bytes()), dtype=torch.uint8) for file in files]
        count, repeats = len(files), arguments.repeats

        def cpu_sync():
            return None

        reference = [load_rgb_tensor(file) for file in files]
        evaluation_transform = build_transforms(IMAGE_SIZE, train=False)
        evaluation_reference = [evaluation_transform(picture) for picture in reference]
        jpegs = [EncodedJpeg(*read_jpeg_bytes(file), str(file)) for file in files]
        rows = []

        def add(name: str, decode_all, synchronize=cpu_sync, compare_with=reference):
            try:
                per_second, decoded = timed(decode_all, repeats, count, synchronize)
                largest, mean = difference(decoded, compare_with)
                rows.append({"row": name, "images_per_second": round(per_second, 1), "max_abs_diff": largest,
                             "mean_abs_diff": round(mean, 4)})
            except Exception as error:  # noqa: BLE001 - a decoder that fails here is a result
                rows.append({"row": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0]}"})

        add("the loader, full size, 1 thread", lambda: [load_rgb_tensor(file) for file in files])
        add("the loader, draft_size 292, 1 thread",
            lambda: [load_rgb_tensor(file, draft_size=292) for file in files])
        add("torchvision decode_jpeg, CPU, one per call",
            lambda: [decode_jpeg(item, mode=ImageReadMode.RGB) for item in data])

        def device_batches(device):
            decoder = JpegDecoder(device)

            def decode_all():
                pictures = []
                for start in range(0, count, arguments.batch):
                    images, _, failed = decoded_batch(pending_batch(jpegs[start:start + arguments.batch]), decoder,
                                                      IMAGE_SIZE)
                    assert not failed, failed
                    pictures += list(images)
                return pictures
            return decode_all

        add("the loader + its evaluation transform (decode + resize + crop), 1 thread",
            lambda: [evaluation_transform(load_rgb_tensor(file, draft_size=292)) for file in files],
            compare_with=evaluation_reference)
        add(f"data.eval_decode=device batches of {arguments.batch} (decode + resize + crop), CPU main process",
            device_batches(torch.device("cpu")), compare_with=evaluation_reference)
        if torch.cuda.is_available():
            def cuda_sync():
                torch.cuda.synchronize()

            add("torchvision decode_jpeg, CUDA, one per call",
                lambda: [decode_jpeg(item, mode=ImageReadMode.RGB, device="cuda") for item in data], cuda_sync)

            def in_lists():
                decoded = []
                for start in range(0, count, arguments.batch):
                    decoded += decode_jpeg(data[start:start + arguments.batch], mode=ImageReadMode.RGB,
                                           device="cuda")
                return decoded

            add(f"torchvision decode_jpeg, CUDA, lists of {arguments.batch}", in_lists, cuda_sync)
            add(f"data.eval_decode=device batches of {arguments.batch} (decode + resize + crop), CUDA",
                device_batches(torch.device("cuda")), cuda_sync, compare_with=evaluation_reference)

    import torchvision

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"{count} SOP-like {arguments.size} x {arguments.size} JPEGs; torch {torch.__version__}, torchvision "
          f"{torchvision.__version__}; {device}\n")
    print("| decoder | images/s | max / mean abs diff from the loader's pictures |")
    print("|---|---:|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['row']} | failed: {row['error']} | |")
        else:
            print(f"| {row['row']} | {row['images_per_second']:,.1f} | {row['max_abs_diff']:g} / "
                  f"{row['mean_abs_diff']:g} |")
    if arguments.out:
        arguments.out.write_text(json.dumps({"device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
