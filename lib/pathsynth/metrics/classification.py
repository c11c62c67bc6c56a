"""Binary classification on a real test split: AUROC, balanced accuracy and F1 with bootstrap CIs, and
paired comparisons of two classifiers scored on the same images.

- Point estimates: AUROC from midranks (equal to scikit-learn's ``roc_auc_score``, tested), balanced
  accuracy and F1 of the decision ``score >= threshold`` from the confusion counts (equal to scikit-learn's).
  Written out because the bootstrap evaluates them on thousands of resamples at once (vectorised here;
  scikit-learn's functions take one resample per call).
- CIs: percentile bootstrap over test images, stratified by class (each resample keeps the class counts,
  so AUROC is always defined).
- Paired tests on the same images: DeLong's test for two correlated AUROCs (DeLong, DeLong & Clarke-Pearson
  1988, in the fast midrank form of Sun & Xu 2014; tested against the original O(mn) definition), and a
  paired bootstrap for balanced accuracy and F1. Families of tests are corrected with Holm's method
  (statsmodels).
"""
from __future__ import annotations

import numpy as np
from scipy.stats import norm, rankdata

from .fidelity import MetricError

METRICS = ("auroc", "balanced_accuracy", "f1")


def check_scores(y, *scores, where: str = "test split") -> np.ndarray:
    """y as int 0/1 with both classes present; every score vector finite and as long as y."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.isin(y, (0, 1)).all():
        raise MetricError(f"{where}: labels must be a vector of 0 and 1")
    if len(np.unique(y)) < 2:
        raise MetricError(f"{where}: all {len(y)} images have label {int(y[0]) if len(y) else '-'}; "
                          "AUROC needs both classes")
    for s in scores:
        s = np.asarray(s)
        if s.shape != y.shape:
            raise MetricError(f"{where}: {len(s)} scores for {len(y)} labels")
        if not np.isfinite(s).all():
            raise MetricError(f"{where}: scores contain NaN or infinite values")
    return y.astype(np.int64)


def _auroc_rows(y: np.ndarray, s: np.ndarray) -> np.ndarray:
    """AUROC of each row of s ([B, N]) against each row of y ([B, N]), via midranks (ties count one half)."""
    r = rankdata(s, axis=1)
    n1 = y.sum(1)
    n0 = y.shape[1] - n1
    return ((r * y).sum(1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _counts_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    tp = (y * pred).sum(-1)
    fp = ((1 - y) * pred).sum(-1)
    fn = (y * (1 - pred)).sum(-1)
    tn = ((1 - y) * (1 - pred)).sum(-1)
    sens = tp / np.maximum(tp + fn, 1)
    spec = tn / np.maximum(tn + fp, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
    return {"balanced_accuracy": (sens + spec) / 2, "f1": f1, "sensitivity": sens, "specificity": spec}


def binary_metrics(y, score, threshold: float = 0.5) -> dict[str, float]:
    """AUROC, balanced accuracy, F1, sensitivity and specificity (decision: score >= threshold)."""
    y = check_scores(y, score)
    s = np.asarray(score, dtype=np.float64)
    out = {"auroc": float(_auroc_rows(y[None], s[None])[0])}
    out.update({k: float(v) for k, v in _counts_metrics(y, (s >= threshold).astype(np.int64)).items()})
    return out


def spread(aurocs) -> dict:
    """Several AUROCs of one experiment rerun (other seeds, draws or splits): each one, and their mean, sample SD,
    median and range: the variance between runs that one run's test-image bootstrap does not see."""
    a = np.asarray(aurocs, dtype=np.float64)
    if a.ndim != 1 or not len(a) or not np.isfinite(a).all():
        raise MetricError(f"a spread needs one or more finite AUROCs, got {list(np.ravel(a))}")
    return {"n": len(a), "auroc": [round(float(v), 6) for v in a], "mean": float(a.mean()),
            "sd": float(a.std(ddof=1)) if len(a) > 1 else None, "median": float(np.median(a)),
            "min": float(a.min()), "max": float(a.max())}


def run_spread(y, per_run) -> dict:
    """Several runs of one experiment scored on the same images (``per_run``: [n_runs, N]): ``spread`` of their
    AUROCs."""
    per_run = np.asarray(per_run, dtype=np.float64)
    y = check_scores(y, *per_run)
    return spread(_auroc_rows(np.broadcast_to(y, per_run.shape), per_run))


def stratified_resamples(y: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    """[n_bootstrap, N] indices: each class resampled with replacement within itself."""
    rng = np.random.default_rng(seed)
    parts = [rng.choice(np.flatnonzero(y == c), size=(n_bootstrap, int((y == c).sum())), replace=True) for c in (0, 1)]
    return np.concatenate(parts, axis=1)


def _boot_values(y, s, idx, threshold):
    yb, sb = y[idx], s[idx]
    vals = {"auroc": _auroc_rows(yb, sb)}
    vals.update(_counts_metrics(yb, (sb >= threshold).astype(np.int64)))
    return vals


def metrics_with_ci(y, score, n_bootstrap: int = 1000, seed: int = 0, threshold: float = 0.5) -> dict:
    """binary_metrics, each with a stratified percentile-bootstrap 95% CI, plus N, class counts and seed."""
    y = check_scores(y, score)
    s = np.asarray(score, dtype=np.float64)
    point = binary_metrics(y, s, threshold)
    boots = _boot_values(y, s, stratified_resamples(y, n_bootstrap, seed), threshold)
    out = {k: {"value": v, "ci95": np.percentile(boots[k], [2.5, 97.5]).tolist()} for k, v in point.items()}
    return {**out, "n": int(len(y)), "n_positive": int(y.sum()), "threshold": threshold,
            "ci": f"stratified percentile bootstrap, {n_bootstrap} resamples, seed {seed}"}


def _delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of the rows of ``scores`` ([k, N]) and their DeLong covariance matrix ([k, k])."""
    order = np.r_[np.flatnonzero(y == 1), np.flatnonzero(y == 0)]
    m = int(y.sum())
    n = len(y) - m
    s = np.atleast_2d(scores)[:, order]
    tx = rankdata(s[:, :m], axis=1)
    ty = rankdata(s[:, m:], axis=1)
    tz = rankdata(s, axis=1)
    aucs = (tz[:, :m].sum(1) / m - (m + 1) / 2) / n
    v01 = (tz[:, :m] - tx) / n  # per positive: share of negatives it outranks (ties one half)
    v10 = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives that outrank it
    return aucs, np.atleast_2d(np.cov(v01) / m + np.cov(v10) / n)


def delong(y, score_a, score_b) -> dict:
    """DeLong's test of AUROC(a) = AUROC(b) for two scores of the same images: both AUROCs, the difference
    a - b with its 95% CI from the DeLong variance, z and the two-sided p-value."""
    y = check_scores(y, score_a, score_b)
    aucs, cov = _delong_components(y, np.stack([np.asarray(score_a, np.float64), np.asarray(score_b, np.float64)]))
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = aucs[0] - aucs[1]
    se = float(np.sqrt(max(var, 0.0)))
    z = diff / se if se > 0 else (0.0 if diff == 0 else float(np.inf * np.sign(diff)))
    q = norm.ppf(0.975)
    return {"auroc_a": float(aucs[0]), "auroc_b": float(aucs[1]), "difference": float(diff),
            "ci95": [float(diff - q * se), float(diff + q * se)], "se": se, "z": float(z),
            "p": float(2 * norm.sf(abs(z))), "test": "DeLong (two-sided)", "n": int(len(y)), "n_positive": int(y.sum())}


def delong_variance(y, score) -> float:
    """The DeLong variance of one AUROC."""
    y = check_scores(y, score)
    return float(_delong_components(y, np.asarray(score, np.float64)[None])[1][0, 0])


def paired_bootstrap(y, score_a, score_b, n_bootstrap: int = 1000, seed: int = 0, threshold: float = 0.5) -> dict:
    """Differences a - b of balanced accuracy and F1 (and AUROC) on the same resampled images: the point
    difference, a percentile 95% CI and a two-sided bootstrap p-value (twice the smaller tail share of
    resampled differences at or beyond 0, with the +1 correction)."""
    y = check_scores(y, score_a, score_b)
    a, b = np.asarray(score_a, np.float64), np.asarray(score_b, np.float64)
    pa, pb = binary_metrics(y, a, threshold), binary_metrics(y, b, threshold)
    idx = stratified_resamples(y, n_bootstrap, seed)
    ba, bb = _boot_values(y, a, idx, threshold), _boot_values(y, b, idx, threshold)
    out = {}
    for k in METRICS:
        d = ba[k] - bb[k]
        tail = min((d <= 0).sum(), (d >= 0).sum())
        out[k] = {"difference": pa[k] - pb[k], "ci95": np.percentile(d, [2.5, 97.5]).tolist(),
                  "p": float(min(1.0, 2 * (tail + 1) / (n_bootstrap + 1)))}
    return {**out, "test": f"paired stratified bootstrap ({n_bootstrap} resamples, seed {seed})", "n": int(len(y))}


def holm(pvalues: list[float]) -> list[float]:
    """Holm-adjusted p-values of a family of tests (statsmodels' multipletests)."""
    from statsmodels.stats.multitest import multipletests

    if not pvalues:
        return []
    return multipletests(np.asarray(pvalues, float), alpha=0.05, method="holm")[1].tolist()
