"""A small synthetic "products" dataset in Stanford Online Products' file layout.

Lets the pipeline run end to end on a machine without SOP. Each class is a product: a shape, a main
colour, a second colour and a pattern drawn in the second colour. Classes are combinations of shared
attributes, so two classes often agree on shape or colour or pattern, and telling them apart needs
features that see all three. Each image of a class varies the product's scale, position, rotation,
and colour slightly, and puts it on a random two-colour gradient background with pixel noise and,
sometimes, a small distractor shape. The background and pose dominate raw pixels, so an untrained
network retrieves poorly, while a trained one learns to look at the product.

Layout written under `root` (paths relative to root, as in SOP):

    images/<class_id:04d>/<n:02d>.jpg
    Ebay_train.txt    classes 1 .. num_classes // 2
    Ebay_test.txt     the other classes, numbered on after the train classes
    DONE.json         the generation parameters; written last, marks a complete dataset
"""

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .image_lists import write_sop_list

# Bump when the drawing code changes, so cached datasets from older code are rebuilt.
GENERATOR_VERSION = 1

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "ellipse")
PATTERNS = ("plain", "stripes", "dots", "checker", "halves")
COLOURS = np.array(
    [
        (220, 40, 40),  # red
        (245, 140, 20),  # orange
        (240, 220, 40),  # yellow
        (50, 170, 60),  # green
        (40, 200, 210),  # cyan
        (40, 80, 220),  # blue
        (140, 60, 200),  # purple
        (240, 120, 190),  # pink
        (245, 245, 245),  # white
        (30, 30, 30),  # black
    ],
    dtype=np.float32,
)

_SUPERSAMPLE = 2  # draw at 2x, then box-downsample for anti-aliasing
_JPEG_QUALITY = 90


def generate_demo_dataset(
    root: Path, num_classes: int, images_per_class: int, image_size: int, seed: int
) -> None:
    """Writes the dataset into a temporary sibling folder, then renames it to `root`.

    Args:
        root: destination folder; replaced if it already exists.
        num_classes: number of products, at least 2; the first `num_classes // 2` are the train
            split, the rest the test split (SOP splits by class, never by image).
        images_per_class: images drawn for each product, at least 1.
        image_size: side of the square RGB JPEG images, in pixels.
        seed: the same seed gives byte-identical images and lists.

    Corner cases: a leftover `<root>.tmp` from an interrupted run is deleted first. Each image has
    its own random stream seeded by (seed, class, image), so its pixels do not depend on the order
    of generation.
    """
    if num_classes < 2 or images_per_class < 1 or image_size < 8:
        raise ValueError(
            f"need num_classes >= 2, images_per_class >= 1, image_size >= 8; got "
            f"{num_classes}, {images_per_class}, {image_size}"
        )
    root = Path(root)
    tmp = root.with_name(root.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)

    products = _sample_products(num_classes, seed)
    rows = []  # (class_id, super_class_id, relative path), class_id 1-based
    for class_index, product in enumerate(products):
        class_dir = tmp / "images" / f"{class_index + 1:04d}"
        class_dir.mkdir(parents=True)
        for n in range(images_per_class):
            rng = np.random.default_rng([seed, class_index, n])
            relative_path = f"images/{class_index + 1:04d}/{n:02d}.jpg"
            _draw_image(product, image_size, rng).save(tmp / relative_path, quality=_JPEG_QUALITY)
            rows.append((class_index + 1, product["shape"] + 1, relative_path))

    num_train_classes = num_classes // 2
    train_rows = [row for row in rows if row[0] <= num_train_classes]
    test_rows = [row for row in rows if row[0] > num_train_classes]
    for list_name, split_rows in (("Ebay_train.txt", train_rows), ("Ebay_test.txt", test_rows)):
        class_ids, super_class_ids, paths = zip(*split_rows)
        write_sop_list(tmp / list_name, paths, class_ids, super_class_ids)
    params = _params(num_classes, images_per_class, image_size, seed)
    (tmp / "DONE.json").write_text(json.dumps(params, indent=2) + "\n")

    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)


def ensure_demo_dataset(
    root: Path, num_classes: int, images_per_class: int, image_size: int, seed: int
) -> Path:
    """Returns `root`, generating the dataset unless a complete one with these parameters is there.

    A dataset is complete when `root/DONE.json` exists; if its parameters (or the generator version)
    differ, the folder is removed and rebuilt. Prints one line saying which happened.
    """
    root = Path(root)
    params = _params(num_classes, images_per_class, image_size, seed)
    marker = root / "DONE.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        print(f"demo data: reusing {root}")
        return root
    generate_demo_dataset(root, num_classes, images_per_class, image_size, seed)
    print(
        f"demo data: generated {num_classes} classes x {images_per_class} images "
        f"at {image_size}px in {root}"
    )
    return root


def _params(num_classes: int, images_per_class: int, image_size: int, seed: int) -> dict:
    return {
        "generator_version": GENERATOR_VERSION,
        "num_classes": num_classes,
        "images_per_class": images_per_class,
        "image_size": image_size,
        "seed": seed,
    }


def _sample_products(num_classes: int, seed: int) -> list:
    """Distinct (shape, main colour, second colour, pattern) combinations, second != main colour.

    Drawn as a random subset of all combinations, so attributes are shared across classes and across
    the train/test split.
    """
    num_colours = len(COLOURS)
    combos = [
        (shape, main, second, pattern)
        for shape in range(len(SHAPES))
        for main in range(num_colours)
        for second in range(num_colours)
        for pattern in range(len(PATTERNS))
        if second != main
    ]
    if num_classes > len(combos):
        raise ValueError(f"num_classes={num_classes} exceeds the {len(combos)} distinct products")
    rng = np.random.default_rng([seed, 7919])
    chosen = rng.choice(len(combos), size=num_classes, replace=False)
    return [
        dict(zip(("shape", "main", "second", "pattern"), combos[i], strict=True)) for i in chosen
    ]


def _shape_polygons(shape: str, cx: float, cy: float, r: float, angle: float) -> list:
    """Outline(s) of a shape of radius r centred at (cx, cy), rotated by angle (radians).

    Returns a list of vertex lists; the first is filled, any further ones are holes.
    """

    def polygon(radii, angles):
        a = np.asarray(angles) + angle
        radii = np.asarray(radii, dtype=np.float64) * r
        return list(zip((cx + radii * np.cos(a)).tolist(), (cy + radii * np.sin(a)).tolist()))

    def regular(k, radius=1.0, offset=0.0):
        return polygon(np.full(k, radius), offset + 2 * np.pi * np.arange(k) / k)

    if shape == "circle":
        return [regular(48)]
    if shape == "square":
        return [regular(4, offset=np.pi / 4)]
    if shape == "triangle":
        return [regular(3, offset=-np.pi / 2)]
    if shape == "hexagon":
        return [regular(6)]
    if shape == "star":
        radii = np.tile([1.0, 0.45], 5)
        return [polygon(radii, -np.pi / 2 + np.pi * np.arange(10) / 5)]
    if shape == "ring":
        return [regular(48), regular(48, radius=0.5)]
    if shape == "ellipse":
        t = 2 * np.pi * np.arange(48) / 48
        radii = 1.0 / np.sqrt(np.cos(t) ** 2 + (np.sin(t) / 0.5) ** 2)  # semi-axes 1 and 0.5
        return [polygon(radii, t)]
    if shape == "cross":
        w = 0.33  # half-width of each arm, relative to r
        xs = np.array([w, w, 1, 1, w, w, -w, -w, -1, -1, -w, -w])
        ys = np.array([1, w, w, -w, -w, -1, -1, -w, -w, w, w, 1])
        return [polygon(np.hypot(xs, ys), np.arctan2(ys, xs))]
    raise ValueError(f"unknown shape {shape!r}")


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """Boolean (size, size) mask of the shape."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    outline, *holes = _shape_polygons(shape, cx, cy, r, angle)
    draw.polygon(outline, fill=255)
    for hole in holes:
        draw.polygon(hole, fill=0)
    return np.asarray(mask) > 0


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Where the second colour goes; u, v are pixel coordinates in the product's rotated frame."""
    period = 0.5 * r
    if pattern == "plain":  # second colour only as a thick rim, drawn by the caller
        return np.zeros(u.shape, dtype=bool)
    if pattern == "stripes":
        return np.floor(u / (0.5 * period)) % 2 == 0
    if pattern == "dots":
        du = u / period - np.round(u / period)
        dv = v / period - np.round(v / period)
        return du * du + dv * dv < 0.3**2
    if pattern == "checker":
        return (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    if pattern == "halves":
        return v > 0
    raise ValueError(f"unknown pattern {pattern!r}")


def _draw_image(product: dict, image_size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of `product` with a random pose, background, distractor and noise."""
    size = image_size * _SUPERSAMPLE
    coords = np.arange(size, dtype=np.float32) + 0.5
    ys, xs = np.meshgrid(coords, coords, indexing="ij")  # (size, size) each

    # Background: a linear gradient between two random muted colours (a grey plus a small tint), so
    # the product stands out by colour while the background still moves raw pixels a lot.
    grey = rng.uniform(40, 215, size=(2, 1))
    bg_a, bg_b = (grey + rng.uniform(-30, 30, size=(2, 3))).astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = ((xs - size / 2) * np.cos(direction) + (ys - size / 2) * np.sin(direction)) / size + 0.5
    canvas = bg_a + np.clip(ramp, 0, 1)[..., None] * (bg_b - bg_a)  # (size, size, 3)

    # Distractor: a small plain shape in a random colour, behind the product.
    if rng.random() < 0.5:
        d_shape = SHAPES[rng.integers(len(SHAPES))]
        d_r = size * rng.uniform(0.07, 0.14)
        d_cx, d_cy = rng.uniform(d_r, size - d_r, size=2)
        d_mask = _shape_mask(d_shape, size, d_cx, d_cy, d_r, rng.uniform(0, 2 * np.pi))
        canvas[d_mask] = rng.uniform(0, 255, size=3)

    # Product pose: the centre may move by up to a fifth of the image, kept inside the frame.
    r = size * rng.uniform(0.26, 0.42)
    cx, cy = size / 2 + rng.uniform(-0.2, 0.2, size=2) * size
    cx, cy = np.clip([cx, cy], r * 0.9, size - r * 0.9)
    angle = rng.uniform(0, 2 * np.pi)
    shape = SHAPES[product["shape"]]
    body = _shape_mask(shape, size, cx, cy, r, angle)

    jitter = rng.normal(0, 12, size=(2, 3))  # per-image colour shift, in 0..255 units
    main = COLOURS[product["main"]] + jitter[0]
    second = COLOURS[product["second"]] + jitter[1]
    u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
    v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
    pattern = PATTERNS[product["pattern"]]
    if pattern == "plain":
        accent = body & ~_shape_mask(shape, size, cx, cy, r * 0.72, angle)
    else:
        accent = body & _pattern_mask(pattern, u, v, r)
    canvas[body] = main
    canvas[accent] = second

    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    image = image.reduce(_SUPERSAMPLE)
    pixels = np.asarray(image, dtype=np.float32)
    # Exposure change, then pixel noise.
    pixels = pixels * rng.uniform(0.8, 1.15) + rng.normal(0, 8, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
