"""The Fréchet distance between two Gaussians (the formula behind FID)."""

from __future__ import annotations

import torch

__all__ = ["feature_statistics", "frechet_distance"]


def _as_float64(x, name: str, ndim: int) -> torch.Tensor:
    try:
        t = torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"frechet_distance: {name} must be array-like of numbers ({e})") from e
    if t.ndim != ndim:
        raise ValueError(f"frechet_distance: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"frechet_distance: {name} contains NaN or inf")
    return t


def _sqrt_psd(sigma: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a (numerically) positive semi-definite matrix."""
    vals, vecs = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

        d² = ‖mu1 − mu2‖² + tr(sigma1) + tr(sigma2) − 2 tr((sigma1 sigma2)^½)

    The trace of the matrix square root is computed without ``scipy.linalg.sqrtm``:
    sigma1 sigma2 has the same eigenvalues as the symmetric PSD matrix
    S = sigma1^½ sigma2 sigma1^½, so tr((sigma1 sigma2)^½) = Σ √λ(S), from two
    symmetric eigen decompositions in float64 (tiny negative eigenvalues from rounding
    are clamped to 0). This is the quantity ``pytorch-fid``'s ``calculate_frechet_distance``
    computes with ``sqrtm``; the two agree to about 1e-12 relative on well-conditioned
    covariances, and this form stays real and stable for singular ones (fewer samples
    than feature dimensions), where ``sqrtm`` needs its ``eps`` fallback.

    Args:
        mu1: mean of the first set, shape (d,); array-like (NumPy, torch, lists).
        sigma1: covariance of the first set, shape (d, d).
        mu2: mean of the second set, shape (d,).
        sigma2: covariance of the second set, shape (d, d).

    Returns:
        The distance (FID when the statistics are of Inception pool features), ≥ 0 up
        to rounding.

    Raises:
        TypeError: if an input is not numeric.
        ValueError: if shapes disagree or an input has NaN/inf.

    Examples:
        >>> import torch
        >>> frechet_distance(torch.zeros(2), torch.eye(2), torch.ones(2), torch.eye(2))
        2.0
        >>> round(frechet_distance([0.0], [[1.0]], [0.0], [[4.0]]), 6)  # (2 - 1)²
        1.0
    """
    m1, m2 = _as_float64(mu1, "mu1", 1), _as_float64(mu2, "mu2", 1)
    s1, s2 = _as_float64(sigma1, "sigma1", 2), _as_float64(sigma2, "sigma2", 2)
    d = m1.shape[0]
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            "frechet_distance: expected mu1, mu2 of shape (d,) and sigma1, sigma2 of shape "
            f"(d, d); got {tuple(m1.shape)}, {tuple(s1.shape)}, {tuple(m2.shape)}, "
            f"{tuple(s2.shape)}"
        )
    root1 = _sqrt_psd(s1)
    inner = root1 @ s2 @ root1
    eig = torch.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = eig.clamp_min(0).sqrt().sum()
    diff = m1 - m2
    return float(diff @ diff + s1.trace() + s2.trace() - 2 * tr_covmean)


def feature_statistics(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of a feature set, the statistics FID compares.

    The covariance is the unbiased one (divided by n − 1), as ``numpy.cov(...,
    rowvar=False)`` and the FID reference compute it; float64 throughout.

    Args:
        features: (n, d) features, e.g. Inception pool features of n images; n ≥ 2.

    Returns:
        ``(mu, sigma)``: (d,) and (d, d) float64 tensors.

    Raises:
        ValueError: if ``features`` is not 2-D with at least two rows, or has NaN/inf.

    Examples:
        >>> mu, sigma = feature_statistics([[0.0, 1.0], [2.0, 3.0]])
        >>> mu.tolist(), sigma.tolist()
        ([1.0, 2.0], [[2.0, 2.0], [2.0, 2.0]])
    """
    x = _as_float64(features, "features", 2)
    if x.shape[0] < 2:
        raise ValueError(f"feature_statistics needs at least 2 rows, got shape {tuple(x.shape)}")
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)
