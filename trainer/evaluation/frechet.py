"""The Frechet distance between Gaussians fitted to two feature sets (FID and the digits FD)."""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .errors import EvalError


def feature_stats(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean [D] and (unbiased) covariance [D, D] of features [N, D], in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise EvalError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

    tr((S1 S2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S1^(1/2) S2 S1^(1/2) (same spectrum as S1 S2), so it stays real and finite for
    singular covariances, where an unsymmetric matrix square root needs an offset.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise EvalError(f"feature statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                        f"sigma {s1.shape} vs {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fd_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between two feature sets [N, D] and [M, D]."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))
