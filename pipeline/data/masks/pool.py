"""Training mask pools: a precomputed set of masks from which the loader draws a fresh mask each time it loads an
image (the official RN and LBAM loaders' behaviour), instead of the one mask the shard job paired with it.

A pool is a folder with ``masks.tar`` (one ``KEY.mask.png`` per mask, 8-bit gray, 255 = hole, any size) and
``index.json`` (format id, count, size, source, per-mask key and hole ratio). One file to read keeps worker
start-up to one request however many masks the pool holds (NVIDIA's 12,000 irregular masks are ~20 MB of PNGs).

Pools are written by :func:`write_mask_pool` from imported masks (``pipeline.data.masks.importer.import_training_pool``:
the NVIDIA irregular masks, as both papers trained) or from a registered generator (:func:`generated_masks`:
e.g. LBAM's ``lbam_random_field``, its 6,000 extra masks). :class:`MaskPool` loads one or more pools and draws
from them with the loader's seeded generator, so a run is reproducible and an image meets a new mask each time.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np

from pipeline.fsutil import StorageOptionsLike, join_url, open_url
from pipeline.data.imageops import decode_mask_png, encode_mask_png
from pipeline.data.masks.generators import MaskSettings, hole_ratio, make_mask
from pipeline.data.tario import tar_members

__all__ = ["POOL_FORMAT", "MaskPool", "generated_masks", "write_mask_pool"]

POOL_FORMAT = "holefill.mask_pool/1"
_SUFFIX = ".mask.png"


def write_mask_pool(
    masks: Iterable[tuple[str, np.ndarray]],
    dest: str,
    *,
    source: str,
    storage_options: StorageOptionsLike = None,
    extra: dict | None = None,
) -> str:
    """Write ``dest/masks.tar`` and ``dest/index.json`` from ``(key, mask)`` pairs (uint8, 255 = hole); returns
    the index URL. ``source`` says where the masks came from; ``extra`` is merged into the index (e.g. a warning)."""
    records = []
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, mask in masks:
            if "." in key or "/" in key:
                raise ValueError(f"mask pool key {key!r} must not contain '.' or '/'")
            data = encode_mask_png(mask)
            info = tarfile.TarInfo(key + _SUFFIX)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
            records.append({"key": key, "hole_ratio": hole_ratio(mask), "size": list(mask.shape)})
    if not records:
        raise ValueError("a mask pool needs at least one mask")
    with open_url(join_url(dest, "masks.tar"), "wb", storage_options) as f:
        f.write(buffer.getvalue())
    index = {"format": POOL_FORMAT, "count": len(records), "source": source, "polarity": "255 = hole",
             "masks": records, **(extra or {})}
    url = join_url(dest, "index.json")
    with open_url(url, "wb", storage_options) as f:
        f.write(json.dumps(index, indent=1).encode())
    return url


def generated_masks(settings: MaskSettings | str, count: int, seed: int, size: int) -> Iterator[tuple[str, np.ndarray]]:
    """``count`` masks of a registered generator at ``size``², each a function of ``(seed, key)``."""
    if count <= 0 or size <= 0:
        raise ValueError(f"count and size must be > 0, got {count} and {size}")
    for i in range(count):
        key = f"pool{i:06d}"
        yield key, make_mask(settings, seed, key, size, size)


@dataclass
class MaskPool:
    """Masks of one or more pools, kept PNG-encoded in memory; :meth:`draw` decodes one chosen by ``rng``."""

    encoded: list[bytes]

    @classmethod
    def load(cls, index_urls: Sequence[str], storage_options: StorageOptionsLike = None) -> "MaskPool":
        """Read the pools whose ``index.json`` URLs (or folders) are given; a missing or empty pool is an error."""
        encoded: list[bytes] = []
        for url in index_urls:
            folder = url[: -len("/index.json")] if url.endswith("/index.json") else url.rstrip("/")
            with open_url(join_url(folder, "index.json"), "rb", storage_options) as f:
                index = json.loads(f.read())
            if index.get("format") != POOL_FORMAT:
                raise ValueError(f"{url}: not a holefill mask pool (format {index.get('format')!r}, want {POOL_FORMAT})")
            with open_url(join_url(folder, "masks.tar"), "rb", storage_options) as f:
                masks = [data for name, data in tar_members(f, lambda n: n.endswith(_SUFFIX))]
            if len(masks) != index["count"]:
                raise ValueError(f"{url}: masks.tar holds {len(masks)} masks, index.json lists {index['count']}")
            encoded += masks
        if not encoded:
            raise ValueError("mask pool is empty: give at least one pool index")
        return cls(encoded)

    def __len__(self) -> int:
        return len(self.encoded)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One mask (H, W) uint8, 255 = hole, uniformly at random."""
        return decode_mask_png(self.encoded[int(rng.integers(len(self.encoded)))])
