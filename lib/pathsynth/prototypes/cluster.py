"""k-means morphology prototypes and the choice of K.

As in the reference code (STUDY.md B.2): ``KMeans(n_clusters=K, n_init=10, random_state=seed)`` on the
raw (unscaled) CLS features of the filtered training set; a prototype is the cluster index. For the
K sweep the reference tooling scores KMeans on StandardScaler-scaled features with the S_Dbw index
(package ``s-dbw``, which the reference code uses); we add silhouette and Davies-Bouldin from
scikit-learn and report all three.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans
from sklearn.metrics import davies_bouldin_score, silhouette_score
from sklearn.preprocessing import StandardScaler


class ClusteringError(ValueError):
    pass


def check_features(features: np.ndarray, k: int) -> None:
    if features.ndim != 2 or len(features) == 0:
        raise ClusteringError(f"features must be a non-empty [N, D] array, got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ClusteringError("features contain NaN or infinite values")
    if k < 2:
        raise ClusteringError(f"K must be at least 2, got {k}")
    if k > len(features):
        raise ClusteringError(f"K = {k} is larger than the number of images ({len(features)})")
    n_distinct = len(np.unique(features.round(6), axis=0))
    if n_distinct < k:
        raise ClusteringError(f"only {n_distinct} distinct feature vectors for K = {k} prototypes "
                              "(are all features identical? is the extractor collapsed?)")


def fit_kmeans(features: np.ndarray, k: int, n_init: int, seed: int) -> KMeans:
    check_features(features, k)
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed % 2**32).fit(features)


def distances(centroids: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of every feature to every centroid, [N, K], one centroid at a time
    (no [N, K, D] temporary: 16k x 33 x 384 would be 800 MB)."""
    return np.stack([((features - c) ** 2).sum(1) for c in centroids], 1)


def assign(centroids: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Nearest centroid, the k-means assignment rule, for any split or synthetic set."""
    return distances(centroids, features).argmin(1)


def s_dbw(features: np.ndarray, labels: np.ndarray) -> float:
    from s_dbw import S_Dbw

    return float(S_Dbw(features, labels))  # the package's defaults


def k_sweep(features: np.ndarray, ks, n_init: int, seed: int, max_points: int = 5000, progress=None) -> pd.DataFrame:
    """Internal validity indices per K on scaled features (silhouette: higher is better;
    Davies-Bouldin and S_Dbw: lower is better)."""
    rng = np.random.default_rng(seed)
    x = features if len(features) <= max_points else features[rng.choice(len(features), max_points, replace=False)]
    x = StandardScaler().fit_transform(x)
    rows = []
    for k in (progress(ks, desc="K sweep", unit="K") if progress else ks):
        if k > len(x) - 1:
            continue
        lab = KMeans(n_clusters=k, n_init=n_init, random_state=seed % 2**32).fit_predict(x)
        rows.append({"k": k, "silhouette": float(silhouette_score(x, lab, random_state=seed % 2**32)),
                     "davies_bouldin": float(davies_bouldin_score(x, lab)), "s_dbw": s_dbw(x, lab),
                     "n": len(x)})
    return pd.DataFrame(rows)


def choose_k(sweep: pd.DataFrame, criterion: str) -> int:
    best = sweep[criterion].idxmax() if criterion == "silhouette" else sweep[criterion].idxmin()
    return int(sweep.loc[best, "k"])


def recovery(true: np.ndarray, pred: np.ndarray, n_bootstrap: int, seed: int) -> dict:
    """How well prototypes recover known morphology types (the phantom's ground truth): adjusted Rand
    index with a percentile bootstrap 95% CI over images, and normalised mutual information."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    true, pred = np.asarray(true), np.asarray(pred)
    if len(true) != len(pred) or len(true) < 2:
        raise ClusteringError(f"recovery needs two equally long labellings of at least 2 images, got {len(true)} and {len(pred)}")
    rng = np.random.default_rng(seed)
    boot = [adjusted_rand_score(true[i], pred[i]) for i in (rng.integers(0, len(true), len(true)) for _ in range(n_bootstrap))]
    return {"ari": float(adjusted_rand_score(true, pred)), "ari_ci95": np.percentile(boot, [2.5, 97.5]).tolist(),
            "nmi": float(normalized_mutual_info_score(true, pred)), "n": int(len(true)), "n_bootstrap": int(n_bootstrap),
            "n_types": int(len(np.unique(true))), "k": int(len(np.unique(pred))), "seed": int(seed)}


def silhouette(features: np.ndarray, labels: np.ndarray, max_points: int, seed: int) -> dict:
    """Silhouette of the prototypes on the raw features, on a seeded subsample of at most ``max_points``."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(features), min(max_points, len(features)), replace=False)
    return {"value": float(silhouette_score(features[idx], labels[idx], random_state=seed % 2**32)),
            "n": int(len(idx)), "seed": int(seed), "space": "raw CLS features"}


def centroids_in(features: np.ndarray, prototypes: np.ndarray, k: int) -> np.ndarray:
    """The prototypes re-derived in another feature space: the mean, in that space, of the real images the
    prototypes stage assigned to each prototype (a prototype without images is an error). With ``assign``
    this judges a synthetic image's prototype in a space the guidance never saw."""
    missing = sorted(set(range(k)) - set(np.unique(prototypes).tolist()))
    if missing:
        raise ValueError(f"prototypes {missing[:5]} have no real images to re-derive them from")
    return np.stack([features[prototypes == c].mean(0) for c in range(k)])
