"""Helpers for the evaluation tests: a small pinned eval set written without the shard job (no Ray)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.data.manifest import (
    HoleRatioHistogram,
    Manifest,
    ShardEntry,
    SourceDescription,
    Watermark,
    keys_digest,
    write_manifest,
)
from pipeline.data.masks.generators import hole_ratio


def _encode(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def write_eval_set(folder: Path, samples: Sequence[tuple[str, np.ndarray, np.ndarray]], per_shard: int = 2,
                   buckets: Sequence[Sequence[float]] | None = None) -> str:
    """Shards of ``(key, (H,W,3) uint8 image, (H,W) uint8 mask 255 = hole)`` samples and an eval manifest over them
    (recording ``buckets`` as the shard job would); returns the manifest URL."""
    folder.mkdir(parents=True, exist_ok=True)
    entries, ratios = [], []
    for start in range(0, len(samples), per_shard):
        name = f"shard-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(folder / name)) as writer:
            for key, image, mask in samples[start:start + per_shard]:
                ratios.append(hole_ratio(mask))
                writer.write({"__key__": key, "jpg": _encode(image, "JPEG"), "mask.png": _encode(mask, "PNG"),
                              "json": json.dumps({"key": key, "hole_ratio": ratios[-1]}).encode()})
        data = (folder / name).read_bytes()
        entries.append(ShardEntry(url=name, samples=len(samples[start:start + per_shard]), bytes=len(data),
                                  sha256=hashlib.sha256(data).hexdigest()))
    config = {"eval": {"enabled": True, **({"buckets": [list(b) for b in buckets]} if buckets else {})}}
    manifest = Manifest(
        kind="eval", dataset_version="1",
        source=SourceDescription(kind="file_list", url="/data/list.txt", root="/data", items=len(samples),
                                 list_sha256="0" * 64),
        config=config, shards=entries, total_samples=len(samples), total_bytes=sum(e.bytes for e in entries),
        hole_ratio_histogram=HoleRatioHistogram.of(ratios),
        watermark=Watermark(keys_count=len(samples), max_mtime=0.0, keys_sha256=keys_digest([s[0] for s in samples])),
    )
    return write_manifest(manifest, str(folder))


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """A (H,W,3) uint8 picture with structure: gradients plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x * y) % 256], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def mask_with_holes(height: int, width: int, holes: int) -> np.ndarray:
    """A (H,W) uint8 mask with exactly ``holes`` hole pixels (255), filled row by row from the top."""
    mask = np.zeros(height * width, np.uint8)
    mask[:holes] = 255
    return mask.reshape(height, width)
