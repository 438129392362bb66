"""Fréchet Inception Distance from feature sets: statistics in float64, scipy's matrix square root.

``FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½)`` on the Gaussian fitted to each feature set (mean and
unbiased covariance), as pytorch-fid and torch-fidelity compute it. FID is biased by N (smaller sets give
larger values), so it is only comparable between evaluations of the same N: always report N beside it.
"""

from __future__ import annotations

import logging

import numpy as np

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
    # Imported here, not at the top: training imports this module (validation is the evaluation loop) without ever
    # computing FID, and the GPU hosts' image, where training runs, has no scipy.
    import scipy.linalg

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
    """FID of two (N,D) feature sets (each N ≥ 2).

    With more samples than dimensions in both sets this is :func:`frechet_distance` of their statistics
    (scipy's ``sqrtm``, as pytorch-fid and torch-fidelity). With fewer (a hole bucket of a few hundred images
    against 2048-d pool3 features) the covariances are singular, where ``sqrtm`` is slow and inaccurate (scipy
    warns); the same quantity is then computed exactly from the samples by :func:`_fid_low_rank`.
    """
    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    feature_statistics(real), feature_statistics(fake)  # shape checks
    if min(real.shape[0], fake.shape[0]) - 1 < real.shape[1]:
        return _fid_low_rank(real, fake)
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def _fid_low_rank(real: np.ndarray, fake: np.ndarray) -> float:
    """FID through the samples: with centred A (n₁×D) and B (n₂×D), Σ₁Σ₂ = AᵀA BᵀB / c, c = (n₁−1)(n₂−1), has the
    eigenvalues of (ABᵀ)(ABᵀ)ᵀ / c, so Tr((Σ₁Σ₂)^½) is the nuclear norm of ABᵀ / √c: an n₁×n₂ SVD, exact for any N."""
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature sets differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    a, b = real - real.mean(axis=0), fake - fake.mean(axis=0)
    scale = (real.shape[0] - 1) * (fake.shape[0] - 1)
    diff = real.mean(axis=0) - fake.mean(axis=0)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(scale)
    trace1, trace2 = np.sum(a * a) / (real.shape[0] - 1), np.sum(b * b) / (fake.shape[0] - 1)
    return float(diff @ diff + trace1 + trace2 - 2 * trace_sqrt)
