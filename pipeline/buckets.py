"""Hole-ratio buckets used by the papers' tables and by holefill's pinned evaluation sets.

One value and one function decide a sample's bucket everywhere (shard job, manifest histogram, evaluation,
training's validation): the hole ratio is ``hole pixels / pixels`` in float64 (:func:`hole_ratio_of`,
:func:`hole_ratios`; the value the shard job records in each sample's json), and :func:`bucket_of` files it under
``lo < ratio <= hi``. (A float32 mean of the mask is slightly larger than 0.1, 0.2, 0.3, 0.4 and 0.6 at those
exact ratios, which moved edge samples into the next bucket or out of every bucket.)

An eval set may use its own buckets (``eval.buckets`` of the shard job, recorded in its manifest):
:func:`check_buckets` refuses overlapping ones and ones whose labels collide, and evaluation uses them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["BUCKET_NAMES", "Bucket", "HOLE_RATIO_BUCKETS", "bucket_name", "bucket_names", "bucket_of",
           "check_buckets", "hole_ratio_of", "hole_ratios"]

Bucket = tuple[float, float]

# (lo, hi] intervals: (0.01,0.1], (0.1,0.2], ..., (0.5,0.6], as in the NVIDIA irregular-mask test set.
HOLE_RATIO_BUCKETS: tuple[Bucket, ...] = (
    (0.01, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.6),
)


def bucket_name(bucket: Bucket) -> str:
    """Stable label for a bucket, e.g. ``"0.10-0.20"``; safe as an MLflow metric-name suffix."""
    lo, hi = bucket
    return f"{lo:.2f}-{hi:.2f}"


def bucket_names(buckets: Sequence[Bucket] = HOLE_RATIO_BUCKETS) -> tuple[str, ...]:
    """The labels of ``buckets``, in order."""
    return tuple(bucket_name(b) for b in buckets)


BUCKET_NAMES: tuple[str, ...] = bucket_names(HOLE_RATIO_BUCKETS)


def check_buckets(buckets: Sequence[Sequence[float]]) -> tuple[Bucket, ...]:
    """``buckets`` as a tuple of ``(lo, hi)`` after checking them; ``ValueError`` (one line) naming the problem.

    Each must satisfy ``0 <= lo < hi <= 1``; in increasing order and disjoint (``(lo, hi]`` intervals may touch),
    so a hole ratio lies in at most one; with distinct labels (two decimals), which name them in manifests and
    metrics.
    """
    checked = []
    for bucket in buckets:
        if len(bucket) != 2:
            raise ValueError(f"bucket {tuple(bucket)} must be a pair (lo, hi)")
        lo, hi = float(bucket[0]), float(bucket[1])
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"bucket ({lo}, {hi}] must satisfy 0 <= lo < hi <= 1")
        checked.append((lo, hi))
    if not checked:
        raise ValueError("at least one bucket is needed")
    for (lo0, hi0), (lo1, hi1) in zip(checked, checked[1:]):
        if lo1 < hi0:
            raise ValueError(f"buckets ({lo0}, {hi0}] and ({lo1}, {hi1}] overlap or are out of order: "
                             "list disjoint buckets in increasing order")
    names = bucket_names(checked)
    for index, name in enumerate(names):
        if name in names[:index]:
            first = checked[names.index(name)]
            raise ValueError(f"buckets ({first[0]}, {first[1]}] and ({checked[index][0]}, {checked[index][1]}] "
                             f"share the label {name} (two decimals): make them at least 0.01 apart")
    return tuple(checked)


def hole_ratio_of(hole_pixels: int, pixels: int) -> float:
    """The hole ratio every stage buckets: ``hole_pixels / pixels`` in float64 (exact inputs, one rounding)."""
    if pixels <= 0:
        raise ValueError(f"a mask needs at least one pixel, got {pixels}")
    return float(hole_pixels) / float(pixels)


def hole_ratios(mask: torch.Tensor) -> torch.Tensor:
    """Per-image hole ratios (float64, (B,)) of a (B,1,H,W) mask with 1 = hole: the same values as
    :func:`hole_ratio_of` on each image's counts (a float32 mean is not: 0.1f > 0.1)."""
    holes = (mask.detach() > 0.5).flatten(1).sum(dim=1, dtype=torch.float64)
    return (holes / float(mask[0].numel() if mask.shape[0] else 1)).cpu()


def bucket_of(hole_ratio: float, buckets: Sequence[Bucket] = HOLE_RATIO_BUCKETS) -> str | None:
    """Name of the bucket of ``buckets`` holding ``hole_ratio`` (``lo < ratio <= hi``), or ``None`` when outside all."""
    hole_ratio = float(hole_ratio)
    if math.isnan(hole_ratio):
        return None
    for lo, hi in buckets:
        if lo < hole_ratio <= hi:
            return bucket_name((lo, hi))
    return None
