"""linear_probe's metrics, tests, probes and the supervised experiment, each against an independent reference."""
import numpy as np
import pytest
from scipy.stats import norm
from sklearn import metrics as skm

from pathsynth.metrics import classification as C
from pathsynth.metrics import cnn as CNN
from pathsynth.metrics import mil as MIL
from pathsynth.metrics import probe as LP
from pathsynth.metrics.fidelity import MetricError


# ------------------------------------------------------------------------------------ point metrics
@pytest.mark.parametrize("case", [
    ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]),
    ([0, 1, 0, 1, 1, 0, 1], [0.5, 0.5, 0.2, 0.9, 0.5, 0.7, 0.1]),  # ties across classes, scores at the threshold
    ([1, 1, 1, 0], [0.2, 0.3, 0.4, 0.9]),  # all decisions wrong: F1 0
    ([0, 1, 1, 0, 1, 0, 0, 0], [0.6, 0.7, 0.7, 0.1, 0.2, 0.0, 0.55, 0.3]),  # imbalanced
])
def test_point_metrics_match_scikit_learn(case):
    y, s = map(np.asarray, case)
    r = C.binary_metrics(y, s)
    pred = (s >= 0.5).astype(int)
    assert r["auroc"] == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert r["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert r["f1"] == pytest.approx(skm.f1_score(y, pred, zero_division=0), abs=1e-12)
    assert r["sensitivity"] == pytest.approx(skm.recall_score(y, pred), abs=1e-12)


def test_bad_scores_are_clear_errors():
    with pytest.raises(MetricError, match="all 4 images have label 1; AUROC needs both classes"):
        C.binary_metrics([1, 1, 1, 1], [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(MetricError, match="3 scores for 4 labels"):
        C.binary_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(MetricError, match="NaN"):
        C.binary_metrics([0, 1, 0, 1], [0.1, np.nan, 0.3, 0.2])
    with pytest.raises(MetricError, match="vector of 0 and 1"):
        C.binary_metrics([0, 2, 0, 1], [0.1, 0.2, 0.3, 0.2])


# ------------------------------------------------------------------------------------ DeLong
def delong_original(y, a, b):
    """DeLong, DeLong & Clarke-Pearson (1988) written from the definition: psi kernel over all m x n pairs,
    structural components V10 (per positive) and V01 (per negative), S = S10/m + S01/n."""
    pos, neg = y == 1, y == 0
    comps = []
    for s in (a, b):
        x, z = s[pos][:, None], s[neg][None, :]
        psi = (x > z) + 0.5 * (x == z)
        comps.append((psi.mean(), psi.mean(1), psi.mean(0)))
    m, n = pos.sum(), neg.sum()
    v10 = np.stack([c[1] for c in comps])
    v01 = np.stack([c[2] for c in comps])
    S = np.cov(v10) / m + np.cov(v01) / n
    diff = comps[0][0] - comps[1][0]
    se = np.sqrt(S[0, 0] + S[1, 1] - 2 * S[0, 1])
    return comps[0][0], comps[1][0], S, 2 * norm.sf(abs(diff / se))


@pytest.mark.parametrize("seed", range(4))
def test_delong_matches_the_original_definition(seed):
    rng = np.random.default_rng(seed)
    n = [40, 73, 150, 31][seed]
    y = (rng.random(n) < 0.45).astype(int)
    y[:2] = [0, 1]
    a = y * 0.8 + rng.normal(size=n)
    b = 0.6 * a + rng.normal(size=n)
    if seed % 2:  # ties, within and across classes
        a, b = np.round(a, 1), np.round(b, 1)
    r = C.delong(y, a, b)
    auc_a, auc_b, S, p = delong_original(y, a, b)
    assert r["auroc_a"] == pytest.approx(auc_a, abs=1e-12) and r["auroc_b"] == pytest.approx(auc_b, abs=1e-12)
    assert r["se"] ** 2 == pytest.approx(S[0, 0] + S[1, 1] - 2 * S[0, 1], abs=1e-8)
    assert r["p"] == pytest.approx(p, abs=1e-8)
    assert C.delong_variance(y, a) == pytest.approx(S[0, 0], abs=1e-8)
    assert r["auroc_a"] == pytest.approx(skm.roc_auc_score(y, a), abs=1e-12)


def test_delong_of_a_score_with_itself_is_no_difference():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30, int), np.ones(30, int)]
    s = y + rng.normal(size=60)
    r = C.delong(y, s, s)
    assert r["difference"] == 0 and r["p"] == 1.0


# ------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_ci_covers_the_true_auroc_at_close_to_the_nominal_rate():
    """Binormal problem: scores N(0, 1) for negatives and N(d, 1) for positives have AUROC Phi(d / sqrt 2).
    Over 300 simulated test sets of 60 + 60 the 95% CI should cover it ~95% of the time (binomial sd 1.3%;
    percentile bootstrap CIs run a little narrow at this N)."""
    d = 1.0
    true = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(1)
    y = np.r_[np.zeros(60, int), np.ones(60, int)]
    hits = 0
    reps = 300
    for i in range(reps):
        s = rng.normal(size=120) + d * y
        lo, hi = C.metrics_with_ci(y, s, n_bootstrap=300, seed=i)["auroc"]["ci95"]
        hits += lo <= true <= hi
    assert 0.90 <= hits / reps <= 0.985, hits / reps


def test_metrics_with_ci_records_n_and_seed_and_brackets_the_estimate():
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(50, int), np.ones(30, int)]
    s = 1 / (1 + np.exp(-(y + rng.normal(size=80))))
    r = C.metrics_with_ci(y, s, n_bootstrap=200, seed=5)
    assert r["n"] == 80 and r["n_positive"] == 30 and "seed 5" in r["ci"]
    for m in C.METRICS:
        assert r[m]["ci95"][0] <= r[m]["value"] <= r[m]["ci95"][1]
    # stratified resamples keep the class counts
    idx = C.stratified_resamples(y, 10, 0)
    assert (y[idx].sum(1) == 30).all()


def test_paired_bootstrap_differences():
    rng = np.random.default_rng(3)
    y = np.r_[np.zeros(80, int), np.ones(80, int)]
    good = 1 / (1 + np.exp(-(3 * y - 1.5 + rng.normal(size=160))))
    bad = 1 / (1 + np.exp(-(0.3 * y - 0.15 + rng.normal(size=160))))
    r = C.paired_bootstrap(y, good, bad, n_bootstrap=500, seed=0)
    for m in C.METRICS:
        expect = C.binary_metrics(y, good)[m] - C.binary_metrics(y, bad)[m]
        assert r[m]["difference"] == pytest.approx(expect)
        assert r[m]["ci95"][0] > 0 and r[m]["p"] < 0.01
    same = C.paired_bootstrap(y, good, good, n_bootstrap=100, seed=0)
    assert same["f1"]["difference"] == 0 and same["f1"]["p"] == 1.0


def test_holm_adjustment():
    p = [0.01, 0.04, 0.03, 0.5]
    # by hand: sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1, then running maximum
    assert C.holm(p) == pytest.approx([0.04, 0.09, 0.09, 0.5])


# ------------------------------------------------------------------------------------ probes
def _features(rng, n, d=16, shift=1.5):
    y = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    f = rng.normal(size=(n, d))
    f[:, 0] += shift * y
    return LP.Split(f.astype(np.float32), y)


def test_linear_probe_learns_and_chooses_c_on_valid():
    rng = np.random.default_rng(0)
    tr, va, te = (_features(rng, n, shift=2.5) for n in (200, 100, 100))
    r = LP.linear_probe(tr, va, te, [0.001, 0.1, 10.0], n_seeds=3, seed=1)
    assert r["C"] in (0.001, 0.1, 10.0) and r["valid_auroc_by_C"][f"{r['C']:g}"] == max(r["valid_auroc_by_C"].values())
    auc = C.binary_metrics(te.labels, r["test_probability"])["auroc"]
    assert auc > 0.85 and auc == pytest.approx(norm.cdf(2.5 / np.sqrt(2)), abs=0.06)  # the Bayes AUROC: 0.961
    assert r["per_seed"]["auroc"]["sd"] < 1e-3  # convex: seeds only move the starting point
    # the same as scikit-learn's LogisticRegression at that C on standardised features
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(tr.features.astype(np.float64))
    ref = LogisticRegression(C=r["C"], max_iter=5000).fit(sc.transform(tr.features), tr.labels)
    np.testing.assert_allclose(r["test_probability"], ref.predict_proba(sc.transform(te.features))[:, 1], atol=1e-3)


def test_probe_bad_input_is_a_clear_error():
    rng = np.random.default_rng(0)
    tr, va, te = _features(rng, 40), _features(rng, 20), _features(rng, 20)
    with pytest.raises(MetricError, match="test: 20 feature rows but 19 labels"):
        LP.linear_probe(tr, va, LP.Split(te.features, te.labels[:19]), [1.0])
    nan = te.features.copy()
    nan[3, 2] = np.nan
    with pytest.raises(MetricError, match=r"test: features contain NaN or infinite values \(rows \[3\]"):
        LP.linear_probe(tr, va, LP.Split(nan, te.labels), [1.0])
    with pytest.raises(MetricError, match="test: all 20 images have label 0"):
        LP.linear_probe(tr, va, LP.Split(te.features, np.zeros(20, int)), [1.0])
    with pytest.raises(MetricError, match="valid: 8-dimensional features, the train split's are 16-dimensional"):
        LP.linear_probe(tr, LP.Split(va.features[:, :8], va.labels), te, [1.0])


def test_knn_probe_is_the_knn_vote():
    from pathsynth.metrics.knn import knn_scores

    rng = np.random.default_rng(1)
    tr, te = _features(rng, 60), _features(rng, 30)
    np.testing.assert_array_equal(LP.knn_probe(tr, te, 7, 0.1), knn_scores(tr.features, tr.labels, te.features, 7, 0.1)[:, 1])


# ------------------------------------------------------------------------------------ supervised
def PV_line(*args) -> str:
    """The message runtime.log_reused logs for these arguments."""
    import logging

    from pathsynth import runtime

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    runtime.log.addHandler(handler)
    level = runtime.log.level
    runtime.log.setLevel(logging.INFO)
    try:
        runtime.log_reused(*args)
    finally:
        runtime.log.removeHandler(handler)
        runtime.log.setLevel(level)
    return records[0].getMessage()


def test_one_balanced_draw_is_nested_in_n():
    y = np.r_[np.zeros(30, int), np.ones(20, int)]
    (small,), (big,) = CNN.balanced_draws(y, 10, 1, 4), CNN.balanced_draws(y, 30, 1, 4)
    assert set(small) <= set(big) and y[small].sum() == 5 and y[big].sum() == 15
    with pytest.raises(ValueError, match="needs 25 images of class 1; there are 20"):
        CNN.balanced_draws(y, 50, 1, 4)
    with pytest.raises(ValueError, match="even size"):
        CNN.balanced_draws(y, 7, 1, 4)


def test_balanced_draws_are_disjoint_where_the_set_holds_them_and_nested_in_n():
    y = np.r_[np.zeros(40, int), np.ones(31, int)]  # class 1 holds 3 x 10 (and one left over)
    draws = CNN.balanced_draws(y, 20, 3, seed=5)
    assert len(draws) == 3 and CNN.disjoint(draws)
    assert all(len(d) == 20 and y[d].sum() == 10 and np.all(np.diff(d) > 0) for d in draws)
    # the first of k draws is the one draw of the same seed; a larger N adds images to every draw
    np.testing.assert_array_equal(draws[0], CNN.balanced_draws(y, 20, 1, 5)[0])
    bigger = CNN.balanced_draws(y, 40, 3, seed=5)
    assert all(set(a) <= set(b) for a, b in zip(draws, bigger)) and not CNN.disjoint(bigger)
    # the whole of the smaller class: every draw holds all of it
    whole = CNN.balanced_draws(y, 62, 3, seed=5)
    assert all(set(np.flatnonzero(y == 1)) <= set(d) for d in whole)
    assert not CNN.disjoint(CNN.balanced_draws(y, 22, 3, seed=5))  # 3 x 11 of class 1 do not fit in 31
    with pytest.raises(ValueError, match="at least one draw"):
        CNN.balanced_draws(y, 20, 0, seed=5)


def test_draw_size_fits_the_draws_or_names_the_short_set():
    y = np.r_[np.zeros(200, int), np.ones(200, int)]
    assert CNN.draw_size({"a": y, "b": y[:-10]}, None, 3) == 126  # b: 190 of class 1 -> 3 x 63
    assert CNN.draw_size({"a": y}, 128, 3) == 128
    with pytest.raises(ValueError, match=r"3 disjoint draws \(n_seeds\) of 128 images .* need 384 .* these hold fewer: \{'b': 380\}"):
        CNN.draw_size({"a": y, "b": y[:-10]}, 128, 3)
    with pytest.raises(ValueError, match="of 0 images"):
        CNN.draw_size({"a": y[:4]}, None, 3)
    with pytest.raises(ValueError, match="of 7 images"):
        CNN.draw_size({"a": y}, 7, 1)


def test_supervised_classifier_learns_on_phantom_data_and_keeps_finished_runs(tmp_path, monkeypatch):
    from pathsynth import config
    from pathsynth.data import phantom

    train = phantom.generate(160, seed=1, artefact_rate=0.0)
    test = phantom.generate(80, seed=2, artefact_rate=0.0, split="test")
    cfg = config.section("linear_probe.supervised", steps=60, batch_size=32)
    tx = CNN.to_tensor(test.x, cfg.image_size)
    assert tx.shape[1:] == (3, cfg.image_size, cfg.image_size)
    p = CNN.supervised_run(train.x, train.y, tx, cfg, 0, tmp_path)
    auc = C.binary_metrics(test.y, p)["auroc"]
    assert auc > 0.8, auc
    # a finished run is read back, not retrained
    monkeypatch.setattr(CNN, "train_cnn", lambda *a, **k: pytest.fail("retrained a finished run"))
    lines = []
    monkeypatch.setattr(CNN, "log_reused", lambda *a: lines.append(PV_line(*a)))
    np.testing.assert_array_equal(CNN.supervised_run(train.x, train.y, tx, cfg, 0, tmp_path), p)
    assert len(list(tmp_path.glob("*.npy"))) == 1
    # and says so in the line the report's timing table reads as "resumed" (its time is not the whole stage's)
    from pathsynth.report.provenance import RESUMED

    assert len(lines) == 1 and RESUMED.search(lines[0]), lines
    # several draws, one CNN seed each: the first is the one-seed run (read back from the cache: n_seeds is not part
    # of its key); the same images under other seeds give other scores, and other images others again
    monkeypatch.undo()
    cfg3 = cfg.model_copy(update={"n_seeds": 3})
    same = CNN.supervised_seeds([(train.x, train.y)] * 3, tx, cfg3, 0, tmp_path)
    assert same.shape == (3, len(test)) and len(list(tmp_path.glob("*.npy"))) == 3
    np.testing.assert_array_equal(same[0], p)
    assert not np.allclose(same[1], same[2])  # seeded apart, not the same run three times
    d = CNN.balanced_draws(train.y, 50, 3, seed=0)
    drawn = CNN.supervised_seeds([(train.x[i], train.y[i]) for i in d], tx, cfg3, 0, tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 6 and not np.allclose(drawn[1], same[1])
    assert len(set(CNN.seed_list(0, 3))) == 3 and CNN.seed_list(7, 1) == [7]
    with pytest.raises(ValueError, match="2 training draws for linear_probe.supervised.n_seeds 3"):
        CNN.supervised_seeds([(train.x, train.y)] * 2, tx, cfg3, 0, tmp_path)


def test_run_spread_matches_sklearn_per_run():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    per_run = y + rng.normal(0, [[0.5], [1.0], [2.0]], (3, 200))
    r = C.run_spread(y, per_run)
    ref = [skm.roc_auc_score(y, p) for p in per_run]
    np.testing.assert_allclose(r["auroc"], ref, atol=1e-6)
    assert r["n"] == 3 and r["min"] == pytest.approx(min(ref)) and r["max"] == pytest.approx(max(ref))
    assert r["sd"] == pytest.approx(np.std(ref, ddof=1)) and r["mean"] == pytest.approx(np.mean(ref))
    assert r["median"] == pytest.approx(np.median(ref))
    assert C.run_spread(y, per_run[:1])["sd"] is None
    with pytest.raises(MetricError, match="one or more finite AUROCs"):
        C.spread([0.7, float("nan")])
    with pytest.raises(MetricError, match="10 scores for 200 labels"):
        C.run_spread(y, per_run[:, :10])


# ------------------------------------------------------------------------------------ slide level
def _slides(rng, n_slides, offset=0):
    feats, labels, ids = [], [], []
    for s in range(n_slides):
        tumour = s % 2
        n = 12
        y = np.zeros(n, int)
        if tumour:
            y[: rng.integers(1, 4)] = 1  # a few tumour patches in a tumour slide
        f = rng.normal(size=(n, 8))
        f[:, 0] += 4.0 * y
        feats.append(f)
        labels.append(y)
        ids += [f"slide_{offset + s}"] * n
    return np.concatenate(feats).astype(np.float32), np.concatenate(labels), np.array(ids)


def test_abmil_finds_tumour_slides():
    rng = np.random.default_rng(0)
    train, test = _slides(rng, 40), _slides(rng, 20, offset=100)
    r = MIL.slide_level(train, test, epochs=40, seed=0)  # the max-pooling oracle reaches 0.95 here
    assert r["n_train_slides"] == 40 and r["n_test_slides"] == 20
    assert skm.roc_auc_score(r["labels"], r["probability"]) > 0.85
    with pytest.raises(MetricError, match="2 slide\\(s\\) are in both train and test"):
        MIL.slide_level(train, (*test[:2], np.where(test[2] == "slide_100", "slide_0", np.where(test[2] == "slide_101", "slide_1", test[2]))))
    with pytest.raises(MetricError, match="slide-level test split: all 1 slides have label 0"):
        MIL.slide_level(train, (test[0][:12], test[1][:12], test[2][:12]))


# ------------------------------------------------------------------------------------ external encoders
def test_external_encoder_from_a_local_weights_file(tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    from pathsynth.prototypes.features import ExtractorError, TimmEncoder

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5)
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    enc = TimmEncoder("r10", "resnet10t", "w.safetensors", tmp_path, input_size=32)
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    f = enc(images)
    model.reset_classifier(0)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - enc.mean) / enc.std
    with torch.no_grad():
        np.testing.assert_allclose(f, model.eval()(x).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ExtractorError, match="linear_probe.external 'uni': weights file .*none.pt does not exist"):
        TimmEncoder("uni", "resnet10t", "none.pt", tmp_path)
    with pytest.raises(ExtractorError, match="cannot load .*w.safetensors as timm model 'resnet18'"):
        TimmEncoder("r18", "resnet18", "w.safetensors", tmp_path)


def test_linear_probe_params_errors():
    from pathsynth import config

    base = config.default_values()
    bad = {**base, "linear_probe": {**base["linear_probe"], "supervised": {**base["linear_probe"]["supervised"], "mixed_mode": "cfg_mep"}},
           "guided_sampling": {**base["guided_sampling"], "modes": ["unguided", "classifier"]},
           "dino_pretrain": {**base["dino_pretrain"], "synthetic_modes": ["classifier"]},
           "reader_stats": {**base["reader_stats"], "sets": ["classifier"]}}
    with pytest.raises(config.ParamsError, match="mixed_mode 'cfg_mep' is not one of guided_sampling.modes"):
        config.validate(bad)
    with pytest.raises(config.ParamsError, match="reader_stats.sets names \\['cfg_mep'\\], which guided_sampling does not make"):
        config.validate({**bad, "reader_stats": base["reader_stats"]})
    clash = {**base, "linear_probe": {**base["linear_probe"], "external": [
        {"name": "real", "timm_model": "resnet10t", "weights": "w.pt"}]}}
    with pytest.raises(config.ParamsError, match="names \\['real'\\] are taken"):
        config.validate(clash)
    with pytest.raises(config.ParamsError, match="c_grid"):
        config.validate({**base, "linear_probe": {**base["linear_probe"], "c_grid": [0.0, 1.0]}})
