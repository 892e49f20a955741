"""A map-style dataset of image files with integer labels."""

import signal
from collections.abc import Callable

from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .image_lists import ImageList


class ImageDataset(Dataset):
    """Items `(image, label, index)` of an ImageList.

    image: whatever `transform` returns for an upright RGB PIL image (with `build_transforms`, uint8
    [3, S, S]). Photos are rotated by their EXIF orientation first, so a phone picture stored sideways
    is seen upright, as in a viewer. Grey, palette and RGBA images become RGB (alpha dropped).
    label: int class label. index: int position in the list, so a caller can match embeddings back to
    files and spot two views of the same image in a batch.

    The transform is built once by the caller and shared by every item (and every worker).
    decode_size: when set, JPEGs are decoded at reduced scale, keeping a short side >= decode_size
    (see `transforms.decode_size`).
    """

    def __init__(self, image_list: ImageList, transform: Callable, decode_size: int | None = None) -> None:
        self.image_list = image_list
        self.transform = transform
        self.decode_size = decode_size

    def __len__(self) -> int:
        return len(self.image_list)

    def __getitem__(self, index: int):
        path = self.image_list.root / self.image_list.paths[index]
        with Image.open(path) as image:
            if self.decode_size:
                # JPEG only: decode at 1/2, 1/4 or 1/8 scale when the result still has a short side of
                # at least decode_size. Much cheaper than decoding at full size and resizing down.
                image.draft("RGB", (self.decode_size, self.decode_size))
            image = ImageOps.exif_transpose(image).convert("RGB")
        return self.transform(image), int(self.image_list.labels[index]), int(index)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader worker_init_fn: workers ignore SIGTERM/SIGINT, which SLURM and Ctrl-C also send to them.

    The main process receives them too and stops at the next step boundary, saving a checkpoint; a
    worker killed first would instead make the loader raise in the middle of a step.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
