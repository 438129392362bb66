"""Fréchet Inception Distance from feature sets: statistics in float64, scipy's matrix square root.

``FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½)`` on the Gaussian fitted to each feature set (mean and
unbiased covariance), as pytorch-fid and torch-fidelity compute it. FID is biased by N (smaller sets give
larger values), so it is only comparable between evaluations of the same N: always report N beside it.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg

__all__ = ["feature_statistics", "frechet_distance", "fid_from_features"]

log = logging.getLogger(__name__)

_SINGULAR_OFFSET = 1e-6  # pytorch-fid's regularisation when Σ₁Σ₂ is singular


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D,D) with N − 1 normalisation, both float64, of (N,D) features (N ≥ 2)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"feature statistics need an (N,D) array with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians; a negligible imaginary part of the square root is dropped."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics differ in dimension: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("Fréchet distance: singular product of covariances; adding %g to the diagonals", _SINGULAR_OFFSET)
        offset = np.eye(sigma1.shape[0]) * _SINGULAR_OFFSET
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} in the square root")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID of two (N,D) feature sets (each N ≥ 2)."""
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))
