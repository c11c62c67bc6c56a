"""Fidelity metrics against independent implementations: scipy's sqrtm and torchmetrics' FID/KID
functions, the `prdc` package, and the closed form of two Gaussians that differ by a shift."""
import numpy as np
import pytest
import torch

from pathsynth.metrics import fidelity as F


def _gauss(n, d, seed, shift=0.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a + shift


def test_fd_matches_torchmetrics_and_scipy():
    from torchmetrics.image.fid import _compute_fid

    x, y = _gauss(400, 8, 0), _gauss(300, 8, 1, 0.3)
    mine = F.fd(x, y)["value"]
    mu1, s1 = torch.tensor(x.mean(0)), torch.tensor(np.cov(x, rowvar=False))
    mu2, s2 = torch.tensor(y.mean(0)), torch.tensor(np.cov(y, rowvar=False))
    assert mine == pytest.approx(float(_compute_fid(mu1, s1, mu2, s2)), rel=1e-6)
    from scipy.linalg import sqrtm

    ref = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(np.cov(x, rowvar=False) + np.cov(y, rowvar=False)
                                                           - 2 * sqrtm(np.cov(x, rowvar=False) @ np.cov(y, rowvar=False)).real)
    assert mine == pytest.approx(ref, rel=1e-8)


def test_fd_of_a_set_to_itself_is_zero_and_a_shift_gives_its_square():
    x = _gauss(500, 6, 2)
    assert F.fd(x, x)["value"] == pytest.approx(0, abs=1e-7)
    delta = np.array([0.5, -1.0, 0, 0, 2.0, 0])
    assert F.fd(x, x + delta)["value"] == pytest.approx((delta ** 2).sum(), rel=1e-6)  # same covariance


def test_fd_bootstrap_ci_brackets_the_value():
    x, y = _gauss(300, 4, 3), _gauss(300, 4, 4, 1.0)
    r = F.fd(x, y, n_bootstrap=100, seed=0)
    assert r["ci95"][0] < r["value"] < r["ci95"][1] and r["n_bootstrap"] == 100


def test_kid_matches_torchmetrics_poly_mmd():
    from torchmetrics.image.kid import poly_mmd

    x, y = _gauss(60, 5, 5), _gauss(60, 5, 6, 0.5)
    ref = float(poly_mmd(torch.tensor(x), torch.tensor(y), degree=3, gamma=None, coef=1.0))
    assert F._poly_mmd2(x, y) == pytest.approx(ref, rel=1e-8)
    k = F.kid(x, y, subsets=10, subset_size=30, seed=1)
    assert k["mean"] > 0 and k["std"] > 0 and k["subsets"] == 10
    assert abs(F.kid(x, _gauss(60, 5, 7), subsets=10, subset_size=30)["mean"]) < k["mean"]


def test_prdc_matches_the_prdc_package():
    from prdc import compute_prdc

    x, y = _gauss(200, 6, 8), _gauss(150, 6, 9, 0.4)
    mine = F.prdc(x, y, k=5)
    ref = compute_prdc(real_features=x, fake_features=y, nearest_k=5)
    for key in ("precision", "recall", "density", "coverage"):
        assert mine[key] == pytest.approx(ref[key], abs=1e-12), key


def test_coverage_by_group_finds_the_missed_group():
    rng = np.random.default_rng(0)
    real = np.concatenate([rng.normal(0, 1, (100, 2)), rng.normal(10, 1, (100, 2))])
    groups = np.repeat([0, 1], 100)
    fake = rng.normal(0, 1, (200, 2))  # only group 0's morphology
    cov = F.coverage_by_group(real, fake, groups, k=5)
    assert cov[0]["coverage"] > 0.8 and cov[1]["coverage"] == 0 and cov[1]["n"] == 100


@pytest.mark.parametrize("real, fake, match", [
    (np.ones((10, 3)), np.ones((10, 4)), "feature widths differ"),
    (np.full((10, 3), np.nan), np.ones((10, 3)), "NaN"),
    (np.ones((1, 3)), np.ones((10, 3)), "at least 2"),
])
def test_bad_features_are_clear_errors(real, fake, match):
    with pytest.raises(F.MetricError, match=match):
        F.fd(real, fake)


def test_kid_subset_larger_than_the_sets_is_an_error():
    with pytest.raises(F.MetricError, match="KID subset size 100 is larger than the sets"):
        F.kid(_gauss(50, 3, 0), _gauss(80, 3, 1), subset_size=100)
