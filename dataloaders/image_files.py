"""Opening one image file: as an upright 8-bit RGB picture, or with a precise reason why not.

Every path that decodes images (training and evaluation items, the data check, the cache builder) goes
through `load_rgb_image` or `load_rgb_tensor`, and so through `open_image_file`: a file is read the same way
everywhere, only once it is known to be a regular file of sensible size inside its dataset root, and
`describe_image_error` names the failure the same way everywhere.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.v2.functional import pil_to_tensor

from .image_lists import is_inside

try:  # torchvision 0.29 (pinned) deprecates its image decoders in favour of TorchCodec; PIL covers their loss
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - a future torchvision
    decode_jpeg = None

# Reasons an image is bad, as they appear in reports and skip lists.
MISSING, EMPTY, NOT_AN_IMAGE, TRUNCATED, CORRUPT, TOO_LARGE = (
    "missing", "empty", "not_an_image", "truncated", "corrupt", "too_large",
)
NOT_A_FILE, OUTSIDE_ROOT = "not_a_file", "outside_root"
MAX_IMAGE_BYTES = 100_000_000  # the default of data.max_image_bytes: far above any photo, far below the RAM
ALPHA_BACKGROUND = (255, 255, 255)  # what a viewer shows behind transparent pixels on a white page


class RefusedImageFile(Exception):
    """A file that `open_image_file` would not open, for `reason` (one of the reasons above) and `detail`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason} ({detail})")
        self.reason, self.detail = reason, detail


class BadImageError(OSError):
    """An image could not be read; the message is `PATH: reason (detail)`.

    A DataLoader worker re-raises this in the main process as `BadImageError(<worker traceback>)`,
    whose last line is `...BadImageError: PATH: reason (detail)`; `one_line` recovers that line.
    """

    def one_line(self) -> str:
        last = str(self).strip().splitlines()[-1] if str(self).strip() else ""
        marker = "BadImageError: "
        return last.split(marker, 1)[1] if marker in last else last


@functools.lru_cache(maxsize=64)
def _real_root(root: str) -> str:
    return os.path.realpath(root)


def _refuse_unless_regular(status: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(status.st_mode):  # a FIFO would block the reader, /dev/zero never ends
        kind = ("directory" if stat.S_ISDIR(status.st_mode) else "FIFO" if stat.S_ISFIFO(status.st_mode)
                else "device" if stat.S_ISCHR(status.st_mode) or stat.S_ISBLK(status.st_mode) else "socket or other")
        raise RefusedImageFile(NOT_A_FILE, f"a {kind}, not a regular file")
    if status.st_size == 0:
        raise RefusedImageFile(EMPTY, "0 bytes")
    if status.st_size > max_bytes:
        raise RefusedImageFile(TOO_LARGE, f"{status.st_size} bytes, above the limit of {max_bytes} "
                                          f"(data.max_image_bytes)")


@contextmanager
def open_image_file(path: Path, root: Path | None = None, max_bytes: int = MAX_IMAGE_BYTES) -> Iterator:
    """`path` opened for binary reading, once the checks that need no read have passed.

    Raises RefusedImageFile, before anything is read, for a file that is not a regular file ("not_a_file":
    FIFOs, devices, directories, which are never opened, so a FIFO cannot block), an empty one ("empty"),
    one above `max_bytes` ("too_large"), or, when `root` is given, one whose real location (symlinks
    followed) is outside `root` ("outside_root"). A missing file raises FileNotFoundError.

    Resolving the symlinks costs a few system calls per image, nothing beside decoding it; the file is
    checked again once open, so a file swapped for a FIFO in between is refused too.
    """
    path = os.fspath(path)
    if root is not None:
        real_path, real_root = os.path.realpath(path), _real_root(os.fspath(root))
        if not is_inside(real_path, real_root):
            raise RefusedImageFile(OUTSIDE_ROOT, f"resolves to {real_path}, outside the image root {real_root}; "
                                                 f"data.allow_outside_root=true allows it")
        path = real_path  # what was checked is what is opened
    _refuse_unless_regular(os.stat(path), max_bytes)
    with open(path, "rb", opener=_open_without_blocking) as stream:
        _refuse_unless_regular(os.fstat(stream.fileno()), max_bytes)
        yield stream


def _open_without_blocking(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NONBLOCK)  # a FIFO slipped in after the stat would otherwise block


def load_rgb_image(path: Path, draft_size: int | None = None, decode: bool = True, root: Path | None = None,
                   max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """The image at `path` as an upright RGB PIL image; raises on any problem (see `describe_image_error`).

    - EXIF orientation is applied, so a phone photo stored sideways comes out as a viewer shows it.
    - Grey, 1-bit, CMYK and YCbCr become RGB; 16-bit and 32-bit grey is scaled to 8 bits (PIL's own
      conversion would clip everything above 255 to white); transparent pixels are composited on white.
    - A file with more pixels than PIL's decompression-bomb limit (`Image.MAX_IMAGE_PIXELS`) raises, also
      below the 2x limit where PIL only warns: no real photo comes near it.
    - draft_size: JPEGs are decoded at 1/2, 1/4 or 1/8 scale when the short side stays >= draft_size
      (much cheaper than decoding at full size and resizing down).
    - decode=False: only the header is read (format, size, pixel limit) and the file is returned
      undecoded; for quick checks.
    - root, max_bytes: the file is refused before it is read when it leaves `root` (None: anywhere) or is
      not a regular file of at most `max_bytes` (`open_image_file`).
    """
    with open_image_file(path, root, max_bytes) as stream, _open_header(stream) as image:
        return _decode_upright_rgb(image, draft_size) if decode else image


def load_rgb_tensor(path: Path, draft_size: int | None = None, root: Path | None = None,
                    max_bytes: int = MAX_IMAGE_BYTES) -> torch.Tensor:
    """The picture of `load_rgb_image`, as a uint8 tensor [3, H, W]: what the training and evaluation items use.

    The file is opened as `load_rgb_image` opens it (`root`, `max_bytes`) and its header is read first, so a
    file that is no image is refused after a few KB. A JPEG that would be decoded at full size anyway (no
    draft reduction possible: short side below 2 x draft_size) is then read whole and decoded by
    torchvision's libjpeg-turbo decoder straight into a tensor, EXIF rotation included: 1.3x faster per image
    than PIL's decode plus the PIL-to-tensor copy on SOP-sized photos (2-core machine, bench/data_bench.py).
    The decompression-bomb limit holds (PIL read the header), and if torchvision refuses a file, PIL decides
    (so a bad file gets PIL's reason, as in the data check). Everything else (PNG, WebP, large JPEGs worth a
    draft decode, unusual JPEG modes) is decoded by PIL from the same open file.
    """
    with open_image_file(path, root, max_bytes) as stream, _open_header(stream) as image:
        full_size_jpeg = (image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK")
                          and not reduced_scale(image, draft_size))
        if full_size_jpeg and decode_jpeg is not None:
            stream.seek(0)
            data = stream.read(max_bytes)  # bounded even if the file grew since it was checked
            try:
                with warnings.catch_warnings():
                    # Its deprecation notice comes with every call, in every worker; the pinned version works.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                                       apply_exif_orientation=True)
            except RuntimeError:
                pass  # let PIL decode it, or name what is wrong with it
        return pil_to_tensor(_decode_upright_rgb(image, draft_size))


EXIF_ORIENTATION_TAG = 0x0112


def read_jpeg_bytes(path: Path, draft_size: int | None = None, root: Path | None = None,
                    max_bytes: int = MAX_IMAGE_BYTES) -> tuple[torch.Tensor, int] | None:
    """(the file's bytes as a uint8 tensor, its EXIF orientation 1-8) for a colour JPEG that `load_rgb_tensor`
    would decode at full size, so another decoder (nvjpeg, `dataloaders.device_decode`) can give the same
    picture; None for anything else, which the caller decodes with `load_rgb_tensor`: other formats, grey or
    CMYK JPEGs, and JPEGs it decodes at reduced scale (short side >= 2 x draft_size), which costs less there.

    The file is opened and its header read as `load_rgb_tensor` does (`root`, `max_bytes`, the
    decompression-bomb limit), so a bad file raises the same errors here.
    """
    with open_image_file(path, root, max_bytes) as stream, _open_header(stream) as image:
        if image.format != "JPEG" or image.mode != "RGB" or reduced_scale(image, draft_size):
            return None
        orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
        stream.seek(0)
        data = stream.read(max_bytes)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8), (orientation if orientation in range(1, 9) else 1)


def reduced_scale(image: Image.Image, draft_size: int | None) -> bool:
    """Whether a JPEG is decoded at 1/2, 1/4 or 1/8 scale (`_decode_upright_rgb`'s draft), which costs much less than
    a full decode: when its short side is at least twice draft_size."""
    return bool(draft_size) and min(image.size) >= 2 * draft_size


def _open_header(source) -> Image.Image:
    """PIL's lazy open (header only), with the decompression-bomb warning raised as an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        return Image.open(source)


def _decode_upright_rgb(image: Image.Image, draft_size: int | None) -> Image.Image:
    if draft_size:
        image.draft("RGB", (draft_size, draft_size))
    return to_rgb(ImageOps.exif_transpose(image))


# Errors that say something about the machine, not the file: never a reason to skip an image for good.
SYSTEM_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EIO, errno.ENOSPC, errno.ESTALE, errno.EAGAIN}


def is_system_error(error: BaseException) -> bool:
    """True for out-of-memory and for OS errors such as too many open files or an I/O error, which come and
    go with the machine or a network filesystem: these are raised as they are, not reported as bad images."""
    return isinstance(error, MemoryError) or (isinstance(error, OSError) and error.errno in SYSTEM_ERRNOS)


def to_rgb(image: Image.Image) -> Image.Image:
    """A decoded PIL image of any mode as 8-bit RGB, the way every image file is read (see `load_rgb_image`)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = _high_depth_to_8_bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer or float grey -> 8-bit grey ("L", or "LA" when a transparent value is set).

    The scale follows the mode, never the picture, so two similar images stay similar: integer modes are
    read as 16-bit (0..65535, the depth of 16-bit PNGs and scans; older Pillows open those as "I"), float
    as fractions of white (0..1). Values outside the range are clipped.
    """
    values = np.asarray(image, dtype=np.float64)
    scaled = values * 255.0 if image.mode == "F" else values / 257.0  # 65535 -> 255
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    transparent_value = image.info.get("transparency")
    if isinstance(transparent_value, (int, float)):  # a tRNS colour key: compare at full depth, not after rounding
        alpha = Image.fromarray(np.where(values == transparent_value, 0, 255).astype(np.uint8), mode="L")
        grey = Image.merge("LA", (grey, alpha))
    return grey


def describe_image_error(path: Path, error: BaseException) -> tuple[str, str]:
    """(reason, detail) for a failure of `load_rgb_image(path)`; a system error (`is_system_error`) is
    raised again instead, since it says nothing about the file.

    Reasons: "missing" (no such file), "not_a_file" (a FIFO, device or directory), "outside_root" (a symlink
    out of the dataset root), "empty" (zero bytes), "not_an_image" (PIL does not recognise the format),
    "too_large" (above max_bytes, or the decompression-bomb limit), "truncated" (the data ends early),
    "corrupt" (any other decoding error; the detail keeps the exception's type and message).
    """
    if is_system_error(error):
        raise error
    if isinstance(error, RefusedImageFile):
        return error.reason, error.detail
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as stat_error:
        return MISSING, f"{type(stat_error).__name__}: {stat_error.strerror or stat_error}"
    if not path.is_file():
        return NOT_A_FILE, "not a regular file"
    if size == 0:
        return EMPTY, "0 bytes"
    if isinstance(error, UnidentifiedImageError):  # PIL's message names the stream object, not the file
        return NOT_AN_IMAGE, "PIL recognises no image format in it"
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return TOO_LARGE, str(error)
    message = f"{type(error).__name__}: {error}"
    return (TRUNCATED if "truncated" in message.lower() else CORRUPT), message


def bad_image_message(path: Path, reason: str, detail: str) -> str:
    return f"{path}: {reason} ({detail})"
