"""The run folder's record of images left out because they could not be read (`data.on_bad_image=skip`)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .image_lists import ImageList

SKIPPED_IMAGES_FILE = "skipped_images.jsonl"


class SkippedImageLog:
    """Appends one JSON line per skipped image to `path`, once per (split, image path), and counts them.

    A line: {"split": "train", "path": "<relative to the split's root>", "reason": "truncated",
    "detail": "...", "when": "startup check" | "epoch 3" | ...}. Lines already in the file (a resumed
    run) are read back, so an image is listed once however often it is met.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[tuple[str, str], dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[(entry["split"], entry["path"])] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a kill mid-append: that image is listed again when met

    def record(self, split: str, image_list: ImageList, skipped: list[tuple[int, str, str]], when: str) -> int:
        """Note `skipped` = [(index into image_list, reason, detail), ...]; returns how many were new."""
        new_entries = []
        for index, reason, detail in skipped:
            relative_path = image_list.paths[index]
            if (split, relative_path) not in self.entries:
                entry = {"split": split, "path": relative_path, "reason": reason, "detail": detail, "when": when}
                self.entries[(split, relative_path)] = entry
                new_entries.append(entry)
        if new_entries:
            with open(self.path, "ab+") as stream:
                stream.seek(0, 2)
                if stream.tell() > 0:  # a torn last line must not swallow the next record
                    stream.seek(-1, 2)
                    if stream.read(1) != b"\n":
                        stream.write(b"\n")
                stream.write("".join(json.dumps(entry) + "\n" for entry in new_entries).encode())
        return len(new_entries)

    def count(self, split: str | None = None) -> int:
        return sum(1 for entry_split, _ in self.entries if split is None or entry_split == split)

    def counts_by_reason(self, split: str | None = None) -> dict[str, int]:
        return dict(Counter(entry["reason"] for (entry_split, _), entry in self.entries.items()
                            if split is None or entry_split == split))
