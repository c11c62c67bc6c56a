"""Weighted k-NN classification on frozen features: the DINO reference's ``eval_knn`` protocol.

Features are L2-normalised; each test image takes its k most cosine-similar training images, which
vote for their class with weight exp(similarity / T) (k = 20, T = 0.07 in the reference). Written
by hand because scikit-learn's KNeighborsClassifier gives the same decision (a test checks it) but
not in blocks on a GPU, and not the class scores this protocol defines.
"""
from __future__ import annotations

import numpy as np
import torch

from .fidelity import MetricError


def knn_scores(train_f: np.ndarray, train_y: np.ndarray, test_f: np.ndarray, k: int = 20,
               temperature: float = 0.07, n_classes: int | None = None, block: int = 1024) -> np.ndarray:
    """Per test image, the summed vote weight of each class, normalised to sum to 1 ([N_test, C])."""
    train_f, test_f = np.asarray(train_f), np.asarray(test_f)
    for name, f in (("train", train_f), ("test", test_f)):
        if f.ndim != 2 or not np.isfinite(f).all():
            raise MetricError(f"k-NN {name} features must be a finite [N, D] array (shape {f.shape})")
    if train_f.shape[1] != test_f.shape[1]:
        raise MetricError(f"k-NN: train features have {train_f.shape[1]} dimensions, test features {test_f.shape[1]}")
    if len(train_y) != len(train_f):
        raise MetricError(f"k-NN: {len(train_f)} train features but {len(train_y)} labels")
    if not 1 <= k <= len(train_f):
        raise MetricError(f"k-NN: k = {k} needs 1 <= k <= {len(train_f)} (the training images)")
    c = int(n_classes or train_y.max() + 1)
    tr = torch.nn.functional.normalize(torch.as_tensor(train_f, dtype=torch.float64), dim=1)
    te = torch.nn.functional.normalize(torch.as_tensor(test_f, dtype=torch.float64), dim=1)
    ty = torch.as_tensor(np.asarray(train_y), dtype=torch.long)
    out = []
    for s in range(0, len(te), block):
        sim, idx = (te[s:s + block] @ tr.T).topk(k, dim=1)
        w = (sim / temperature).exp()
        votes = torch.zeros(len(sim), c, dtype=torch.float64).scatter_add_(1, ty[idx], w)
        out.append(votes / votes.sum(1, keepdim=True))
    return torch.cat(out).numpy()


def knn_correct(train_f, train_y, test_f, test_y, k: int = 20, temperature: float = 0.07) -> np.ndarray:
    """Per test image, whether the weighted k-NN vote names its class (bool [N_test])."""
    pred = knn_scores(train_f, train_y, test_f, k, temperature,
                      n_classes=int(max(np.max(train_y), np.max(test_y)) + 1)).argmax(1)
    return pred == np.asarray(test_y)


def knn_accuracy(train_f, train_y, test_f, test_y, k: int = 20, temperature: float = 0.07) -> dict:
    """Top-1 accuracy of the weighted k-NN vote with a Wilson 95% CI over the N test images."""
    from statsmodels.stats.proportion import proportion_confint

    hits = int(knn_correct(train_f, train_y, test_f, test_y, k, temperature).sum())
    n = len(test_y)
    lo, hi = proportion_confint(hits, n, alpha=0.05, method="wilson")
    return {"accuracy": hits / n, "ci95": [float(lo), float(hi)], "n": n, "n_train": int(len(train_f)),
            "k": k, "temperature": temperature}


def paired_accuracy(correct_a, correct_b, n_bootstrap: int = 2000, seed: int = 0) -> dict:
    """Accuracy of classifier a minus classifier b on the same test images: the difference, its paired
    percentile-bootstrap 95% CI (test images resampled, both kept together) and the exact McNemar test on the
    discordant images (statsmodels; with paired decisions this is far more sensitive than comparing the two
    Wilson intervals, which overlap long before the difference stops being significant)."""
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise MetricError(f"paired accuracy: the two decision vectors must be 1-d, non-empty and of one length "
                          f"({a.shape} vs {b.shape})")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_bootstrap, len(a)))
    boots = a[idx].mean(1) - b[idx].mean(1)
    p = 1.0 if only_a + only_b == 0 else float(
        mcnemar([[int((a & b).sum()), only_a], [only_b, int((~a & ~b).sum())]], exact=True).pvalue)
    return {"accuracy_a": float(a.mean()), "accuracy_b": float(b.mean()), "diff": float(a.mean() - b.mean()),
            "ci95": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
            "only_a_correct": only_a, "only_b_correct": only_b, "p_mcnemar": p, "n": int(len(a)),
            "test": f"exact McNemar; CI: paired percentile bootstrap ({n_bootstrap} resamples, seed {seed})"}
