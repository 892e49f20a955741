"""Image lists: which files make up a dataset and their labels, read from SOP list files or folders.

Nothing here opens an image: a list is only paths and integer labels, so a 120k-image dataset is
read in well under a second and can be checked before any heavy work starts.

Paths stay inside the root: a list line that leads out of it (`..`, an absolute path) and a folder-tree
entry that is a symlink out of it are refused, unless `allow_outside_root`. Symlinks named by list lines
are not resolved here (one `realpath` per line would cost seconds for SOP on a network drive): opening an
image checks them (`image_files.open_image_file`). Names holding control or line-break characters are
refused, so every output that writes one path per line stays paired with its rows.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOP_HEADER = ("image_id", "class_id", "super_class_id", "path")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# ASCII digits only: int() would also accept "1_000", " 7" and non-ASCII digits.
_INTEGER = re.compile(r"[+-]?[0-9]+")
# C0 and C1 controls (newline, carriage return, escape...), Unicode line and paragraph separators, and the
# lone surrogates that stand for undecodable bytes in a file name.
_UNSAFE_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_UNSAFE_IN_LIST_LINE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")  # tabs separate columns
OUTSIDE_ROOT_HINT = "set data.allow_outside_root=true if the list is meant to reach another folder"


class DataFormatError(ValueError):
    """A dataset list or folder is malformed. The message is one line and names the file (and line)."""


@dataclass(frozen=True, eq=False)
class ImageList:
    """N images: paths relative to `root`, with class and super-class labels.

    Attributes:
        root: directory the paths are relative to.
        paths: N relative paths (POSIX separators), in list order.
        labels: int64 [N], class ids as the source gives them (SOP: 1-based file ids; folder tree:
            0..C-1). Not remapped, so `subset` keeps ids comparable across splits.
        super_labels: int64 [N], super-class ids; zeros when the source has none.
        class_names: folder names indexed by class id (folder trees only); () when unknown.

    Arrays are copied to int64 on construction, so later changes to the caller's arrays do not leak in.
    """

    root: Path
    paths: tuple[str, ...]
    labels: np.ndarray
    super_labels: np.ndarray
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # frozen=True forbids plain assignment; normalising the fields once here is still safe.
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "paths", tuple(str(p) for p in self.paths))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        for name in ("labels", "super_labels"):
            object.__setattr__(self, name, _as_int64_vector(getattr(self, name), name))
        n = len(self.paths)
        if len(self.labels) != n or len(self.super_labels) != n:
            raise ValueError(
                f"ImageList: {n} paths but {len(self.labels)} labels and "
                f"{len(self.super_labels)} super_labels"
            )

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Number of distinct labels present (not max label + 1)."""
        return int(np.unique(self.labels).size)

    def subset(self, indices: np.ndarray | Sequence[int]) -> ImageList:
        """The images at integer `indices` [M], in that order; labels keep their ids."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return ImageList(
            root=self.root,
            paths=tuple(self.paths[i] for i in idx.tolist()),
            labels=self.labels[idx],
            super_labels=self.super_labels[idx],
            class_names=self.class_names,
        )


def read_sop_list(list_path: Path, root: Path, allow_outside_root: bool = False) -> ImageList:
    """Read a Stanford Online Products list (`Ebay_train.txt` / `Ebay_test.txt`).

    Format: a header line `image_id class_id super_class_id path`, then one line per image with the
    same four whitespace-separated columns; ids are integers >= 1, the path is relative to `root`.
    UTF-8, with or without a byte-order mark; lines end with LF or CRLF.

    Corner cases:
        - blank lines at the end of the file are ignored; a blank line before data is an error;
        - a header-only file is an error (a split with no images is never what was meant);
        - a path that leads outside `root` as written (absolute, or `..` reaching above it) is an error
          unless `allow_outside_root`; symlinks are not resolved here (see the module docstring);
        - a line holding a control or line-break character (other than tabs between columns) is an error;
        - images are not opened or checked for existence.

    Raises:
        DataFormatError: "<list_path>:<line number>: <what is wrong>: <line>", line numbers 1-based
            and counting the header; or naming the path when the file is missing or unreadable.
    """
    list_path = Path(list_path)
    try:
        # newline="": a carriage return inside a line is kept, to be refused, not read as a line break;
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the header.
        with open(list_path, encoding="utf-8-sig", newline="") as stream:
            text = stream.read()
    except FileNotFoundError:
        raise DataFormatError(f"{list_path}: list file not found") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as error:
        raise DataFormatError(f"{list_path}: cannot read list file: {error}") from None

    # Split on LF only, so line numbers are an editor's even when a line holds another line break.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise DataFormatError(f"{list_path}: empty file, expected header {' '.join(SOP_HEADER)!r}")
    if tuple(lines[0].split()) != SOP_HEADER:
        raise DataFormatError(
            f"{list_path}:1: expected header {' '.join(SOP_HEADER)!r}: {lines[0]!r}"
        )

    paths, labels, super_labels = [], [], []
    for line_number, line in enumerate(lines[1:], start=2):
        fields = line.split()

        def fail(what: str) -> DataFormatError:
            return DataFormatError(f"{list_path}:{line_number}: {what}: {line!r}")

        unsafe = _UNSAFE_IN_LIST_LINE.search(line)
        if unsafe:
            raise fail(f"control or line-break character {unsafe.group()!r} (not allowed in file names)")
        if len(fields) != len(SOP_HEADER):
            raise fail(f"expected {len(SOP_HEADER)} columns, found {len(fields)}")
        ids = []
        for column, token in zip(SOP_HEADER[:3], fields[:3]):
            if not _INTEGER.fullmatch(token):
                raise fail(f"{column} is not an integer ({token!r})")
            if int(token) < 1:
                raise fail(f"{column} must be >= 1 (ids are 1-based), got {int(token)}")
            ids.append(int(token))
        if not allow_outside_root and _leaves_root_as_written(fields[3]):
            raise fail(f"path leads outside the image root {root} ({OUTSIDE_ROOT_HINT})")
        labels.append(ids[1])
        super_labels.append(ids[2])
        paths.append(fields[3])

    if not paths:
        raise DataFormatError(f"{list_path}: header only, the list has no images")
    return ImageList(Path(root), tuple(paths), np.array(labels), np.array(super_labels))


def write_sop_list(
    list_path: Path,
    paths: Sequence[str],
    labels: np.ndarray | Sequence[int],
    super_labels: np.ndarray | Sequence[int] | None = None,
) -> None:
    """Write a list in the SOP format that `read_sop_list` reads back unchanged.

    image_id is 1-based list order; class and super-class ids are written as given (all must be >= 1,
    as in SOP). `super_labels=None` writes super-class 1 for every image. Parent directories are created.

    Raises:
        ValueError: lengths differ, an id < 1, or a path that is empty or contains whitespace (the
            format is whitespace-separated, so such a path could not be read back).
    """
    labels = _as_int64_vector(labels, "labels")
    supers = np.ones_like(labels) if super_labels is None else _as_int64_vector(super_labels, "super_labels")
    if not (len(paths) == len(labels) == len(supers)):
        raise ValueError(
            f"write_sop_list: {len(paths)} paths, {len(labels)} labels, {len(supers)} super_labels"
        )
    for name, ids in (("labels", labels), ("super_labels", supers)):
        if ids.size and ids.min() < 1:
            raise ValueError(f"write_sop_list: SOP ids are 1-based, {name} has {int(ids.min())}")
    lines = [" ".join(SOP_HEADER)]
    for image_id, (path, label, super_label) in enumerate(zip(paths, labels.tolist(), supers.tolist()), 1):
        path = str(path)
        if not path or len(path.split()) != 1:
            raise ValueError(f"write_sop_list: path must be non-empty without whitespace: {path!r}")
        lines.append(f"{image_id} {label} {super_label} {path}")
    list_path = Path(list_path)
    list_path.parent.mkdir(parents=True, exist_ok=True)
    list_path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_folder_tree(root: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                     allow_outside_root: bool = False) -> ImageList:
    """Read `root/<class_name>/<image>` into an ImageList.

    Class ids are 0..C-1 in sorted class-folder-name order, and `class_names[id]` is the folder name.
    Files are sorted by name within a class. Only files directly inside a class folder whose suffix
    matches `extensions` (case-insensitive, so SOP's ".JPG" counts) are images; other files, files
    directly in `root`, and hidden entries (".name") are ignored. Folders holding no image are not
    classes, so every id in 0..C-1 has at least one image. super_labels are zeros.

    Corner cases: a class folder or image that is a symlink is followed when its target stays inside
    `root` (only symlinks are resolved: one `realpath` each), and refused when it leaves `root`, unless
    `allow_outside_root`. A class or image name holding a control or line-break character is refused.

    Raises:
        DataFormatError: root is not a directory, no class folder holds an image, an entry leaves the
            root, or a name holds a control character; the message names the entry.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataFormatError(f"{root}: image folder not found (expected root/<class_name>/<image>)")
    suffixes = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    real_root = os.path.realpath(root)

    def refuse_leaving_root(entry: os.DirEntry) -> None:
        if not allow_outside_root and entry.is_symlink():
            target = os.path.realpath(entry.path)
            if not is_inside(target, real_root):
                raise DataFormatError(f"{entry.path}: symlink to {target}, outside the image root {root} "
                                      f"({OUTSIDE_ROOT_HINT})")

    def refuse_control_characters(relative: str) -> None:
        unsafe = _UNSAFE_CHARACTER.search(relative)
        if unsafe:
            raise DataFormatError(f"{root}: name holds the control or line-break character {unsafe.group()!r}, "
                                  f"not allowed in file names: {relative!r}")

    class_names, paths, labels = [], [], []
    with os.scandir(root) as entries:  # DirEntry's type tests need no stat call, except for symlinks
        class_dirs = sorted((d for d in entries if not d.name.startswith(".") and d.is_dir()), key=lambda d: d.name)
    for class_dir in class_dirs:
        refuse_leaving_root(class_dir)  # before listing it: nothing outside the root is read
        with os.scandir(class_dir.path) as entries:
            files = sorted((f for f in entries if not f.name.startswith(".")
                            and os.path.splitext(f.name)[1].lower() in suffixes and f.is_file()),
                           key=lambda f: f.name)
        if not files:
            continue
        for file in files:
            refuse_leaving_root(file)
            refuse_control_characters(f"{class_dir.name}/{file.name}")
        paths += [f"{class_dir.name}/{file.name}" for file in files]
        labels += [len(class_names)] * len(files)
        class_names.append(class_dir.name)

    if not paths:
        raise DataFormatError(
            f"{root}: no class folders with images ({', '.join(sorted(suffixes))}); "
            "expected root/<class_name>/<image>"
        )
    return ImageList(
        root, tuple(paths), np.array(labels), np.zeros(len(paths), dtype=np.int64), tuple(class_names)
    )


def is_inside(path: str, root: str) -> bool:
    """Whether the absolute `path` is `root` or lies below it (both already resolved: no symlink is followed)."""
    return os.path.commonpath([path, root]) == root


def _leaves_root_as_written(relative: str) -> bool:
    """An absolute path, or one whose `..` reach above the root, read as text (symlinks aside)."""
    normal = posixpath.normpath(relative)
    return posixpath.isabs(normal) or normal == ".." or normal.startswith("../")


def _as_int64_vector(values, name: str) -> np.ndarray:
    """Copy `values` to a 1-D int64 array; refuse non-integer data instead of truncating it."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=True)
