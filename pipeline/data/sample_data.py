"""A small Places365-shaped dataset of real JPEG files, for tests, demos and benchmarks.

Places2 cannot be downloaded here, so holefill generates a stand-in with the same layout and file
lists, which every source reader, the shard job and the retraining path can run on unchanged::

    DEST/categories_places365.txt          /a/abbey 0
    DEST/places365_train_standard.txt      /a/abbey/00000001.jpg 0
    DEST/places365_val.txt                 Places365_val_00000001.jpg 2
    DEST/data_large/a/abbey/00000001.jpg
    DEST/val_large/Places365_val_00000001.jpg

Images are procedural outdoor/indoor-like scenes (sky gradient, horizon, ground texture, sun, buildings,
trees, stripes): large smooth regions plus edges and textures, i.e. something an inpainting model can
actually learn to complete. The few real photographs that ship inside installed packages (matplotlib's
``grace_hopper.jpg``, scikit-learn's ``china.jpg`` / ``flower.jpg``, scikit-image's data images) are
added to the training split when found; none being installed is fine.

Everything is a deterministic function of ``seed`` (and of which of those packages are installed).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "CATEGORIES",
    "SampleDataset",
    "add_new_images",
    "find_package_photos",
    "generate_sample_dataset",
    "load_sample_dataset",
    "render_scene",
]

# A few real Places365 category paths (with their real label ids), including a nested one.
CATEGORIES: tuple[tuple[str, int], ...] = (
    ("/a/abbey", 0),
    ("/b/beach", 48),
    ("/f/forest/broadleaf", 150),
    ("/m/mountain", 232),
    ("/s/skyscraper", 297),
)
TRAIN_LIST = "places365_train_standard.txt"
VAL_LIST = "places365_val.txt"
CATEGORY_LIST = "categories_places365.txt"
TRAIN_ROOT = "data_large"
VAL_ROOT = "val_large"

# Photos known to ship inside popular packages: (package, path inside the package).
_PACKAGE_PHOTOS: tuple[tuple[str, str], ...] = (
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/rocket.jpg"),
)


@dataclass
class SampleDataset:
    """Where a generated dataset lives and what it holds (paths are relative, as in the file lists)."""

    root: str
    train_files: list[str] = field(default_factory=list)  # "/a/abbey/00000001.jpg"
    train_labels: list[int] = field(default_factory=list)
    val_files: list[str] = field(default_factory=list)  # "Places365_val_00000001.jpg"
    val_labels: list[int] = field(default_factory=list)
    defective: list[str] = field(default_factory=list)  # train entries that are deliberately bad files
    seed: int = 0
    size: tuple[int, int] = (512, 384)

    @property
    def train_list(self) -> str:
        return _join(self.root, TRAIN_LIST)

    @property
    def val_list(self) -> str:
        return _join(self.root, VAL_LIST)

    @property
    def categories_list(self) -> str:
        return _join(self.root, CATEGORY_LIST)

    @property
    def train_root(self) -> str:
        return _join(self.root, TRAIN_ROOT)

    @property
    def val_root(self) -> str:
        return _join(self.root, VAL_ROOT)

    def train_path(self, entry: str) -> str:
        """Full path/URL of a train list entry such as ``/a/abbey/00000001.jpg``."""
        return _join(self.train_root, entry.lstrip("/"))

    def val_path(self, entry: str) -> str:
        """Full path/URL of a val list entry such as ``Places365_val_00000001.jpg``."""
        return _join(self.val_root, entry)


def _join(root: str, *parts: str) -> str:
    return posixpath.join(str(root).rstrip("/"), *parts) if "://" in str(root) else str(Path(root, *parts))


def _rng(seed: int, *parts: object) -> np.random.Generator:
    digest = hashlib.blake2b(repr((int(seed), *parts)).encode(), digest_size=16, person=b"holefill.sample").digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest, "little")))


# --------------------------------------------------------------------------------------------------
# Procedural scenes
# --------------------------------------------------------------------------------------------------


def _palette(rng: np.random.Generator, category: int) -> dict[str, np.ndarray]:
    """Colours per category family, jittered per image."""
    base = {
        0: ((110, 150, 210), (200, 220, 240), (90, 110, 60), (150, 140, 120)),  # abbey: grass, stone
        1: ((40, 120, 220), (170, 210, 250), (220, 200, 150), (30, 90, 160)),  # beach: sand, sea
        2: ((90, 140, 200), (190, 215, 235), (50, 90, 40), (30, 70, 30)),  # forest
        3: ((70, 120, 200), (210, 225, 245), (110, 100, 90), (240, 240, 245)),  # mountain, snow
        4: ((60, 110, 190), (190, 200, 220), (80, 80, 85), (140, 150, 170)),  # skyscraper
    }[category % 5]
    jitter = lambda c: np.clip(np.array(c, np.float32) + rng.normal(0, 12, 3), 0, 255)  # noqa: E731
    sky_top, sky_bottom, ground, accent = (jitter(c) for c in base)
    return {"sky_top": sky_top, "sky_bottom": sky_bottom, "ground": ground, "accent": accent}


def render_scene(seed: int, index: int, category: int, size: tuple[int, int]) -> Image.Image:
    """A procedural RGB scene of ``size = (width, height)``, a deterministic function of its arguments."""
    width, height = size
    rng = _rng(seed, "scene", index, category, width, height)
    pal = _palette(rng, category)
    yy = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    xx = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]

    # Sky: vertical gradient; horizon: a gently sloped, wavy line.
    img = pal["sky_top"] * (1 - yy) + pal["sky_bottom"] * yy + np.zeros((1, width, 1), np.float32)
    horizon = rng.uniform(0.45, 0.7) + rng.uniform(-0.08, 0.08) * (xx[0, :, 0] - 0.5)
    horizon = horizon + 0.02 * np.sin(xx[0, :, 0] * rng.uniform(4, 14) + rng.uniform(0, 6.3))
    below = yy[:, :, 0] > horizon[None, :]

    # Ground: darker towards the viewer, with a low-frequency texture and fine grain.
    coarse = rng.random((8, 8)).astype(np.float32)
    texture = np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.normal(0.0, 6.0, (height, width)).astype(np.float32)
    ground = pal["ground"] * (0.75 + 0.35 * yy) * (0.8 + 0.4 * texture[..., None]) + grain[..., None]
    img = np.where(below[..., None], ground, img)

    # Stripes (furrows, waves, windows) in part of the ground.
    freq = rng.uniform(20, 60)
    stripes = (np.sin(yy[:, :, 0] * freq + xx[:, :, 0] * rng.uniform(-10, 10)) > 0.6) & below
    stripes &= xx[:, :, 0] > rng.uniform(0.0, 0.6)
    img = np.where(stripes[..., None], img * 0.8, img)

    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(canvas)
    accent = tuple(int(c) for c in pal["accent"])
    horizon_px = int(float(np.mean(horizon)) * height)

    # Sun or moon.
    r = int(rng.uniform(0.04, 0.09) * min(width, height))
    cx, cy = int(rng.uniform(0.1, 0.9) * width), int(rng.uniform(0.08, 0.3) * height)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(250, 235, 180))

    # Buildings / rocks / trees standing on the horizon.
    for _ in range(int(rng.integers(2, 7))):
        w = int(rng.uniform(0.05, 0.2) * width)
        h = int(rng.uniform(0.1, 0.45) * height)
        x0 = int(rng.uniform(-0.05, 0.95) * width)
        kind = int(rng.integers(3))
        shade = tuple(int(np.clip(c * rng.uniform(0.6, 1.2), 0, 255)) for c in accent)
        if kind == 0:  # building with windows
            draw.rectangle((x0, horizon_px - h, x0 + w, horizon_px + 2), fill=shade)
            for wy in range(horizon_px - h + 6, horizon_px - 6, 12):
                for wx in range(x0 + 4, x0 + w - 6, 10):
                    draw.rectangle((wx, wy, wx + 4, wy + 6), fill=(40, 40, 50))
        elif kind == 1:  # mountain / rock
            draw.polygon([(x0, horizon_px + 2), (x0 + w, horizon_px + 2), (x0 + w // 2, horizon_px - h)], fill=shade)
        else:  # tree
            trunk = max(2, w // 8)
            draw.rectangle((x0 + w // 2 - trunk, horizon_px - h // 3, x0 + w // 2 + trunk, horizon_px + 2), fill=(80, 55, 35))
            draw.ellipse((x0, horizon_px - h, x0 + w, horizon_px - h // 4), fill=(40, int(90 + 60 * rng.random()), 40))
    # A mild blur mimics camera optics so edges are not aliased staircases.
    return canvas.filter(ImageFilter.GaussianBlur(radius=0.6))


# --------------------------------------------------------------------------------------------------
# Package photos
# --------------------------------------------------------------------------------------------------


def find_package_photos() -> list[Path]:
    """Real photographs shipped inside installed packages (without importing those packages)."""
    found: list[Path] = []
    for package, relative in _PACKAGE_PHOTOS:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            candidate = Path(location, relative)
            if candidate.is_file():
                found.append(candidate)
                break
    return found


def _photo_as_jpeg(path: Path, short_side: int) -> bytes | None:
    """A package photo as an RGB JPEG with the given short side; ``None`` when it cannot be read."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = short_side / min(w, h)
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    except OSError:
        return None
    return _jpeg(im)


def _jpeg(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Dataset writer
# --------------------------------------------------------------------------------------------------


def _write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    fs.makedirs(posixpath.dirname(path) if "://" in path else str(Path(path).parent), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def _next_number(files: list[str], category: str) -> int:
    prefix = category + "/"
    numbers = [int(Path(f).stem) for f in files if f.startswith(prefix) and Path(f).stem.isdigit()]
    return max(numbers, default=0) + 1


def _scene_size(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int]:
    # One image in five is portrait, as in Places (short side stays the same).
    return (size[1], size[0]) if rng.random() < 0.2 else size


def _train_images(
    dataset: SampleDataset, fs: fsspec.AbstractFileSystem, n: int, first_index: int
) -> list[str]:
    """Write ``n`` new procedural train images round-robin over the categories; returns their entries."""
    added: list[str] = []
    for i in range(first_index, first_index + n):
        category, label = CATEGORIES[i % len(CATEGORIES)]
        number = _next_number(dataset.train_files + added, category)
        entry = f"{category}/{number:08d}.jpg"
        size = _scene_size(_rng(dataset.seed, "orient", "train", i), dataset.size)
        image = render_scene(dataset.seed, i, CATEGORIES.index((category, label)), size)
        _write(fs, dataset.train_path(entry), _jpeg(image))
        added.append(entry)
        dataset.train_files.append(entry)
        dataset.train_labels.append(label)
    return added


def _defective_files(dataset: SampleDataset, fs: fsspec.AbstractFileSystem, n: int) -> None:
    """Add ``n`` deliberately bad train files (truncated JPEG, empty file, text named .jpg)."""
    category, label = CATEGORIES[0]
    good = _jpeg(render_scene(dataset.seed, -1, 0, dataset.size))
    payloads = (good[: len(good) // 2], b"", b"this is not an image\n")
    for k in range(n):
        number = _next_number(dataset.train_files, category)
        entry = f"{category}/{number:08d}.jpg"
        _write(fs, dataset.train_path(entry), payloads[k % len(payloads)])
        dataset.train_files.append(entry)
        dataset.train_labels.append(label)
        dataset.defective.append(entry)


def _write_lists(dataset: SampleDataset, fs: fsspec.AbstractFileSystem) -> None:
    _write(fs, dataset.categories_list, "".join(f"{c} {i}\n" for c, i in CATEGORIES).encode())
    _write(fs, dataset.train_list, "".join(f"{f} {l}\n" for f, l in zip(dataset.train_files, dataset.train_labels)).encode())
    _write(fs, dataset.val_list, "".join(f"{f} {l}\n" for f, l in zip(dataset.val_files, dataset.val_labels)).encode())


def generate_sample_dataset(
    dest: str,
    *,
    n_train: int = 64,
    n_val: int = 32,
    seed: int = 0,
    size: tuple[int, int] = (512, 384),
    include_package_photos: bool = True,
    n_defective: int = 0,
    storage_options: dict | None = None,
) -> SampleDataset:
    """Write a Places365-layout dataset of real JPEGs under ``dest`` (a local path or fsspec URL).

    ``n_train`` procedural train images (plus any package photos found, when ``include_package_photos``),
    ``n_val`` procedural val images, all ``size = (width, height)`` (one in five portrait), and
    ``n_defective`` bad train files (truncated, empty, not an image) that a shard job must skip.
    """
    if n_train < 0 or n_val < 0 or n_defective < 0:
        raise ValueError("n_train, n_val and n_defective must be >= 0")
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size must be (width, height) with both >= 32, got {size}")
    fs, root = fsspec.core.url_to_fs(str(dest), **(storage_options or {}))
    dataset = SampleDataset(root=str(dest), seed=seed, size=(int(size[0]), int(size[1])))
    _train_images(dataset, fs, n_train, 0)
    if include_package_photos:
        for k, photo in enumerate(find_package_photos()):
            data = _photo_as_jpeg(photo, min(size))
            if data is None:
                continue
            category, label = CATEGORIES[k % len(CATEGORIES)]
            entry = f"{category}/{_next_number(dataset.train_files, category):08d}.jpg"
            _write(fs, dataset.train_path(entry), data)
            dataset.train_files.append(entry)
            dataset.train_labels.append(label)
    _defective_files(dataset, fs, n_defective)
    for i in range(n_val):
        category_index = i % len(CATEGORIES)
        entry = f"Places365_val_{i + 1:08d}.jpg"
        image_size = _scene_size(_rng(seed, "orient", "val", i), dataset.size)
        # Val scenes use a disjoint index range so no val image equals a train image.
        image = render_scene(seed, 1_000_000 + i, category_index, image_size)
        _write(fs, dataset.val_path(entry), _jpeg(image))
        dataset.val_files.append(entry)
        dataset.val_labels.append(CATEGORIES[category_index][1])
    _write_lists(dataset, fs)
    return dataset


def add_new_images(dataset: SampleDataset, n: int, seed: int | None = None, storage_options: dict | None = None) -> list[str]:
    """Append ``n`` new train images (new files + appended list lines), as new Places data would arrive.

    ``seed`` changes the content of the new images (default: the dataset's seed; new indices never
    repeat earlier images either way). Updates ``dataset`` in place and returns the new list entries.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    fs, _ = fsspec.core.url_to_fs(str(dataset.root), **(storage_options or {}))
    original_seed = dataset.seed
    dataset.seed = original_seed if seed is None else seed
    try:
        added = _train_images(dataset, fs, n, len(dataset.train_files))
    finally:
        dataset.seed = original_seed
    # Rewrite rather than append: object stores cannot append, and the list is small. The content is
    # the old list followed by the new lines, exactly what Places' own list would look like.
    _write(fs, dataset.train_list, "".join(f"{e} {l}\n" for e, l in zip(dataset.train_files, dataset.train_labels)).encode())
    return added


def load_sample_dataset(root: str, storage_options: dict | None = None) -> SampleDataset:
    """Read back a dataset written by :func:`generate_sample_dataset` from its file lists."""
    fs, _ = fsspec.core.url_to_fs(str(root), **(storage_options or {}))
    dataset = SampleDataset(root=str(root))

    def read(path: str) -> list[tuple[str, int]]:
        with fs.open(path, "rb") as f:
            rows = [line.split() for line in f.read().decode().splitlines() if line.strip()]
        return [(r[0], int(r[1])) for r in rows]

    for entry, label in read(dataset.train_list):
        dataset.train_files.append(entry)
        dataset.train_labels.append(label)
    for entry, label in read(dataset.val_list):
        dataset.val_files.append(entry)
        dataset.val_labels.append(label)
    return dataset
