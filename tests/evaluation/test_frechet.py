"""The Fréchet distance against an independent scipy.linalg.sqrtm computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmlayers.evaluation import feature_statistics, frechet_distance


def _scipy_reference(mu1, s1, mu2, s2):
    from scipy import linalg  # the dev extra installs the reference
    covmean = linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _gaussian_stats(rng, n, d, shift=0.0):
    a = rng.normal(size=(d, d))
    x = rng.normal(size=(n, d)) @ a + shift
    return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize(("d", "n"), [(4, 100), (16, 200), (64, 1000)])
def test_equals_scipy_sqrtm(d, n):
    rng = np.random.default_rng(d)
    mu1, s1 = _gaussian_stats(rng, n, d)
    mu2, s2 = _gaussian_stats(rng, n, d, shift=0.5)
    want = _scipy_reference(mu1, s1, mu2, s2)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-6)
    # torch inputs (float32) give the same number up to float32 rounding of the inputs
    t = [torch.as_tensor(v, dtype=torch.float32) for v in (mu1, s1, mu2, s2)]
    assert frechet_distance(*t) == pytest.approx(want, rel=1e-4)


def test_zero_for_identical_sets_and_closed_form():
    rng = np.random.default_rng(0)
    mu, s = _gaussian_stats(rng, 500, 32)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-8 * np.trace(s)
    # Isotropic Gaussians: d² = ‖Δmu‖² + d·(σ1 − σ2)².
    d = 5
    got = frechet_distance(np.zeros(d), 4 * np.eye(d), np.ones(d), 9 * np.eye(d))
    assert got == pytest.approx(d + d * (2 - 3) ** 2, rel=1e-12)


def test_singular_covariances_stay_real():
    rng = np.random.default_rng(1)
    mu1, s1 = _gaussian_stats(rng, 10, 32)  # rank 9 < 32
    mu2, s2 = _gaussian_stats(rng, 10, 32)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got) and got > 0


def test_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="2-D"):
        frechet_distance(np.zeros(3), np.zeros(3), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


def test_feature_statistics_equal_numpy_and_feed_the_distance():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(200, 8)) * 1.5 + 0.2
    mu, sigma = feature_statistics(a)
    assert np.allclose(mu.numpy(), a.mean(0), rtol=0, atol=1e-14)
    assert np.allclose(sigma.numpy(), np.cov(a, rowvar=False), rtol=1e-12, atol=1e-14)
    want = _scipy_reference(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(*feature_statistics(a), *feature_statistics(b)) == pytest.approx(
        want, rel=1e-9)
    with pytest.raises(ValueError, match="at least 2 rows"):
        feature_statistics(np.zeros((1, 3)))
