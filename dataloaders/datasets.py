"""A map-style dataset of image files with integer labels, and the handling of the processes that read them."""

import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset, default_collate

from .image_files import MAX_IMAGE_BYTES, BadImageError, bad_image_message, describe_image_error, load_rgb_tensor
from .image_lists import ImageList


class SkippedImage(NamedTuple):
    """Stands in for the image of an item that could not be read, when bad images are skipped."""

    reason: str
    detail: str


class ImageDataset(Dataset):
    """Items `(image, label, index)` of an ImageList.

    image: whatever `transform` returns for the upright RGB picture of `image_files.load_rgb_tensor`, a
    uint8 tensor [3, H, W] (EXIF rotation applied; grey, CMYK, palette, 16-bit converted; transparency on
    white). With `build_transforms`, uint8 [3, S, S].
    label: int class label. index: int position in the list, so a caller can match embeddings back to
    files and spot two views of the same image in a batch.

    The transform is built once by the caller and shared by every item (and every worker).
    decode_size: when set, JPEGs are decoded at reduced scale, keeping a short side >= decode_size
    (see `transforms.decode_size`).
    skip_bad_images: an image that cannot be read (missing, empty, truncated, too large...) raises
    `BadImageError` naming the file (False), or comes back as a `SkippedImage(reason, detail)` in place
    of the image (True), which `collate_skipping_bad_images` drops from the batch and reports.
    allow_outside_root, max_image_bytes: a file whose real location leaves the list's root (unless allowed),
    a FIFO or device, or a file above max_image_bytes is a bad image too, refused before it is read
    (`image_files.open_image_file`).
    """

    def __init__(self, image_list: ImageList, transform: Callable, decode_size: int | None = None,
                 skip_bad_images: bool = False, allow_outside_root: bool = False,
                 max_image_bytes: int = MAX_IMAGE_BYTES) -> None:
        self.image_list = image_list
        self.transform = transform
        self.decode_size = decode_size
        self.skip_bad_images = skip_bad_images
        self.confine_to = None if allow_outside_root else image_list.root
        self.max_image_bytes = max_image_bytes

    def __len__(self) -> int:
        return len(self.image_list)

    def __getitem__(self, index: int):
        path = self.image_list.root / self.image_list.paths[index]
        label = int(self.image_list.labels[index])
        try:
            picture = self.read(path)
        except Exception as error:  # noqa: BLE001 - any decoder error means this file is bad; name it
            reason, detail = describe_image_error(path, error)
            if not self.skip_bad_images:
                raise BadImageError(bad_image_message(path, reason, detail)) from None
            return SkippedImage(reason, detail), label, int(index)
        return self.finish(picture), label, int(index)

    def read(self, path):
        """The file's upright RGB picture; raises on a bad file (a subclass may read less, see device_decode)."""
        return load_rgb_tensor(path, self.decode_size, root=self.confine_to, max_bytes=self.max_image_bytes)

    def finish(self, picture):
        """What the item carries for `read`'s picture: the transformed picture. Outside the bad-file handling,
        so a transform's own bug is raised, not reported as a bad image."""
        return self.transform(picture)


def collate_skipping_bad_images(items: list[tuple], batch_pictures: Callable[[list], Any] | None = None
                                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, list]:
    """Batch `(image, label, index)` items, leaving out those whose image is a `SkippedImage`.

    Returns (images [B', ...] or None when every item was skipped, labels [B'], indices [B'],
    skipped = [(index, reason, detail), ...]). Each kept label travels with its own image and index, so
    a skipped item never shifts another item's label. batch_pictures: what makes the kept pictures one batch
    (`stack_pictures` by default; `device_decode.pending_batch` for pictures still to be decoded).
    """
    kept = [item for item in items if not isinstance(item[0], SkippedImage)]
    skipped = [(index, image.reason, image.detail) for image, _, index in items if isinstance(image, SkippedImage)]
    if not kept:
        return None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped
    pictures, labels, indices = zip(*kept)
    images = (batch_pictures or stack_pictures)(list(pictures))
    labels, indices = torch.tensor(labels), torch.tensor(indices)
    return images, labels, indices, skipped


def stack_pictures(pictures: list[torch.Tensor]) -> torch.Tensor:
    """[3, H, W] uint8 pictures -> one [B, 3, H, W] batch laid out channels-last (B, H, W, 3 in memory).

    The transforms return channels-last pictures, so this is a plain copy of each into the batch (in a
    loader worker, straight into shared memory, as `default_collate` does); stacking them as [B, 3, H, W]
    would transpose every pixel (0.1 ms per 256-px picture here). The model takes either layout.
    """
    return default_collate([picture.permute(1, 2, 0) for picture in pictures]).permute(0, 3, 1, 2)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: workers ignore SIGTERM/SIGINT, which SLURM and Ctrl-C also send to them.

    The main process receives them too and stops at the next step boundary, saving a checkpoint; a
    worker killed first would instead make the loader raise in the middle of a step.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def stop_loader_workers(*loaders) -> None:
    """Shut down the persistent worker processes of DataLoaders now, however the run ended.

    Needed because workers ignore SIGTERM (`ignore_stop_signals`): when a run ends by an exception, the
    loader's iterator lives on in the traceback's reference cycle, and at exit multiprocessing's
    terminate() (a SIGTERM) cannot stop the workers, so its join() would wait forever. (PyTorch cleans
    persistent workers up at exit itself only when pin_memory is on.) Uses the DataLoader's private
    `_iterator`, the documented home of persistent workers, since there is no public close().
    """
    for loader in loaders:
        loader = getattr(loader, "source_loader", loader)  # device_decode.DeviceDecodingLoader wraps one
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


def map_in_worker_processes(function: Callable, items: list, workers: int, chunksize: int = 1) -> list:
    """`[function(item) for item in items]`, computed by `workers` processes (sent `chunksize` items at a
    time); no process outlives the call.

    The workers ignore SIGTERM/SIGINT (`ignore_stop_signals`): this process decides. When anything stops it
    here (an exception, a stop signal's handler raising), the work not started is cancelled and the workers
    are killed before the exception goes on, rather than left running their chunks, or orphaned at exit.
    """
    pool = ProcessPoolExecutor(workers, initializer=ignore_stop_signals)
    try:
        return list(pool.map(function, items, chunksize=chunksize))
    except BaseException:
        # `_processes` is private, but the only handle on the workers before Python 3.14's kill_workers().
        processes = list((pool._processes or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()  # SIGKILL: they ignore SIGTERM
        for process in processes:
            process.join()
        raise
    finally:
        pool.shutdown(wait=True)
