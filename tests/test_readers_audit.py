"""The memorisation audit finds planted copies (also flipped or turned ones); the machine reader is at
chance on two samples of one distribution and near 1 on two clearly different ones."""
import numpy as np
import pytest

from pathsynth.metrics import memorisation as M
from pathsynth.metrics import readers as R
from pathsynth.metrics.fidelity import MetricError


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def test_audit_flags_planted_copies_and_flipped_copies():
    train, test = _images(200, 0), _images(50, 1)
    syn = _images(40, 2)
    syn[:5] = train[10:15]                        # exact copies
    syn[5:10] = train[20:25][:, :, ::-1]          # mirrored copies
    syn[10:12] = np.rot90(train[30:32], 1, axes=(1, 2))  # turned copies
    syn[12] = np.clip(train[40].astype(int) + 3, 0, 255)  # a copy with a small shift of brightness
    d_syn, where = M.pixel_nearest(syn, train)
    d_real, _ = M.pixel_nearest(test, train)
    r = M.audit(d_syn, d_real, quantile=0.01)
    # every planted copy is flagged, far below anything a new image comes to; the other (random) images
    # sit in the real held-out distribution, where a 1% threshold flags about 1% of them by chance
    assert set(range(13)) <= set(np.flatnonzero(d_syn < r["threshold"])) and d_syn[:13].max() < 0.05 * r["real_median"]
    assert r["n_under"] <= 13 + 3 and d_syn[13:].min() > 0.5 * r["real_median"]
    assert list(where[:5]) == [10, 11, 12, 13, 14] and list(where[5:10]) == [20, 21, 22, 23, 24]


def test_audit_errors():
    with pytest.raises(MetricError, match="image sizes differ"):
        M.pixel_nearest(_images(3, 0), np.zeros((3, 8, 8, 3), np.uint8))
    with pytest.raises(MetricError, match="quantile"):
        M.audit(np.ones(3), np.ones(3), 1.5)


def test_c2st_is_at_chance_for_one_distribution_and_near_one_for_two():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    same, dec = R.c2st_linear(a, b, seed=1, n_bootstrap=200)
    assert same["ci95"][0] < 0.5 < same["ci95"][1] and abs(same["auroc"] - 0.5) < 0.1
    assert len(dec) == same["n"] == 300 and set(dec.set) == {"real", "synthetic"}
    diff, _ = R.c2st_linear(a, b + 1.5, seed=1, n_bootstrap=200)
    assert diff["auroc"] > 0.95 and diff["ci95"][0] > 0.9


def test_a_reader_over_seeds_keeps_the_first_seed_and_shows_the_spread():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(120, 8)), rng.normal(size=(120, 8)) + 0.3
    runs = [R.c2st_linear(a, b, seed=s, n_bootstrap=50)[0] for s in (11, 12, 13)]
    r = R.over_reader_seeds(runs)
    aurocs = [x["auroc"] for x in runs]
    assert r["auroc"] == aurocs[0] and r["ci95"] == runs[0]["ci95"] and r["seed"] == 11
    assert r["reader_seeds"]["seeds"] == [11, 12, 13] and r["reader_seeds"]["auroc"] == pytest.approx(aurocs, abs=1e-6)
    assert r["reader_seeds"]["median"] == pytest.approx(np.median(aurocs))
    assert r["reader_seeds"]["sd"] == pytest.approx(np.std(aurocs, ddof=1))
    assert (r["reader_seeds"]["min"], r["reader_seeds"]["max"]) == (min(aurocs), max(aurocs))
    assert len(set(aurocs)) == 3  # another split is another reader: the seed moves the AUROC
    with pytest.raises(MetricError, match="no reader results"):
        R.over_reader_seeds([])


def test_auroc_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    y, s = rng.integers(0, 2, 100), rng.random(100)
    r = R.auroc_ci(y, s, 200, 0)
    assert r["auroc"] == pytest.approx(roc_auc_score(y, s)) and r["ci95"][0] < r["auroc"] < r["ci95"][1]
    assert r["n"] == 100 and "stratified" in r["ci"]


def test_pixel_c2st_is_at_chance_for_one_distribution_and_near_one_for_blur(phantom_small):
    from pathsynth.data.prep import resize

    x = resize(phantom_small.x, 16)
    x = np.concatenate([x, x[:, ::-1], x[:, :, ::-1], np.rot90(x, 1, axes=(1, 2))])  # 192 patches
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    a, b = x[perm[:96]], x[perm[96:]]
    same, dec = R.c2st_cnn(a, b, seed=2, epochs=6, n_bootstrap=200)
    assert same["ci95"][0] < 0.5 < same["ci95"][1], same
    blurred = b.astype(np.float32)
    for _ in range(2):  # a 2x2 box blur, twice: what a weak decoder does to nuclei
        blurred = (blurred + np.roll(blurred, 1, 1) + np.roll(blurred, 1, 2) + np.roll(blurred, (1, 1), (1, 2))) / 4
    diff, dec_diff = R.c2st_cnn(a, blurred.astype(np.uint8), seed=2, epochs=10, n_bootstrap=200)
    assert diff["auroc"] > 0.9, diff
    # as a reader, its decisions use the threshold learned on its training images, so a reader that ranks well
    # also decides well (at 0.5 a batch-norm CNN can call everything synthetic), and its confidences keep the ranking
    r2, k2 = R.machine_reads(dec_diff, "machine:c2st_cnn", "c2st-blur", "cfg_mep")
    assert ((r2.answer == k2.truth).mean()) > 0.8
    assert sorted(r2.confidence.value_counts()) == sorted([len(r2) // 5 + (i < len(r2) % 5) for i in range(5)])
    reads, key = R.machine_reads(dec, "machine:c2st_cnn", "c2st-test", "cfg_mep")
    assert list(reads.columns) == R.READS_COLUMNS and len(reads) == len(key) == len(dec)
    assert set(reads.answer) <= {"real", "synthetic"} and reads.confidence.between(1, 5).all()
    assert "truth" not in reads.columns and key.image_id.str.match(r"^(real|cfg_mep):\d+$").all()
    with pytest.raises(MetricError, match="one size"):
        R.c2st_cnn(a, x[:8, :8, :8], seed=0)


def test_the_learned_threshold_parts_the_training_scores():
    y = np.array([0, 0, 0, 1, 1, 1])
    assert 0.7 < R.train_threshold(y, np.array([0.6, 0.65, 0.7, 0.9, 0.95, 0.99])) < 0.9  # all above 0.5
    assert R.train_threshold(np.array([0, 1]), np.array([0.2, 0.8])) == pytest.approx(0.5)
