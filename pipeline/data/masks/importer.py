"""Import an external folder of irregular masks (e.g. the NVIDIA irregular test masks) for evaluation.

External mask sets disagree on polarity (NVIDIA and RN files: white = hole; LBAM's generator: black =
hole), on size (NVIDIA: 512x512) and on bit depth (some are JPEG-compressed with gray edges). Importing
normalises them to holefill's convention - (H, W) uint8, 255 = hole, binary, at a target size resized
with *nearest* so no gray values appear - and files each mask under its hole-ratio bucket from
:mod:`pipeline.buckets`.

Mainly for evaluation: RN and LBAM were *trained* on the NVIDIA masks, so training on them leaks the test
masks into training (and the shard job never reads them). Reproducing the papers' recipe needs exactly that,
so :func:`import_training_pool` imports a folder as a training mask pool (:mod:`pipeline.data.masks.pool`) on
explicit request, with the leakage warning logged and written into the pool's index.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import numpy as np
from PIL import Image, UnidentifiedImageError

from models.codec import ALLOWED_FORMATS
from pipeline.buckets import BUCKET_NAMES, bucket_of
from pipeline.errors import one_line
from pipeline.fsutil import StorageOptionsLike, join_url, open_url, url_to_fs
from pipeline.data.imageops import DEFAULT_MAX_PIXELS, encode_mask_png
from pipeline.data.masks.generators import hole_ratio
from pipeline.data.masks.pool import write_mask_pool

__all__ = [
    "MASK_EXTENSIONS",
    "ImportedMask",
    "binarize_mask",
    "bucket_counts",
    "import_mask",
    "import_mask_folder",
    "import_training_pool",
    "write_imported_masks",
]

# The files an import reads: the extensions of holefill's one format allow-list (PNG, JPEG, WebP).
MASK_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
# A mask file larger than this is refused before it is read (NVIDIA's 512x512 masks are a few KB).
MAX_MASK_FILE_BYTES = 64 * 1024 * 1024

log = logging.getLogger(__name__)

# Logged and stored in the pool's index whenever external masks are imported for training.
TRAINING_LEAKAGE_WARNING = (
    "masks imported for TRAINING: if these are the NVIDIA irregular test masks (as RN and LBAM trained on), "
    "evaluating on the same masks afterwards measures on masks seen in training; evaluate on holefill's own "
    "eval set or on masks not in this pool"
)


@dataclass(frozen=True)
class ImportedMask:
    """One imported mask: its source file, a key safe for WebDataset, the mask and its bucket."""

    source: str  # path relative to the imported folder, e.g. "testing_mask_dataset/00001.png"
    key: str  # source without extension, separators -> "_", no dots
    mask: np.ndarray  # (H, W) uint8, 255 = hole
    hole_ratio: float
    bucket: str | None  # bucket name from pipeline.buckets, None when outside (0.01, 0.6]


def binarize_mask(gray: np.ndarray, *, white_is_hole: bool = True, threshold: int = 128) -> np.ndarray:
    """8-bit gray -> uint8 {0, 255} with 255 = hole, honouring the source's polarity."""
    if not 0 < threshold <= 255:
        raise ValueError(f"threshold must be in (0, 255], got {threshold}")
    white = np.asarray(gray) >= threshold
    return np.where(white if white_is_hole else ~white, 255, 0).astype(np.uint8)


def import_mask(
    data: bytes, *, size: int | tuple[int, int] = 256, white_is_hole: bool = True, threshold: int = 128,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode one external mask file to holefill's form at ``size`` (side, or ``(height, width)``).

    Binarised first, then resized with nearest-neighbour, so the result stays strictly {0, 255}. Like the shard
    job: PNG, JPEG or WebP only (``models.codec.ALLOWED_FORMATS``), the pixel count checked from the header before
    anything is decoded (``max_pixels``), and every bad file, decompression bombs included, one ``ValueError``.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if height <= 0 or width <= 0:
        raise ValueError(f"mask size must be positive, got {size}")
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
            if im.width * im.height > max_pixels:
                raise ValueError(f"{im.width}x{im.height} is over {max_pixels} pixels (a decompression bomb?)")
            if im.width <= 0 or im.height <= 0:
                raise ValueError("zero size")
            gray = np.asarray(im.convert("L"))
    except UnidentifiedImageError:
        raise ValueError(f"mask file is not a {', '.join(ALLOWED_FORMATS)} image") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error, Image.DecompressionBombError) as exc:
        raise ValueError(f"mask file is not a readable image: {one_line(exc)}") from None
    mask = binarize_mask(gray, white_is_hole=white_is_hole, threshold=threshold)
    if mask.shape != (height, width):
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
    return mask


def _key_for(relative: str) -> str:
    stem = posixpath.splitext(relative)[0]
    return stem.replace("/", "_").replace("\\", "_").replace(".", "_")


def import_mask_folder(
    source: str,
    *,
    size: int | tuple[int, int] = 256,
    white_is_hole: bool = True,
    threshold: int = 128,
    storage_options: StorageOptionsLike = None,
) -> list[ImportedMask]:
    """Import every mask file under ``source`` (local path or fsspec URL), sorted by relative path.

    Raises ``ValueError`` when the folder holds no mask files or one of them cannot be read (an
    evaluation set with silently missing masks would change the benchmark).
    """
    fs, root = url_to_fs(source, storage_options)
    root = root.rstrip("/")
    found = fs.find(root, detail=True)
    files = sorted(p for p in found if p.lower().endswith(MASK_EXTENSIONS))
    real_root = os.path.realpath(root)
    for path in files:  # a local symlink may point anywhere: it is followed only inside the folder
        if found[path].get("islink") and not os.path.realpath(path).startswith(real_root.rstrip("/") + "/"):
            raise ValueError(f"{posixpath.relpath(path, root)}: a symlink out of {source}")
    if not files:
        raise ValueError(f"no mask files ({', '.join(MASK_EXTENSIONS)}) under {source}")
    imported: list[ImportedMask] = []
    for path in files:
        relative = posixpath.relpath(path, root) if path.startswith(root) else posixpath.basename(path)
        try:
            info = fs.info(path)
            if int(info.get("size") or 0) > MAX_MASK_FILE_BYTES:
                raise ValueError(f"{info['size']} bytes, over the {MAX_MASK_FILE_BYTES} a mask file may have")
            mask = import_mask(fs.cat_file(path), size=size, white_is_hole=white_is_hole, threshold=threshold)
        except ValueError as exc:
            raise ValueError(f"{relative}: {exc}") from None
        ratio = hole_ratio(mask)
        imported.append(ImportedMask(relative, _key_for(relative), mask, ratio, bucket_of(ratio)))
    return imported


def bucket_counts(masks: Iterable[ImportedMask]) -> dict[str, int]:
    """Number of masks per bucket name (every bucket listed, plus ``"outside"`` for the rest)."""
    counts = Counter(m.bucket or "outside" for m in masks)
    return {name: counts.get(name, 0) for name in (*BUCKET_NAMES, "outside")}


def write_imported_masks(
    masks: Iterable[ImportedMask], dest: str, storage_options: StorageOptionsLike = None
) -> str:
    """Write ``dest/<bucket>/<key>.png`` (masks outside every bucket are left out) and ``dest/index.json``.

    The index records every mask - source, key, hole ratio, bucket (``null`` when outside) - and the
    per-bucket counts; returns its URL.
    """
    records = []
    masks = list(masks)
    for m in masks:
        file = None
        if m.bucket is not None:
            file = f"{m.bucket}/{m.key}.png"
            with open_url(join_url(dest, file), "wb", storage_options) as f:
                f.write(encode_mask_png(m.mask))
        records.append({"source": m.source, "key": m.key, "hole_ratio": m.hole_ratio, "bucket": m.bucket, "file": file})
    index = {"masks": records, "bucket_counts": bucket_counts(masks), "polarity": "255 = hole"}
    url = join_url(dest, "index.json")
    with open_url(url, "wb", storage_options) as f:
        f.write(json.dumps(index, indent=1).encode())
    return url


def import_training_pool(
    source: str,
    dest: str,
    *,
    size: int | tuple[int, int] = 512,
    white_is_hole: bool = True,
    threshold: int = 128,
    storage_options: StorageOptionsLike = None,
) -> str:
    """Import every mask under ``source`` as a training mask pool at ``dest`` (all hole ratios kept); returns the
    pool's index URL for ``data.mask_pool``. Logs :data:`TRAINING_LEAKAGE_WARNING` and records it in the index.

    ``size`` defaults to NVIDIA's native 512: the loader resizes pool masks to the crop itself, with each paper's
    own resampling (RN: bilinear then > 0; LBAM: nearest).
    """
    log.warning("%s (source: %s)", TRAINING_LEAKAGE_WARNING, source)
    masks = import_mask_folder(
        source, size=size, white_is_hole=white_is_hole, threshold=threshold, storage_options=storage_options
    )
    return write_mask_pool(
        ((m.key, m.mask) for m in masks), dest, source=source, storage_options=storage_options,
        extra={"warning": TRAINING_LEAKAGE_WARNING},
    )
