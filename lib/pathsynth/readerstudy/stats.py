"""Statistics of telling synthetic from real, for human and machine readers alike.

"Positive" is synthetic: sensitivity = share of synthetic images called synthetic, specificity = share of real
images called real (the paper's median 0.55 / 0.55). Per reader: both and the accuracy with Wilson 95% CIs
(statsmodels), a two-sided exact binomial test of the accuracy against chance (scipy) and a TOST equivalence test
that the accuracy lies within chance +- margin (statsmodels' ``binom_tost``), each family Holm-corrected across
readers. Agreement: Cohen's kappa per pair of readers on their common images (scikit-learn), Fleiss' kappa
(statsmodels) with a bootstrap CI over images, Krippendorff's alpha (the ``krippendorff`` package, nominal). From
the confidences: a score per read (+confidence when called synthetic, -confidence when called real), an ROC curve
and AUROC per reader.
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd


def wilson(k: int, n: int) -> list[float]:
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return [float("nan"), float("nan")]
    return [float(v) for v in proportion_confint(k, n, alpha=0.05, method="wilson")]


def signed_score(reads: pd.DataFrame) -> np.ndarray:
    return np.where(reads["answer"] == "synthetic", 1, -1) * reads["confidence"].to_numpy()


def reader_row(g: pd.DataFrame, margin: float) -> dict:
    """Detection statistics of one reader's reads (joined with the truth)."""
    from scipy.stats import binomtest
    from sklearn.metrics import roc_auc_score
    from statsmodels.stats.proportion import binom_tost

    syn, real = g[g.truth == "synthetic"], g[g.truth == "real"]
    tp, tn = int((syn.answer == "synthetic").sum()), int((real.answer == "real").sum())
    n = len(g)
    correct = tp + tn
    row = {"n": n, "n_synthetic": len(syn), "n_real": len(real),
           "sensitivity": tp / len(syn) if len(syn) else float("nan"), "sensitivity_ci95": wilson(tp, len(syn)),
           "specificity": tn / len(real) if len(real) else float("nan"), "specificity_ci95": wilson(tn, len(real)),
           "accuracy": correct / n, "accuracy_ci95": wilson(correct, n),
           "p_binomial": float(binomtest(correct, n, 0.5).pvalue),
           "p_tost": float(binom_tost(correct, n, 0.5 - margin, 0.5 + margin)[0])}
    both = len(syn) and len(real)
    row["auroc_confidence"] = float(roc_auc_score(g.truth == "synthetic", signed_score(g))) if both else float("nan")
    return row


def reader_table(reads: pd.DataFrame, margin: float) -> pd.DataFrame:
    """One row per reader (reads joined with the truth; column ``kind`` human / machine carried through),
    with Holm-adjusted p-values across the readers of the table."""
    from statsmodels.stats.multitest import multipletests

    rows = []
    for (reader, kind), g in reads.groupby(["reader_id", "kind"], sort=True):
        rows.append({"reader_id": reader, "kind": kind, **reader_row(g, margin)})
    t = pd.DataFrame(rows)
    if len(t):
        for p in ("p_binomial", "p_tost"):
            t[f"{p}_holm"] = multipletests(t[p].to_numpy(), method="holm")[1]
        t["above_chance"] = (t["p_binomial_holm"] < 0.05) & (t["accuracy"] > 0.5)
        t["equivalent_to_chance"] = t["p_tost_holm"] < 0.05
    return t


def cohen_matrix(reads: pd.DataFrame, min_common: int = 10) -> pd.DataFrame:
    """Cohen's kappa of every pair of readers on the images both read (NaN with fewer than ``min_common``)."""
    from sklearn.metrics import cohen_kappa_score

    wide = reads.pivot(index="image_id", columns="reader_id", values="answer")
    names = list(wide.columns)
    m = pd.DataFrame(np.eye(len(names)), index=names, columns=names)
    for a, b in itertools.combinations(names, 2):
        both = wide[[a, b]].dropna()
        k = cohen_kappa_score(both[a], both[b]) if len(both) >= min_common else float("nan")
        m.loc[a, b] = m.loc[b, a] = k
    return m


def fleiss(reads: pd.DataFrame, n_bootstrap: int, seed: int) -> dict:
    """Fleiss' kappa over the images every reader of ``reads`` answered, with a percentile bootstrap CI over
    images; Krippendorff's alpha (nominal) on the same table."""
    import krippendorff
    from statsmodels.stats.inter_rater import fleiss_kappa

    wide = reads.pivot(index="image_id", columns="reader_id", values="answer").dropna()
    if wide.shape[1] < 2 or len(wide) < 2:
        return {"computed": False, "reason": f"needs 2 or more readers on common images ({wide.shape[1]} readers)"}
    counts = np.stack([(wide == "synthetic").sum(1), (wide == "real").sum(1)], axis=1)
    value = float(fleiss_kappa(counts))
    rng = np.random.default_rng(seed)
    boots = [fleiss_kappa(counts[rng.integers(0, len(counts), len(counts))]) for _ in range(n_bootstrap)]
    boots = np.asarray(boots)[np.isfinite(boots)]
    alpha = krippendorff.alpha(reliability_data=(wide.to_numpy().T == "synthetic").astype(float),
                               level_of_measurement="nominal")
    return {"computed": True, "fleiss_kappa": value, "fleiss_ci95": np.percentile(boots, [2.5, 97.5]).tolist(),
            "krippendorff_alpha": float(alpha), "n_images": int(len(wide)), "n_readers": int(wide.shape[1]),
            "ci": f"percentile bootstrap over images, {n_bootstrap} resamples, seed {seed}"}
