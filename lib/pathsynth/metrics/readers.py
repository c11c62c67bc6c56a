"""Machine readers (classifier two-sample tests, C2ST): can a classifier tell synthetic from real?

A reader is trained on part of the images and judged on the rest (stratified split, seeded): its
AUROC on the held-out images with a bootstrap 95% CI, where 0.5 means indistinguishable, and its
per-image decisions, so the reader-study statistics can treat machine readers like human ones. Retrained under
several seeds (``over_reader_seeds``), a reader also shows how far its seed alone moves that AUROC.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from .classification import metrics_with_ci, spread
from .fidelity import MetricError, check_features


def auroc_ci(y: np.ndarray, score: np.ndarray, n_bootstrap: int, seed: int) -> dict:
    """Held-out AUROC with the study's stratified percentile-bootstrap 95% CI (``classification.metrics_with_ci``:
    each resample keeps the split's class counts, as the stratified held-out split does)."""
    m = metrics_with_ci(y, score, n_bootstrap, seed)
    return {"auroc": m["auroc"]["value"], "ci95": m["auroc"]["ci95"], "n": m["n"], "n_bootstrap": n_bootstrap,
            "seed": seed, "ci": m["ci"]}


def train_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """The decision threshold a reader learns on its own training images: the cut between sorted training scores
    with the highest training accuracy (a classifier's 0.5 need not be where its classes part: a small CNN with
    batch norm often scores every image above 0.5 and still ranks them perfectly)."""
    order = np.sort(np.unique(p))
    cuts = np.r_[order[0] - 1e-9, (order[1:] + order[:-1]) / 2, order[-1] + 1e-9]
    acc = [((p >= c) == (y == 1)).mean() for c in cuts]
    return float(cuts[int(np.argmax(acc))])


def c2st_linear(real: np.ndarray, fake: np.ndarray, test_fraction: float = 0.5, seed: int = 0,
                n_bootstrap: int = 500) -> tuple[dict, pd.DataFrame]:
    """Logistic regression on standardised frozen features. Returns the held-out AUROC with its CI and a
    table of held-out decisions (index within its set, truth, P(synthetic))."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    check_features(real, fake, min_n=4)
    x = np.concatenate([real, fake]).astype(np.float64)
    y = np.r_[np.zeros(len(real), int), np.ones(len(fake), int)]
    idx = np.r_[np.arange(len(real)), np.arange(len(fake))]
    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed % 2**32)
    if len(np.unique(y[te])) < 2:
        raise MetricError("the held-out part has one class only: give more images")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x[tr], y[tr])
    p = model.predict_proba(x[te])[:, 1]
    threshold = train_threshold(y[tr], model.predict_proba(x[tr])[:, 1])
    result = {**auroc_ci(y[te], p, n_bootstrap, seed), "reader": "linear probe on frozen features",
              "n_train": int(len(tr)), "test_fraction": test_fraction, "threshold": threshold}
    decisions = pd.DataFrame({"set": np.where(y[te] == 1, "synthetic", "real"), "index": idx[te], "truth": y[te],
                              "p_synthetic": p, "threshold": threshold})
    return result, decisions


def c2st_cnn(real: np.ndarray, fake: np.ndarray, test_fraction: float = 0.5, seed: int = 0, epochs: int = 10,
             batch_size: int = 64, n_bootstrap: int = 500, device: str = "cpu") -> tuple[dict, pd.DataFrame]:
    """A small CNN on pixels (uint8 [N, H, W, 3], random flips and quarter turns as augmentation) trained to
    tell synthetic from real on part of the images; held-out AUROC with its CI and per-image decisions."""
    from sklearn.model_selection import train_test_split

    from .cnn import predict, to_tensor, train_cnn

    if real.ndim != 4 or fake.ndim != 4 or real.shape[1:] != fake.shape[1:]:
        raise MetricError(f"pixel reader: real images {list(real.shape[1:])} and synthetic images "
                          f"{list(fake.shape[1:])} must have one size")
    if min(len(real), len(fake)) < 4:
        raise MetricError("pixel reader: at least 4 real and 4 synthetic images are needed")
    x = to_tensor(np.concatenate([real, fake]))
    y = np.r_[np.zeros(len(real), int), np.ones(len(fake), int)]
    idx = np.r_[np.arange(len(real)), np.arange(len(fake))]
    tr, te = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=seed % 2**32)
    net = train_cnn(x, y, tr, epochs * -(-len(tr) // batch_size), batch_size, seed, device)
    p = predict(net, x[te], device)
    threshold = train_threshold(y[tr], predict(net, x[tr], device))
    result = {**auroc_ci(y[te], p, n_bootstrap, seed), "reader": "small CNN on pixels", "n_train": int(len(tr)),
              "test_fraction": test_fraction, "epochs": epochs, "threshold": threshold}
    decisions = pd.DataFrame({"set": np.where(y[te] == 1, "synthetic", "real"), "index": idx[te], "truth": y[te],
                              "p_synthetic": p, "threshold": threshold})
    return result, decisions


def over_reader_seeds(results: list[dict]) -> dict:
    """One reader retrained under several seeds (held-out split, initialisation, bootstrap): the first seed's result
    (whose decisions go to the reader study) with the ``spread`` of every seed's held-out AUROC beside it. A small
    reader's seed moves its AUROC more than one seed's bootstrap CI shows (benchmarks/README.md), so a single seed's
    AUROC is not the reader's whole answer."""
    if not results:
        raise MetricError("no reader results to summarise")
    return {**results[0], "reader_seeds": {**spread([r["auroc"] for r in results]),
                                           "seeds": [int(r["seed"]) for r in results]}}


READS_COLUMNS = ["reader_id", "packet_id", "image_id", "answer", "confidence", "time_s"]


def machine_reads(decisions: pd.DataFrame, reader_id: str, packet_id: str, synthetic_set: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A machine reader's held-out decisions in the reader-study CSV format (``READS_COLUMNS``): answer 'synthetic'
    where P(synthetic) reaches the threshold the reader learned on its training images (column ``threshold``;
    0.5 without one), confidence 1-5 the quintile of the distance of P(synthetic) from that threshold among this
    reader's decisions (so the confidences keep the reader's ranking, as a human's would), no time; and the
    answer key apart (image_id, truth), as for human readers. Image ids name the set and the index within it."""
    from scipy.stats import rankdata

    image_id = [f"{synthetic_set if s == 'synthetic' else 'real'}:{i}" for s, i in zip(decisions["set"], decisions["index"])]
    p = decisions["p_synthetic"].to_numpy()
    t = decisions["threshold"].to_numpy() if "threshold" in decisions else np.full(len(p), 0.5)
    distance = rankdata(np.abs(p - t)) / len(p)  # in (0, 1]
    reads = pd.DataFrame({"reader_id": reader_id, "packet_id": packet_id, "image_id": image_id,
                          "answer": np.where(p >= t, "synthetic", "real"),
                          "confidence": np.clip(np.ceil(5 * distance), 1, 5).astype(int),
                          "time_s": np.nan})
    key = pd.DataFrame({"packet_id": packet_id, "image_id": image_id,
                        "truth": np.where(decisions["truth"].to_numpy() == 1, "synthetic", "real")})
    return reads, key
