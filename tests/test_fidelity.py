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


@pytest.mark.parametrize("n1, n2, d", [(100, 120, 192), (400, 40, 64), (40, 400, 64)])
def test_fd_matches_scipy_sqrtm_when_n_is_below_the_dimension(n1, n2, d):
    """The study's spaces are wide (192-768) and sets small (N = 128 on tiny): rank-deficient covariances,
    one of them (no Cholesky factor for it: the other is factored) or both (an eigendecomposition)."""
    from scipy.linalg import sqrtm

    x, y = _gauss(n1, d, 5), _gauss(n2, d, 6, 0.2)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert F.fd(x, y)["value"] == pytest.approx(ref, rel=1e-6)


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


def test_fd_ratio_paired_bootstrap():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(400, 8))
    near, far = rng.normal(0.2, 1, size=(400, 8)), rng.normal(1.0, 1, size=(400, 8))
    r = F.fd_ratio(real, near, far, n_bootstrap=100, seed=1)
    assert r["value"] == pytest.approx(F.fd(real, near)["value"] / F.fd(real, far)["value"])
    assert r["ci95"][0] < r["value"] < r["ci95"][1] < 1  # near is closer: the CI excludes 1
    same = F.fd_ratio(real, near, rng.normal(0.2, 1, size=(400, 8)), n_bootstrap=100, seed=1)
    assert same["ci95"][0] < 1 < same["ci95"][1]  # two samples of one distribution: 1 is inside


def test_inception_fid_path_with_a_stand_in_weights_file(tmp_path):
    """The standard-FID path: torchmetrics' NoTrainInceptionV3 from a local weights file. The real FID
    weights cannot be downloaded here, so a stand-in file with the same keys (random weights) is used;
    the features must equal those of the torchmetrics network built from that file directly."""
    from unittest import mock

    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torchmetrics.image.fid import NoTrainInceptionV3

    from pathsynth.metrics import inception

    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None), \
            mock.patch("torch.load", return_value={}):
        stand_in = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path="unused")
    weights = tmp_path / "weights-inception-stand-in.pth"
    torch.save(stand_in.state_dict(), weights)
    assert inception.inception_weights(None, tmp_path) is None
    with pytest.raises(F.MetricError, match="not found"):
        inception.inception_weights("nope.pth", tmp_path)
    imgs = (np.random.default_rng(0).random((3, 32, 32, 3)) * 255).astype(np.uint8)
    f = inception.inception_features(imgs, inception.inception_weights(weights.name, tmp_path), batch_size=2)
    ref = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(weights)).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(imgs).permute(0, 3, 1, 2)).double().numpy()
    assert f.shape == (3, 2048)
    np.testing.assert_allclose(f, want, rtol=1e-5, atol=1e-6)


def test_the_reference_draw_is_the_one_every_committed_run_used():
    from pathsynth.runtime import derive_seed

    # the expression fid_umap_coverage used before it moved into fidelity.reference_draw (so the committed runs'
    # Fréchet distances keep their reference)
    old = np.sort(np.random.default_rng(derive_seed(7, "fid_reference")).choice(500, 120, replace=False))
    np.testing.assert_array_equal(F.reference_draw(500, 120, 7), old)
    np.testing.assert_array_equal(F.reference_draw(50, 120, 7), np.arange(50))  # fewer than asked: all of them
