"""The ground truth's FID Inception features, kept per pinned eval set so each model pays only for its outputs.

FID and P-IDS/U-IDS compare a model's outputs with the truths of the eval set; the truths are the same for
every model evaluated on that set, and their pool3 features are half of the Inception work. With
``evaluation.perceptual.truth_feature_cache`` set (a folder, local or fsspec URL), the first evaluation writes
them to ``truth-pool3-<manifest hash>-<inception sha>-crop<size>.npz`` and later ones read them, so the workers
only run the outputs through the network. The file name carries everything the features depend on.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any, Mapping

import numpy as np

from pipeline.fsutil import join_url, publish_bytes, url_to_fs

__all__ = ["load_truth_features", "save_truth_features", "truth_cache_url"]

log = logging.getLogger(__name__)


def truth_cache_url(folder: str, manifest_hash: str, inception_sha: str, crop_size: int | None,
                    numerics: str = "cpu") -> str:
    """Where the truth features of this eval set, network, crop and numerics (``ray_eval.numerics_class``) live."""
    suffix = "" if numerics == "cpu" else f"-{numerics}"
    return join_url(folder, f"truth-pool3-{manifest_hash[:16]}-{inception_sha[:16]}-crop{crop_size or 'none'}{suffix}.npz")


def load_truth_features(url: str, storage_options: Any = None) -> dict[str, np.ndarray] | None:
    """``{sample key: pool3 (2048,) float32}`` from ``url``, or ``None`` when it does not exist yet."""
    fs, path = url_to_fs(url, storage_options)
    try:
        with fs.open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return None
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        keys = json.loads(arrays["keys"].tobytes().decode())
        features = arrays["features"]
    log.info("read the truth features of %d eval images from %s", len(keys), url)
    return dict(zip(keys, features))


def save_truth_features(url: str, keys: list[str], features: np.ndarray, storage_options: Any = None) -> None:
    """Publish the truth features of ``keys`` (rows of ``features``) atomically at ``url``."""
    buffer = io.BytesIO()
    np.savez(buffer, keys=np.frombuffer(json.dumps(list(keys)).encode(), dtype=np.uint8),
             features=np.asarray(features, dtype=np.float32))
    publish_bytes(url, buffer.getvalue(), storage_options)
    log.info("wrote the truth features of %d eval images to %s", len(keys), url)


def covers(features: Mapping[str, np.ndarray] | None, keys: list[str]) -> bool:
    """Whether ``features`` holds every key of ``keys``."""
    return features is not None and all(k in features for k in keys)
