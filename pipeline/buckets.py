"""Hole-ratio buckets used by the papers' tables and by holefill's pinned evaluation sets."""

from __future__ import annotations

import math

# (lo, hi] intervals: (0.01,0.1], (0.1,0.2], ..., (0.5,0.6], as in the NVIDIA irregular-mask test set.
HOLE_RATIO_BUCKETS: tuple[tuple[float, float], ...] = (
    (0.01, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.6),
)


def bucket_name(bucket: tuple[float, float]) -> str:
    """Stable label for a bucket, e.g. ``"0.10-0.20"``; safe as an MLflow metric-name suffix."""
    lo, hi = bucket
    return f"{lo:.2f}-{hi:.2f}"


BUCKET_NAMES: tuple[str, ...] = tuple(bucket_name(b) for b in HOLE_RATIO_BUCKETS)


def bucket_of(hole_ratio: float) -> str | None:
    """Name of the bucket holding ``hole_ratio``, or ``None`` when it lies outside every bucket."""
    if math.isnan(hole_ratio):
        return None
    for bucket, name in zip(HOLE_RATIO_BUCKETS, BUCKET_NAMES):
        lo, hi = bucket
        if lo < hole_ratio <= hi:
            return name
    return None
