"""P-IDS and U-IDS (Zhao et al., CoModGAN; used by MAT): how often a linear SVM on Inception features tells
inpainted images from real ones.

A linear SVM (``sklearn.svm.LinearSVC(dual=False)``) is fitted on the pool3 features of real (label 1) and
inpainted (label 0) images. **U-IDS** is its misclassification rate on those same features (0.5 means the
two sets cannot be told apart). **P-IDS** is the fraction of (real, inpainted) pairs of the same image in
which the inpainted one gets the higher "real" decision value (0.5 is again indistinguishable; 0 is the
usual value for visibly inpainted images). Both depend on N: report N beside them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["inception_discriminative_scores"]


def inception_discriminative_scores(real: np.ndarray, fake: np.ndarray) -> tuple[float, float]:
    """``(p_ids, u_ids)`` of paired (N,D) feature sets: ``fake[i]`` is the inpainted version of ``real[i]``."""
    from sklearn.svm import LinearSVC

    real, fake = np.asarray(real, dtype=np.float64), np.asarray(fake, dtype=np.float64)
    if real.shape != fake.shape or real.ndim != 2 or real.shape[0] < 2:
        raise ValueError(f"P-IDS/U-IDS need paired (N,D) features with N >= 2, got {real.shape} and {fake.shape}")
    inputs = np.concatenate([real, fake])
    labels = np.concatenate([np.ones(len(real)), np.zeros(len(fake))])
    svm = LinearSVC(dual=False)
    svm.fit(inputs, labels)
    u_ids = 1.0 - float(svm.score(inputs, labels))
    real_score, fake_score = svm.decision_function(real), svm.decision_function(fake)
    p_ids = float(np.mean(fake_score > real_score))
    return p_ids, u_ids
