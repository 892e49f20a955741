"""visualize.py: grid geometry and border colours read back from the PNG, placeholders, curve files."""

import math

import numpy as np
import pytest
from PIL import Image

from visualize import (
    BORDER,
    CORRECT_COLOUR,
    MISSING_COLOUR,
    PAD,
    QUERY_COLOUR,
    QUERY_GAP,
    WRONG_COLOUR,
    GridLayout,
    choose_queries,
    plot_recall_curve,
    plot_validation_curve,
    retrieval_grid,
)

SOLID_COLOURS = [(250, 200, 0), (0, 200, 250), (120, 0, 160), (255, 128, 192)]


@pytest.fixture
def solid_images(tmp_path):
    """Four tiny solid-colour PNGs (one per item, different shapes), labels [0, 0, 1, 1]."""
    paths = []
    for index, (colour, shape) in enumerate(zip(SOLID_COLOURS, [(20, 20), (30, 12), (12, 30), (8, 8)])):
        path = tmp_path / "images" / f"{index}.png"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", shape, colour).save(path)
        paths.append(path)
    return paths, np.array([0, 0, 1, 1])


def tile_pixel(grid, layout, row, column, dx, dy):
    x, y = layout.tile_origin(row, column)
    return grid.getpixel((x + dx, y + dy))


def test_grid_size_and_border_colours(solid_images, tmp_path):
    paths, labels = solid_images
    queries = np.array([0, 2])
    neighbours = np.array([[1, 2, 3], [3, 0, 1]])  # row 0: right, wrong, wrong; row 1: right, wrong, wrong
    scores = np.array([[0.9, 0.5, 0.1], [0.8, 0.2, -1.0]])
    thumbnail = 32
    output = retrieval_grid(queries, neighbours, scores, labels, paths, tmp_path / "out" / "grid.png", thumbnail)

    assert output == tmp_path / "out" / "grid.png" and not list(output.parent.glob("*.tmp"))
    grid = Image.open(output).convert("RGB")
    layout = GridLayout(rows=2, k=3, thumbnail_size=thumbnail)
    tile = thumbnail + 2 * BORDER
    assert grid.size == (4 * tile + 5 * PAD + QUERY_GAP, 2 * layout.tile_height + 3 * PAD)
    assert layout.tile_height > tile  # room for the caption

    expected_frames = [[QUERY_COLOUR, CORRECT_COLOUR, WRONG_COLOUR, WRONG_COLOUR],
                       [QUERY_COLOUR, CORRECT_COLOUR, WRONG_COLOUR, WRONG_COLOUR]]
    shown = [[0, 1, 2, 3], [2, 3, 0, 1]]
    for row in range(2):
        for column in range(4):
            for dx, dy in [(1, 1), (tile - 2, tile // 2), (tile // 2, tile - 2)]:  # corner, right, bottom edge
                assert tile_pixel(grid, layout, row, column, dx, dy) == expected_frames[row][column]
            # The thumbnail's centre is the item's own solid colour (letterboxed, not cropped away).
            assert tile_pixel(grid, layout, row, column, tile // 2, tile // 2) == SOLID_COLOURS[shown[row][column]]


def test_thumbnails_show_photos_upright_as_the_model_reads_them(tmp_path):
    # Stored 40 wide x 10 tall, red left / blue right, EXIF orientation 6: a viewer (and the model) sees it
    # 10 wide x 40 tall, red on top.
    stored = Image.new("RGB", (40, 10), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    paths = [tmp_path / "sideways.jpg", tmp_path / "other.png"]
    stored.save(paths[0], exif=exif, quality=95)
    Image.new("RGB", (8, 8), (0, 0, 0)).save(paths[1])
    grid = Image.open(retrieval_grid(np.array([0]), np.array([[1]]), np.array([[0.5]]), np.array([0, 0]), paths,
                                     tmp_path / "grid.png", 40)).convert("RGB")
    layout = GridLayout(rows=1, k=1, thumbnail_size=40)
    top, bottom = (tile_pixel(grid, layout, 0, 0, BORDER + 20, BORDER + dy) for dy in (5, 35))
    assert top[0] > 200 and top[2] < 60  # red above
    assert bottom[2] > 200 and bottom[0] < 60  # blue below


def test_missing_and_undecodable_images_become_placeholders(solid_images, tmp_path):
    paths, labels = solid_images
    paths = list(paths)
    paths[1] = tmp_path / "does_not_exist.jpg"
    paths[3] = tmp_path / "not_an_image.png"
    paths[3].write_bytes(b"this is not a PNG")
    output = retrieval_grid(np.array([0]), np.array([[1, 3]]), np.array([[1.0, 0.0]]), labels, paths,
                            tmp_path / "grid.png", thumbnail_size=48)

    grid = Image.open(output).convert("RGB")
    layout = GridLayout(rows=1, k=2, thumbnail_size=48)
    for column in (1, 2):
        assert tile_pixel(grid, layout, 0, column, BORDER + 2, BORDER + 2) == MISSING_COLOUR
    assert tile_pixel(grid, layout, 0, 1, 1, 1) == CORRECT_COLOUR  # the frame still says right or wrong
    assert tile_pixel(grid, layout, 0, 2, 1, 1) == WRONG_COLOUR


def test_grid_rejects_inconsistent_shapes(solid_images, tmp_path):
    paths, labels = solid_images
    with pytest.raises(ValueError, match="neighbour_scores"):
        retrieval_grid(np.array([0]), np.array([[1, 2]]), np.array([[1.0]]), labels, paths, tmp_path / "g.png")
    with pytest.raises(ValueError, match="neighbour_indices must lie"):
        retrieval_grid(np.array([0]), np.array([[4]]), np.array([[1.0]]), labels, paths, tmp_path / "g.png")


def test_choose_queries_is_deterministic_sorted_and_in_range():
    first = choose_queries(1000, 20, seed=7)
    assert np.array_equal(first, choose_queries(1000, 20, seed=7))
    assert not np.array_equal(first, choose_queries(1000, 20, seed=8))
    assert len(first) == 20 and len(np.unique(first)) == 20
    assert np.all(np.diff(first) > 0) and first.min() >= 0 and first.max() < 1000
    assert np.array_equal(choose_queries(5, 20, seed=0), np.arange(5))  # capped at num_items
    assert choose_queries(0, 3, seed=0).shape == (0,)


def test_recall_curve_writes_a_png(tmp_path):
    report = {"recall@1": 0.5, "recall@10": 0.8, "recall@100": 0.95, "recall@1000": 1.0, "map@r": 0.2,
              "num_items": 600}
    output = plot_recall_curve(report, tmp_path / "plots" / "recall.png", title="demo")
    with Image.open(output) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
    with pytest.raises(ValueError, match="recall@K"):
        plot_recall_curve({"map@r": 0.2}, tmp_path / "none.png", title="x")


def test_validation_curve_writes_a_png_or_returns_none(tmp_path):
    history = [{"epoch": epoch, "train/epoch_loss": 1 / epoch, "val/recall@1": 0.1 * epoch, "val/map@r": 0.05 * epoch}
               for epoch in range(1, 5)]
    output = plot_validation_curve(history, tmp_path / "validation.png")
    with Image.open(output) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200

    without_validation = [{"epoch": 1, "train/epoch_loss": 0.5}, {"epoch": 2, "train/epoch_loss": math.nan}]
    assert plot_validation_curve(without_validation, tmp_path / "none.png") is None
    assert plot_validation_curve([], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_grid_captions_name_folder_classes(solid_images, tmp_path, monkeypatch):
    from PIL import ImageDraw

    paths, labels = solid_images
    captions = []
    original_text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, *args, **kwargs: captions.append(text) or original_text(
                            self, xy, text, *args, **kwargs))
    retrieval_grid([0], np.array([[1, 2]]), np.array([[0.9, 0.5]]), labels, paths, tmp_path / "grid.png",
                   class_names=("red_kite", "blue_jay"))
    assert captions[:2] == ["query", "red_kite"]
    assert "#1 red_kite" in captions and "#2 blue_jay" in captions
    captions.clear()
    retrieval_grid([0], np.array([[1, 2]]), np.array([[0.9, 0.5]]), labels, paths, tmp_path / "grid.png")
    assert "#2 class 1" in captions  # without names (SOP lists), the class id


def test_validation_curve_legend_stays_off_the_lines(tmp_path, monkeypatch):
    import visualize

    figures = []
    monkeypatch.setattr(visualize, "_write_png", lambda path, write: figures.append(path) or path)
    original_save = visualize._save_figure
    monkeypatch.setattr(visualize, "_save_figure", lambda figure, path: figures.append(figure) or original_save(figure, path))
    history = [{"epoch": e, "train/epoch_loss": 0.5 - 0.02 * e, "val/recall@1": 0.1 + 0.05 * e, "val/map@r": 0.05 * e}
               for e in range(1, 9)]
    plot_validation_curve(history, tmp_path / "curve.png")
    figure = figures[0]
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    legends = figure.legends + [axes.get_legend() for axes in figure.axes if axes.get_legend() is not None]
    assert len(legends) == 1
    legend_box = legends[0].get_window_extent(renderer)
    for axes in figure.axes:
        assert not legend_box.overlaps(axes.get_window_extent(renderer))
