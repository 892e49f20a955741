"""Evaluation images decoded on the evaluation device (`data.eval_decode=device`).

The loader's workers only read each colour JPEG's bytes and EXIF orientation (`image_files.read_jpeg_bytes`);
the main process hands the whole batch to torchvision's `decode_jpeg` on the evaluation device (nvjpeg's
batched decoder on CUDA), turns each picture upright, and resizes and crops every group of same-sized
pictures in one call, there. Why: on the H200 machine, embedding the 60,502-image test set ran at 1,400
images/s from 16 workers decoding with libjpeg-turbo, against 2,080 for the forward alone (issue 17,
docs/performance.md); nvjpeg moves the decode off those cores.

What the pictures are: on the CPU, the loader's own, bit for bit (the same libjpeg-turbo decode and uint8
resize; tested). On CUDA, nvjpeg's IDCT and chroma upsampling and torchvision's float resize may differ from
them by a few levels of 255 (`bench/jpeg_decode_bench.py` measures by how much).

Files that are not colour JPEGs (PNG, WebP, grey or CMYK JPEGs...), and JPEGs the workers decode at reduced
scale (short side at least twice the evaluation resize: 584 px at 256-px input, 146 px at the demo's 64), are
decoded by the worker as before and join the batch already resized. A JPEG the device decoder refuses is decoded again on the CPU by
`load_rgb_tensor`, which either reads it or names what is wrong with it, and that image is then skipped or
stops the run as `data.on_bad_image` says, like any bad image.
"""

from __future__ import annotations

import itertools
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torchvision.transforms.v2 import functional as F

from .datasets import ImageDataset, collate_skipping_bad_images, stack_pictures
from .image_files import BadImageError, bad_image_message, describe_image_error, load_rgb_tensor, read_jpeg_bytes
from .transforms import eval_resize_size

try:  # deprecated in favour of TorchCodec from torchvision 0.29 (pinned); data.eval_decode=device needs it
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - a future torchvision
    decode_jpeg = None

MAX_RESIZE_PIXELS = 1 << 26  # input pixels per resize call: 67 M, 0.8 GB as float32 (e.g. 5 photos of 12 Mpx)

class EncodedJpeg(NamedTuple):
    """A colour JPEG as the worker read it: its bytes (uint8, 1-D, CPU), EXIF orientation (1-8) and path."""

    data: torch.Tensor
    orientation: int
    path: str


class JpegBytesDataset(ImageDataset):
    """ImageDataset whose colour JPEGs come back as `EncodedJpeg` (decoded later, a batch at once, by
    `DeviceDecodingLoader`); every other file is decoded and transformed as ImageDataset does."""

    def read(self, path):
        encoded = read_jpeg_bytes(path, self.decode_size, root=self.confine_to, max_bytes=self.max_image_bytes)
        return self.read_decoded(path) if encoded is None else EncodedJpeg(*encoded, str(path))

    def read_decoded(self, path) -> torch.Tensor:
        """The upright picture as ImageDataset reads it (same root and size limit): for the files left to the
        worker, and for a JPEG the device decoder refuses."""
        return super().read(path)

    def finish(self, picture):
        return picture if isinstance(picture, EncodedJpeg) else self.transform(picture)


class PendingBatch(NamedTuple):
    """A batch as a worker delivers it, in two tensors however many images it holds (each tensor a worker
    hands over costs the main process an open file until it is freed; one per JPEG ran out of them at
    batch 512 under a limit of 1,024):

    jpeg_bytes: every colour JPEG's bytes, one after the other, `jpeg_lengths` long each, at rows `jpeg_rows`
    with their `orientations` and `paths`; finished: [F, 3, S, S] uint8, the pictures the worker decoded
    itself (other files, large JPEGs), at rows `finished_rows`, or None."""

    rows: int
    jpeg_rows: list
    jpeg_bytes: torch.Tensor
    jpeg_lengths: list
    orientations: list
    paths: list
    finished_rows: list
    finished: torch.Tensor | None

    def jpegs(self) -> list[EncodedJpeg]:
        """The JPEGs, their bytes as views of `jpeg_bytes`."""
        ends = list(itertools.accumulate(self.jpeg_lengths))
        return [EncodedJpeg(self.jpeg_bytes[end - length:end], orientation, path)
                for end, length, orientation, path in zip(ends, self.jpeg_lengths, self.orientations, self.paths)]


def pending_batch(pictures: list) -> PendingBatch:
    """The PendingBatch of per-row `EncodedJpeg`s and finished [3, S, S] pictures."""
    jpeg_rows = [row for row, picture in enumerate(pictures) if isinstance(picture, EncodedJpeg)]
    finished_rows = [row for row, picture in enumerate(pictures) if not isinstance(picture, EncodedJpeg)]
    jpegs = [pictures[row] for row in jpeg_rows]
    jpeg_bytes = torch.cat([jpeg.data for jpeg in jpegs]) if jpegs else torch.empty(0, dtype=torch.uint8)
    finished = stack_pictures([pictures[row] for row in finished_rows]) if finished_rows else None
    return PendingBatch(len(pictures), jpeg_rows, jpeg_bytes, [len(jpeg.data) for jpeg in jpegs],
                        [jpeg.orientation for jpeg in jpegs], [jpeg.path for jpeg in jpegs], finished_rows, finished)


def collate_jpeg_bytes(items: list[tuple]) -> tuple[PendingBatch | None, torch.Tensor, torch.Tensor, list]:
    """`collate_skipping_bad_images` for JpegBytesDataset: a PendingBatch instead of a tensor of pictures (the
    JPEGs have different sizes until they are decoded); unreadable images are left out and listed."""
    return collate_skipping_bad_images(items, batch_pictures=pending_batch)


def upright(picture: torch.Tensor, orientation: int) -> torch.Tensor:
    """A decoded [C, H, W] picture turned as EXIF orientation 1-8 says (as PIL's exif_transpose does)."""
    height_width = (-2, -1)
    if orientation == 2:
        return picture.flip(-1)
    if orientation == 3:
        return picture.flip(height_width)
    if orientation == 4:
        return picture.flip(-2)
    if orientation == 5:
        return picture.transpose(-2, -1)
    if orientation == 6:  # stored turned left: turn it right (clockwise)
        return torch.rot90(picture, -1, height_width)
    if orientation == 7:
        return picture.transpose(-2, -1).flip(height_width)
    if orientation == 8:
        return torch.rot90(picture, 1, height_width)
    return picture


class JpegDecoder:
    """Decodes lists of `EncodedJpeg` to RGB on `device`: each to a tensor, a `CpuDecoded` or the reason it failed.

    One call for the whole list (nvjpeg's batched decode on CUDA). That call returns nothing when any JPEG
    fails, so then each is decoded alone, and one the device decoder still refuses is read on the CPU by
    `read_on_cpu` (`load_rgb_tensor` with the dataset's root and size limit, which applies the EXIF orientation
    itself, hence `CpuDecoded`): a valid file nvjpeg does not support is read, a broken one raises.
    A list call that fails although every JPEG of it then decodes alone means lists do not work with this
    torchvision and card (seen once on the GPU machine: "Failed to decode batch"): from then on, one JPEG per call.
    """

    def __init__(self, device: torch.device, read_on_cpu: Callable[[str], torch.Tensor] = load_rgb_tensor) -> None:
        self.device, self.read_on_cpu = device, read_on_cpu
        self.lists_work, self.said_all_refused = True, False

    def __call__(self, jpegs: list[EncodedJpeg]) -> list[torch.Tensor | CpuDecoded | BaseException]:
        if not jpegs:
            return []
        list_failed = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's notice, once per call
            if self.lists_work and len(jpegs) > 1:
                try:
                    return list(decode_jpeg([jpeg.data for jpeg in jpegs], mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError:
                    list_failed = True
            results = [self.decode_one(jpeg) for jpeg in jpegs]
        decoded_alone = sum(isinstance(result, torch.Tensor) for result in results)
        if list_failed and decoded_alone == len(jpegs):
            self.lists_work = False
            warnings.warn(f"torchvision's batched JPEG decode on {self.device.type} failed for a batch whose JPEGs "
                          f"each decode alone: decoding one JPEG per call from now on", RuntimeWarning, stacklevel=2)
        if len(jpegs) > 1 and decoded_alone == 0 and not self.said_all_refused:
            self.said_all_refused = True
            warnings.warn(f"the {self.device.type} JPEG decoder refused every JPEG of a batch of {len(jpegs)}; they "
                          f"were read on the CPU by this one process, which is slow: data.eval_decode=workers "
                          f"decodes them in the loader processes", RuntimeWarning, stacklevel=2)
        return results

    def decode_one(self, jpeg: EncodedJpeg) -> torch.Tensor | CpuDecoded | BaseException:
        try:
            return decode_jpeg(jpeg.data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            try:
                return CpuDecoded(self.read_on_cpu(jpeg.path))
            except Exception as error:  # noqa: BLE001 - the reason this file is bad; the caller names it
                return error


class CpuDecoded(NamedTuple):
    """A picture `load_rgb_tensor` read after the device decoder refused the file: already upright."""

    picture: torch.Tensor


def resized_and_cropped(pictures: list[torch.Tensor], image_size: int) -> list[torch.Tensor]:
    """The evaluation transform (`transforms.EvalResizeAndCentreCrop`) of upright [3, H, W] pictures, one
    resize and crop per group of equal size instead of one per picture, in calls of at most
    `MAX_RESIZE_PIXELS` input pixels (on CUDA the resize works in float32: 12 bytes per pixel)."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for row, picture in enumerate(pictures):
        groups[tuple(picture.shape[-2:])].append(row)
    finished: list[torch.Tensor | None] = [None] * len(pictures)
    for (height, width), rows in groups.items():
        per_call = max(1, MAX_RESIZE_PIXELS // (height * width))
        for start in range(0, len(rows), per_call):
            call_rows = rows[start:start + per_call]
            # Stacked pixel by pixel (N, H, W, 3 in memory): one copy, in the layout the decoders return and the
            # uint8 resize kernel wants.
            stacked = torch.stack([pictures[row].permute(1, 2, 0) for row in call_rows]).permute(0, 3, 1, 2)
            resized = F.resize(stacked, eval_resize_size(image_size), antialias=True)
            cropped = F.center_crop(resized, [image_size, image_size])
            for position, row in enumerate(call_rows):
                finished[row] = cropped[position]
    return finished


def decoded_batch(batch: PendingBatch, decoder: JpegDecoder, image_size: int
                  ) -> tuple[torch.Tensor | None, list[int], list[tuple[int, BaseException, str]]]:
    """(images [B', 3, S, S] uint8 on the decoder's device, laid out channels-last as the CPU loader's batches
    are; the rows of the batch they are; [(row, error, path)] for the rows that could not be decoded)."""
    device = decoder.device
    jpegs = batch.jpegs()
    decoded_rows, decoded, failed = [], [], []
    for row, jpeg, result in zip(batch.jpeg_rows, jpegs, decoder(jpegs)):
        if isinstance(result, BaseException):
            failed.append((row, result, jpeg.path))
        elif isinstance(result, CpuDecoded):
            decoded_rows.append(row)
            decoded.append(result.picture.to(device))
        else:
            decoded_rows.append(row)
            decoded.append(upright(result, jpeg.orientation))
    pictures = dict(zip(decoded_rows, resized_and_cropped(decoded, image_size)))
    if batch.finished is not None:  # the worker's own pictures, copied over at once
        pictures.update(zip(batch.finished_rows, batch.finished.to(device, non_blocking=True)))
    kept = [row for row in range(batch.rows) if row in pictures]
    if not kept:
        return None, kept, failed
    images = torch.empty((len(kept), image_size, image_size, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    for position, row in enumerate(kept):
        images[position].copy_(pictures[row], non_blocking=True)
    return images, kept, failed


class DeviceDecodingLoader:
    """Iterates a DataLoader of `JpegBytesDataset` items (`collate_jpeg_bytes`) and yields what the CPU
    evaluation loader yields, `(images, labels, indices, skipped)`, with the images decoded on `device`.

    A JPEG that cannot be read raises `BadImageError` naming it, or, with skip_bad_images, is left out
    and listed in `skipped` as `(index, reason, detail)`, as the workers do for the files they decode.
    read_on_cpu: reads a file the device decoder refuses (`JpegBytesDataset.read_decoded`).

    On CUDA the batches are decoded and resized on a stream of their own (one per pass), idle when nvjpeg starts:
    torchvision 0.29's CUDA decoder writes its outputs from a private stream that does not wait for the
    stream they were allocated on (pytorch/vision#9606), so memory freed on that stream with reads still
    queued could be overwritten. The forward, queued on the current stream, does not hold that stream up:
    batch i+1 is decoded while batch i's forward may still run. The images are handed over with
    `wait_stream` and `record_stream`. `bench/gpu_session.sh`'s e2e_device_decode step measures the overlap.
    """

    def __init__(self, source_loader, device: torch.device, image_size: int, skip_bad_images: bool,
                 read_on_cpu: Callable[[str], torch.Tensor] = load_rgb_tensor) -> None:
        if decode_jpeg is None:  # pragma: no cover - a future torchvision without its decoders
            raise RuntimeError("data.eval_decode=device needs torchvision.io.decode_jpeg (torchvision <= 0.29)")
        self.source_loader, self.device, self.decoder = source_loader, device, JpegDecoder(device, read_on_cpu)
        self.image_size, self.skip_bad_images = image_size, skip_bad_images
        self.batch_size, self.dataset = source_loader.batch_size, source_loader.dataset

    def decoded(self, batch: PendingBatch, decode_stream) -> tuple:
        if decode_stream is None:
            return decoded_batch(batch, self.decoder, self.image_size)
        decode_stream.synchronize()  # the last batch's decode and resize are done: its freed memory is free
        with torch.cuda.stream(decode_stream):
            images, kept, failed = decoded_batch(batch, self.decoder, self.image_size)
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_stream(decode_stream)
        if images is not None:
            images.record_stream(consumer)  # not reused for a later batch while the forward still reads it
        return images, kept, failed

    def __len__(self) -> int:
        return len(self.source_loader)

    def __iter__(self) -> Iterator[tuple]:
        decode_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        for batch, labels, indices, skipped in self.source_loader:
            if batch is None:
                yield None, labels, indices, skipped
                continue
            images, kept, failed = self.decoded(batch, decode_stream)
            for row, error, path in failed:
                reason, detail = describe_image_error(path, error)
                if not self.skip_bad_images:
                    raise BadImageError(bad_image_message(path, reason, detail))
                skipped = skipped + [(int(indices[row]), reason, detail)]
            yield images, labels[kept], indices[kept], skipped
