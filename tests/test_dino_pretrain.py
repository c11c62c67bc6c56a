"""dino_pretrain's parts: the hybrid sampler, the k-NN protocol, the ladder, the feature files, the saved
backbones and the checks on bad input (the stage itself runs in tests/test_stages.py)."""
import numpy as np
import pytest
import torch

from pathsynth import config
from pathsynth.data.dataset import DataError, ImageSet, write_imageset
from pathsynth.data.features import FeatureSet, read_features, write_features
from pathsynth.metrics.fidelity import MetricError
from pathsynth.metrics.knn import knn_accuracy, knn_correct, knn_scores, paired_accuracy
from pathsynth.ssl import pretrain as PT
from pathsynth.training import MixedStream


# ------------------------------------------------------------------ the hybrid sampler
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_mixed_stream_draws_the_requested_share(ratio):
    n_real, n_syn, gb = 37, 23, 16
    s = MixedStream(n_real, n_syn, ratio, gb, seed=4)
    draws = [s(d) for d in range(600)]
    idx = torch.cat(draws)
    share = float((idx >= n_real).float().mean())
    assert abs(share - ratio) <= 1 / (600 * gb) + 1e-12  # Bresenham: within one image over the run
    assert all(len(b) == gb for b in draws)
    for b in draws[:50]:  # every batch's own share is within one image of the ratio
        assert abs(int((b >= n_real).sum()) - ratio * gb) < 1
    # each part is read in epochs: every image once before any image twice
    real = idx[idx < n_real][: 3 * n_real]
    for e in range(3 if ratio < 1 else 0):
        assert sorted(real[e * n_real:(e + 1) * n_real].tolist()) == list(range(n_real))
    if ratio > 0:
        syn = idx[idx >= n_real][: 2 * n_syn] - n_real
        assert sorted(syn[:n_syn].tolist()) == list(range(n_syn))
    # any draw is recomputed alike by a fresh stream (what a resume does), in any order
    fresh = MixedStream(n_real, n_syn, ratio, gb, seed=4)
    for d in (599, 3, 250):
        assert torch.equal(fresh(d), draws[d])


def test_mixed_stream_bad_ratio_and_empty_parts():
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\], got 1.5"):
        MixedStream(10, 10, 1.5, 4, 0)
    with pytest.raises(ValueError, match="needs images in both parts"):
        MixedStream(10, 0, 0.5, 4, 0)


# ------------------------------------------------------------------ k-NN protocol
def test_weighted_knn_matches_scikit_learn():
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16))
    ytr, yte = rng.integers(0, 3, 300), rng.integers(0, 3, 120)
    ftr = centres[ytr] + rng.normal(scale=1.2, size=(300, 16))
    fte = centres[yte] + rng.normal(scale=1.2, size=(120, 16))
    T, k = 0.07, 20
    ref = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute",
                               weights=lambda d: np.exp((1 - d) / T)).fit(ftr, ytr)
    ours = knn_scores(ftr, ytr, fte, k, T)
    np.testing.assert_array_equal(ours.argmax(1), ref.predict(fte))
    np.testing.assert_allclose(ours, ref.predict_proba(fte), rtol=1e-9, atol=1e-12)
    r = knn_accuracy(ftr, ytr, fte, yte, k, T)
    assert r["accuracy"] == pytest.approx(ref.score(fte, yte)) and r["n"] == 120
    assert r["ci95"][0] < r["accuracy"] < r["ci95"][1]


def test_knn_hand_made_case():
    # two training points per class on the unit circle; the query sits next to class 1
    ftr = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], float)
    ytr = np.array([0, 0, 1, 1])
    s = knn_scores(ftr, ytr, np.array([[0.2, 1.0]]), k=3, temperature=0.07)
    assert s.argmax() == 1 and s.sum() == pytest.approx(1.0)


def test_knn_bad_input():
    f = np.ones((5, 3))
    with pytest.raises(MetricError, match="dimensions"):
        knn_scores(f, np.zeros(5, int), np.ones((2, 4)))
    with pytest.raises(MetricError, match="finite"):
        knn_scores(np.full((5, 3), np.nan), np.zeros(5, int), f)
    with pytest.raises(MetricError, match="k = 20"):
        knn_scores(f, np.zeros(5, int), f, k=20)


def test_paired_accuracy_matches_an_exact_binomial_test():
    from scipy.stats import binomtest

    rng = np.random.default_rng(3)
    b = rng.random(400) < 0.7
    a = b.copy()
    a[rng.choice(np.flatnonzero(~b), 40, replace=False)] = True   # a right where b is wrong, 40 times
    a[rng.choice(np.flatnonzero(b), 18, replace=False)] = False   # and wrong where b is right, 18 times
    t = paired_accuracy(a, b, n_bootstrap=2000, seed=1)
    assert (t["only_a_correct"], t["only_b_correct"], t["n"]) == (40, 18, 400)
    assert t["diff"] == pytest.approx((40 - 18) / 400)
    # McNemar's exact test is the two-sided binomial test of the discordant pairs at one half (scipy: independent)
    assert t["p_mcnemar"] == pytest.approx(binomtest(40, 58, 0.5).pvalue, rel=1e-9)
    assert t["ci95"][0] < t["diff"] < t["ci95"][1] and t["ci95"][0] > 0
    assert paired_accuracy(b, b)["p_mcnemar"] == 1.0 and paired_accuracy(b, b)["ci95"] == [0.0, 0.0]
    with pytest.raises(MetricError, match="one length"):
        paired_accuracy(a[:10], b)


def test_paired_knn_tests_against_the_floor_and_the_real_reference():
    dp = config.section("dino_pretrain", ladder=[0.25], synthetic_modes=["classifier"])
    regimes = PT.regimes(dp)
    rng = np.random.default_rng(0)
    floor = rng.random(300) < 0.6
    better = floor | (rng.random(300) < 0.5)           # right wherever the floor is, and on about half the rest
    correct = {r.name: (floor.copy() if r.name in ("random_init", "synthetic_classifier") else better) for r in regimes}
    out = PT.paired_knn_tests(correct, regimes, n_bootstrap=200, seed=0)
    assert out["random_init"] == {}
    assert out["real"]["vs_floor"]["reading"] == "above" and out["real"]["vs_floor"]["p_holm"] < 1e-6
    assert out["synthetic_classifier"]["vs_floor"]["reading"] == "not distinguishable"
    assert out["synthetic_classifier"]["vs_real"]["against"] == "real"
    assert out["synthetic_classifier"]["vs_real"]["reading"] == "below"
    assert out["hybrid_25pct"]["vs_real"]["against"] == "real_25pct"
    assert out["hybrid"]["vs_real"]["reading"] == "not distinguishable" and "vs_real" not in out["real_25pct"]
    # Holm over the floor family (5 trained regimes): the four tied "better" regimes share the smallest raw p, so
    # each is adjusted to min(1, 5 p); the raw p is kept beside it
    p = out["real"]["vs_floor"]["p_mcnemar"]
    assert all(out[n]["vs_floor"]["p_holm"] == pytest.approx(min(1.0, 5 * p)) for n in ("real", "hybrid", "real_25pct", "hybrid_25pct"))
    assert out["synthetic_classifier"]["vs_floor"]["p_holm"] == 1.0
    with pytest.raises(DataError, match="random_init"):
        PT.paired_knn_tests({"real": floor}, regimes[1:2], 10, 0)


def test_knn_probe_decisions_from_exported_features():
    rng = np.random.default_rng(2)
    train = ImageSet(rng.integers(0, 255, (50, 8, 8, 3), dtype=np.uint8), rng.integers(0, 2, 50))
    valid = ImageSet(rng.integers(0, 255, (20, 8, 8, 3), dtype=np.uint8), rng.integers(0, 2, 20))
    probe = PT.KnnProbe(train, valid, k=5, temperature=0.1, device="cpu", max_train=30, seed=1)
    ftr, fva = rng.normal(size=(50, 6)), rng.normal(size=(20, 6))
    got = probe.correct(ftr, fva)
    np.testing.assert_array_equal(got, knn_correct(ftr[probe.bank], train.y[probe.bank], fva, valid.y, 5, 0.1))
    assert got.mean() == knn_accuracy(ftr[probe.bank], train.y[probe.bank], fva, valid.y, 5, 0.1)["accuracy"]


# ------------------------------------------------------------------ regimes and the ladder
def test_regimes_cover_every_kind():
    dp = config.section("dino_pretrain", ladder=[0.1, 0.25], synthetic_modes=["classifier", "cfg_mep"])
    names = [r.name for r in PT.regimes(dp)]
    assert names == ["random_init", "real", "synthetic_classifier", "synthetic_cfg_mep", "hybrid",
                     "real_10pct", "hybrid_10pct", "real_25pct", "hybrid_25pct"]


def test_ladder_is_stratified_and_refuses_an_empty_class():
    y = np.array([0] * 90 + [1] * 10)
    idx = PT.ladder_subset(y, 0.2, seed=1)
    assert (y[idx] == 0).sum() == 18 and (y[idx] == 1).sum() == 2
    np.testing.assert_array_equal(idx, PT.ladder_subset(y, 0.2, seed=1))
    with pytest.raises(DataError, match="fraction 0.01 leaves class 1 .* empty"):
        PT.ladder_subset(y, 0.01, seed=1)


def test_params_errors_name_the_key_and_the_mode():
    with pytest.raises(config.ParamsError, match="dino_pretrain.hybrid_ratio"):
        config.validate({"dino_pretrain": {"hybrid_ratio": 1.5}})
    with pytest.raises(config.ParamsError, match="'cfg_baseline', which guided_sampling does not make"):
        config.validate({"dino_pretrain": {"synthetic_modes": ["cfg_baseline"]}})
    with pytest.raises(config.ParamsError, match="fraction 1.0 must be in"):
        config.validate({"dino_pretrain": {"ladder": [0.5, 1.0]}})


def test_synthetic_sets_missing_or_of_another_size(tmp_path):
    with pytest.raises(DataError, match="did not make"):
        PT.load_synthetic(tmp_path, ["classifier"], 32)
    x = np.zeros((4, 16, 16, 3), np.uint8)
    write_imageset(PT.pretrain_set_path(tmp_path, "classifier"), ImageSet(x, np.array([0, 1, 0, 1])))
    with pytest.raises(DataError, match="16 px, the real ones 32 px"):
        PT.load_synthetic(tmp_path, ["classifier"], 32)
    with pytest.raises(DataError, match="1 training image"):
        PT.check_regime_data("real_1pct", x[:1], x[:0], 8)
    with pytest.raises(DataError, match="fewer than one batch"):
        PT.check_regime_data("real_1pct", x, x[:0], 8)


# ------------------------------------------------------------------ outputs
def test_feature_file_roundtrip_and_bad_input(tmp_path):
    sets = {"real_train": FeatureSet(np.random.rand(5, 4).astype(np.float32), np.array([0, 1, 0, 1, 1])),
            "synthetic_cfg_mep": FeatureSet(np.random.rand(3, 4).astype(np.float32), np.array([1, 0, 1]))}
    p = write_features(tmp_path / "f.h5", sets, {"regime": "real"})
    got, attrs = read_features(p)
    assert attrs == {"regime": "real"} and set(got) == set(sets)
    np.testing.assert_array_equal(got["real_train"].features, sets["real_train"].features)
    with pytest.raises(DataError, match="NaN"):
        write_features(tmp_path / "g.h5", {"x": FeatureSet(np.full((2, 2), np.nan), np.zeros(2))})
    assert not (tmp_path / "g.h5").exists() and not (tmp_path / "g.h5.tmp").exists()


def test_saved_backbone_opens_in_timm_and_in_the_study(tmp_path):
    import json

    import timm

    from pathsynth.prototypes.features import SelfTrained, save_extractor

    dp = config.section("dino_pretrain")
    bb = PT.random_backbone(dp.dino, 32, seed=3)
    folder = save_extractor(bb, dp.dino, 32, tmp_path / "real")
    conf = json.loads((folder / "config.json").read_text())
    m = timm.create_model(conf["timm_name"], pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors")), **conf["timm_kwargs"]).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x), bb(x))
    imgs = (np.random.default_rng(0).random((4, 32, 32, 3)) * 255).astype(np.uint8)
    np.testing.assert_allclose(SelfTrained.load(folder)(imgs), SelfTrained(bb, "")(imgs), rtol=1e-5, atol=1e-6)
