"""Pictures of a run: a grid of queries and their retrieved neighbours, and metric curves as PNG files.

Plain arguments only (arrays, paths, ints), so the pictures can be drawn from a saved report,
`metrics.jsonl` history or `test_embeddings.npy` without a model. Every PNG is written to a temporary
name beside its destination and then renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator
from PIL import Image, ImageDraw, ImageFont, ImageOps

from dataloaders.image_files import load_rgb_image

QUERY_COLOUR = (40, 100, 220)
CORRECT_COLOUR = (30, 160, 60)
WRONG_COLOUR = (215, 40, 40)
MISSING_COLOUR = (160, 160, 160)
BACKGROUND_COLOUR = (255, 255, 255)
TEXT_COLOUR = (20, 20, 20)
BORDER = 4  # pixels of coloured frame around each thumbnail
PAD = 6  # pixels between tiles and around the grid
QUERY_GAP = 12  # extra pixels between the query column and its results
CAPTION_LINES = 2

_RECALL_KEY = re.compile(r"recall@([0-9]+)")


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a retrieval grid: `rows` queries, each followed by `k` results.

    A tile is a thumbnail inside a BORDER-wide frame with CAPTION_LINES of text below it. Tiles are
    PAD apart, the grid has a PAD margin, and the query column is QUERY_GAP further from the results.
    """

    rows: int
    k: int
    thumbnail_size: int

    @property
    def font_size(self) -> int:
        return max(10, self.thumbnail_size // 8)

    @property
    def line_height(self) -> int:
        return self.font_size + 2

    @property
    def tile_width(self) -> int:
        return self.thumbnail_size + 2 * BORDER

    @property
    def tile_height(self) -> int:
        return self.tile_width + CAPTION_LINES * self.line_height + 4

    @property
    def size(self) -> tuple[int, int]:
        columns = 1 + self.k
        width = columns * self.tile_width + (columns + 1) * PAD + QUERY_GAP
        height = self.rows * self.tile_height + (self.rows + 1) * PAD
        return width, height

    def tile_origin(self, row: int, column: int) -> tuple[int, int]:
        """Top-left pixel of the frame of tile (row, column); column 0 is the query."""
        x = PAD + column * (self.tile_width + PAD) + (QUERY_GAP if column > 0 else 0)
        y = PAD + row * (self.tile_height + PAD)
        return x, y


def retrieval_grid(
    query_indices: np.ndarray,
    neighbour_indices: np.ndarray,
    neighbour_scores: np.ndarray,
    labels: np.ndarray,
    image_paths: list[Path],
    output_path: Path,
    thumbnail_size: int = 96,
    class_names: tuple[str, ...] | list[str] = (),
) -> Path:
    """Draw one row per query: the query (blue frame), then its top-k results in rank order.

    A result's frame is green when its label equals the query's, red otherwise, and grey when the query's
    label is unknown (negative: a search by an outside image). Captions give the
    class (its name when `class_names` has it, else `class <id>`), and for results the distance on the unit sphere, sqrt(max(0, 2 - 2 * score)), which
    assumes the scores are inner products of L2-normalised embeddings.

    Args:
        query_indices: [Q] int, items (indices into `labels` / `image_paths`) shown as queries.
        neighbour_indices: [Q, k] int, each query's results, best first (e.g. rows of
            `retrieval.nearest_neighbours`' indices at `query_indices`).
        neighbour_scores: [Q, k] float, the matching inner products.
        labels: [N] int class ids; negative = unknown (captioned "no label").
        image_paths: N absolute image paths.
        output_path: the PNG to write; parent folders are created.
        thumbnail_size: side of each square thumbnail in pixels (images are letterboxed, not cropped).
        class_names: names indexed by class id (a folder catalogue's folder names); () = show ids.

    Returns:
        `output_path`.

    Corner cases:
        A missing or undecodable image becomes a grey tile reading "missing"; it never raises.
        k == 0 draws only the query column.

    Raises:
        ValueError: no queries, inconsistent shapes, an index outside 0..N-1, or thumbnail_size < 16.
    """
    query_indices = np.asarray(query_indices, dtype=np.int64).reshape(-1)
    neighbour_indices = np.asarray(neighbour_indices, dtype=np.int64)
    neighbour_scores = np.asarray(neighbour_scores, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    num_queries, num_items = len(query_indices), len(labels)
    if num_queries == 0:
        raise ValueError("retrieval_grid: no queries to draw")
    if neighbour_indices.ndim != 2 or neighbour_indices.shape[0] != num_queries:
        raise ValueError(f"neighbour_indices must be [{num_queries}, k], got {neighbour_indices.shape}")
    if neighbour_scores.shape != neighbour_indices.shape:
        raise ValueError(f"neighbour_scores {neighbour_scores.shape} must match "
                         f"neighbour_indices {neighbour_indices.shape}")
    if len(image_paths) != num_items:
        raise ValueError(f"{len(image_paths)} image paths for {num_items} labels")
    for name, indices in (("query_indices", query_indices), ("neighbour_indices", neighbour_indices)):
        if indices.size and (indices.min() < 0 or indices.max() >= num_items):
            raise ValueError(f"{name} must lie in 0..{num_items - 1}")
    if thumbnail_size < 16:
        raise ValueError(f"thumbnail_size must be >= 16, got {thumbnail_size}")

    layout = GridLayout(rows=num_queries, k=neighbour_indices.shape[1], thumbnail_size=thumbnail_size)
    font = _font(layout.font_size)
    grid = Image.new("RGB", layout.size, BACKGROUND_COLOUR)
    draw = ImageDraw.Draw(grid)
    distances = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * neighbour_scores))

    def class_caption(label) -> str:
        if label < 0:
            return "no label"
        return class_names[label] if label < len(class_names) else f"class {label}"

    for row, query in enumerate(query_indices.tolist()):
        query_label = labels[query]
        tiles = [(query, QUERY_COLOUR, ["query", class_caption(query_label)])]
        for rank, (item, distance) in enumerate(zip(neighbour_indices[row].tolist(), distances[row].tolist()), 1):
            colour = (MISSING_COLOUR if query_label < 0 else CORRECT_COLOUR if labels[item] == query_label
                      else WRONG_COLOUR)
            tiles.append((item, colour, [f"#{rank} {class_caption(labels[item])}", f"d = {distance:.3f}"]))
        for column, (item, colour, caption) in enumerate(tiles):
            x, y = layout.tile_origin(row, column)
            draw.rectangle([x, y, x + layout.tile_width - 1, y + layout.tile_width - 1], fill=colour)
            grid.paste(_thumbnail(Path(image_paths[item]), thumbnail_size, font), (x + BORDER, y + BORDER))
            for line_number, text in enumerate(caption):
                draw.text((x, y + layout.tile_width + 2 + line_number * layout.line_height), text,
                          fill=TEXT_COLOUR, font=font)
    return _write_png(Path(output_path), lambda temporary: grid.save(temporary, format="PNG"))


def choose_queries(num_items: int, num_queries: int, seed: int) -> np.ndarray:
    """min(num_queries, num_items) distinct item indices in 0..num_items-1, sorted; the same for the same seed.

    Returns an int64 [Q] array (empty when either count is 0). Raises ValueError for negative counts.
    """
    if num_items < 0 or num_queries < 0:
        raise ValueError(f"counts must be >= 0, got num_items={num_items}, num_queries={num_queries}")
    chosen = np.random.default_rng(seed).choice(num_items, size=min(num_queries, num_items), replace=False)
    return np.sort(chosen).astype(np.int64)


def plot_recall_curve(report: dict, output_path: Path, title: str) -> Path:
    """Recall@k (percent) against k on a log axis, from an evaluation report's `recall@K` keys.

    Report values are fractions in [0, 1] (as `evaluation.evaluate_embeddings` writes them); other keys
    are ignored. Each point is marked and labelled with its value. Returns `output_path`.

    Raises:
        ValueError: the report has no `recall@K` key.
    """
    points = sorted((int(match[1]), 100 * float(value)) for key, value in report.items()
                    if (match := _RECALL_KEY.fullmatch(key)))
    if not points:
        raise ValueError("report has no recall@K keys")
    ks, recalls = zip(*points)

    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.add_subplot()
    axes.plot(ks, recalls, marker="o", color="tab:blue", clip_on=False)  # points at 100% stay whole
    for k, recall in points:
        below = recall > 90  # above would collide with the frame at 100%
        axes.annotate(f"{recall:.1f}", (k, recall), textcoords="offset points", xytext=(0, -14 if below else 7),
                      ha="center", fontsize=8)
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(FixedLocator(ks))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xticklabels([str(k) for k in ks])
    axes.set_xlim(ks[0] / 1.5, ks[-1] * 1.5)
    axes.set_ylim(0, 100)
    axes.set_xlabel("k")
    axes.set_ylabel("Recall@k (%)")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    return _save_figure(figure, Path(output_path))


def plot_validation_curve(history: list[dict], output_path: Path) -> Path | None:
    """Validation Recall@1 and MAP@R (percent) against epoch, with the training loss on a second axis.

    `history` is the trainer's per-epoch records (`epoch`, `train/epoch_loss`, `val/recall@1`,
    `val/map@r`, ...); values are fractions. Returns `output_path`, or None (and writes nothing) when
    no record holds `val/recall@1` or `val/map@r`, e.g. a run with `data.val_fraction=0`.
    """
    series = {
        "val Recall@1": _series(history, "val/recall@1", scale=100),
        "val MAP@R": _series(history, "val/map@r", scale=100),
    }
    if not any(epochs for epochs, _ in series.values()):
        return None

    figure = Figure(figsize=(6, 4.4), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    lines = []
    for (name, (epochs, values)), colour in zip(series.items(), ("tab:blue", "tab:green")):
        if epochs:
            lines += axes.plot(epochs, values, marker="o", markersize=3, color=colour, label=name)
    axes.set_ylim(0, 100)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("validation metric (%)")
    axes.grid(True, alpha=0.3)
    loss_epochs, losses = _series(history, "train/epoch_loss")
    if loss_epochs:
        loss_axes = axes.twinx()
        lines += loss_axes.plot(loss_epochs, losses, linestyle="--", color="tab:red", label="train loss")
        loss_axes.set_ylabel("train loss (epoch mean)")
    # Below the plot, not inside it: inside, it covered the first epochs of one line or another.
    figure.legend(lines, [line.get_label() for line in lines], loc="outside lower center", ncols=len(lines))
    axes.set_title("validation during training")
    return _save_figure(figure, Path(output_path))


def plot_search_history(values: list[float], states: list[str], output_path: Path) -> Path:
    """The best validation Recall@1 so far (percent) against trial number, with every trial's own value.

    values: each trial's best validation Recall@1 (a fraction; NaN for a failed trial). states: `complete`,
    `pruned` (drawn hollow: it stopped early, so its value is a lower bound) or `failed` (not drawn).
    The best-so-far line counts complete trials only, as the search's result does. Returns `output_path`.
    """
    figure = Figure(figsize=(6, 4), dpi=120)
    axes = figure.add_subplot()
    for state, style in (("complete", {"color": "tab:blue"}),
                         ("pruned", {"facecolors": "none", "edgecolors": "tab:gray"})):
        points = [(trial, 100 * value) for trial, (value, s) in enumerate(zip(values, states))
                  if s == state and math.isfinite(value)]
        if points:
            axes.scatter(*zip(*points), s=18, label=f"{state} trial", zorder=3, **style)
    best, best_so_far = -math.inf, []
    for value, state in zip(values, states):
        if state == "complete" and math.isfinite(value):
            best = max(best, 100 * value)
        best_so_far.append(best if math.isfinite(best) else math.nan)
    axes.step(range(len(values)), best_so_far, where="post", color="tab:red", label="best so far")
    axes.set_xlabel("trial")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("validation Recall@1 (%)")
    axes.set_title("hyperparameter search")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    return _save_figure(figure, Path(output_path))


def _series(history: list[dict], key: str, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """(epochs, values) of the records holding a finite `key`."""
    pairs = [(record["epoch"], scale * record[key]) for record in history
             if key in record and math.isfinite(record[key])]
    return [epoch for epoch, _ in pairs], [value for _, value in pairs]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):  # Pillow built without FreeType: fixed-size bitmap font
        return ImageFont.load_default()


def _thumbnail(path: Path, size: int, font) -> Image.Image:
    """The image letterboxed into a size x size square, or a grey "missing" tile when it cannot be read.

    Read as the model reads it (`load_rgb_image`: EXIF-upright, transparency on white), decoded at reduced
    scale where the format allows.
    """
    try:
        return ImageOps.pad(load_rgb_image(path, draft_size=size), (size, size), color=BACKGROUND_COLOUR)
    # absent, unreadable, not an image, or too large
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        tile = Image.new("RGB", (size, size), MISSING_COLOUR)
        draw = ImageDraw.Draw(tile)
        left, top, right, bottom = draw.textbbox((0, 0), "missing", font=font)
        draw.text(((size - left - right) / 2, (size - top - bottom) / 2), "missing", fill=TEXT_COLOUR, font=font)
        return tile


def _save_figure(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)  # attaches the Agg canvas; no pyplot, so no global figure state
    if figure.get_layout_engine() is None:
        figure.tight_layout()
    return _write_png(path, lambda temporary: figure.savefig(temporary, format="png"))


def _write_png(path: Path, write) -> Path:
    """Call write(temporary) for a temporary file beside `path`, then rename it onto `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    try:
        write(temporary)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)
    return path
