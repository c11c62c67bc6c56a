"""Probes on frozen features: how much of the tumour label a backbone's features carry linearly.

Linear probe (the eva / CLIP linear-probe protocol with scikit-learn): features standardised on the real
train split, L2-regularised logistic regression (L-BFGS) fitted on real train, its inverse regularisation
C chosen from a log grid by AUROC on the real valid split, then refitted with that C from ``n_seeds`` seeded
random starting points. The problem is convex, so the seeds change only where L-BFGS starts: their spread
(reported) measures optimisation noise, and the test-set uncertainty comes from the bootstrap over test
images. The test score of an image is the mean of the seeds' probabilities.

k-NN probe beside it: the weighted k-NN vote of ``metrics.knn`` (k = 20, T = 0.07), P(cancer) as the score.
"""
from __future__ import annotations

import numpy as np

from ..data.features import FeatureSet
from .classification import binary_metrics, check_scores
from .fidelity import MetricError


# a split's frozen features and labels: the study's one feature-set type (pathsynth.data.features)
Split = FeatureSet


def check_split(name: str, s: Split, width: int | None = None) -> None:
    f = np.asarray(s.features)
    if f.ndim != 2:
        raise MetricError(f"{name}: features must be [N, D], got shape {list(f.shape)}")
    if len(f) != len(s.labels):
        raise MetricError(f"{name}: {len(f)} feature rows but {len(s.labels)} labels")
    if not np.isfinite(f).all():
        raise MetricError(f"{name}: features contain NaN or infinite values "
                          f"(rows {np.flatnonzero(~np.isfinite(f).all(1))[:5].tolist()}...)")
    if width is not None and f.shape[1] != width:
        raise MetricError(f"{name}: {f.shape[1]}-dimensional features, the train split's are {width}-dimensional")
    check_scores(s.labels, np.zeros(len(s.labels)), where=name)


def linear_probe(train: Split, valid: Split, test: Split, c_grid: list[float], n_seeds: int = 5, seed: int = 0,
                 max_iter: int = 5000) -> dict:
    """Returns the chosen C, valid AUROC per C, per-seed test metrics, and the seed-mean test probabilities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    check_split("train", train)
    width = train.features.shape[1]
    check_split("valid", valid, width)
    check_split("test", test, width)
    scaler = StandardScaler().fit(train.features.astype(np.float64))
    tr, va, te = (scaler.transform(s.features.astype(np.float64)) for s in (train, valid, test))
    # one BLAS thread: these problems are small, and threads only contend (25x slower on 2 busy cores, measured)
    with threadpool_limits(1):
        valid_auroc = {}
        for c in c_grid:
            m = LogisticRegression(C=c, max_iter=max_iter).fit(tr, train.labels)
            valid_auroc[c] = binary_metrics(valid.labels, m.predict_proba(va)[:, 1])["auroc"]
        best = max(c_grid, key=lambda c: (valid_auroc[c], -c))  # ties: the stronger regularisation
        probs, per_seed = [], []
        for i in range(n_seeds):
            rng = np.random.default_rng([seed, i])
            m = LogisticRegression(C=best, max_iter=max_iter, warm_start=True)
            m.coef_ = rng.normal(0, 0.01, (1, width))
            m.intercept_ = rng.normal(0, 0.01, 1)
            m.fit(tr, train.labels)
            p = m.predict_proba(te)[:, 1]
            probs.append(p)
            per_seed.append(binary_metrics(test.labels, p))
    spread = {k: {"mean": float(np.mean([r[k] for r in per_seed])), "sd": float(np.std([r[k] for r in per_seed], ddof=1))
                  if n_seeds > 1 else 0.0} for k in per_seed[0]}
    return {"C": best, "valid_auroc_by_C": {f"{c:g}": v for c, v in valid_auroc.items()}, "n_seeds": n_seeds,
            "per_seed": spread, "test_probability": np.mean(probs, axis=0), "n_train": len(train.labels),
            "n_valid": len(valid.labels), "n_test": len(test.labels), "width": width}


def knn_probe(train: Split, test: Split, k: int = 20, temperature: float = 0.07) -> np.ndarray:
    """P(cancer) per test image from the weighted k-NN vote over the train split."""
    from .knn import knn_scores

    check_split("train", train)
    check_split("test", test, train.features.shape[1])
    return knn_scores(train.features, train.labels, test.features, min(k, len(train.labels)), temperature, n_classes=2)[:, 1]
