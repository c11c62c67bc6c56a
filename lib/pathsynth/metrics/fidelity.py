"""Fidelity and diversity of a synthetic set against a real reference, in a named feature space.

Fréchet distance (FD) between Gaussians fitted to two feature sets (Heusel et al. 2017), with a
percentile bootstrap CI over images; kernel distance (KID, Bińkowski et al. 2018: unbiased MMD^2 with
the cubic polynomial kernel) as mean and std over seeded subsets; precision, recall, density and
coverage (Naeem et al. 2020) with k-nearest-neighbour balls. Written with NumPy/SciPy rather than
through torchmetrics' FID/KID classes because those take images and an Inception network, while the
study computes them in its own feature spaces (the prototypes stage's DINO and later backbones); the
tests check every number against torchmetrics' functions, scipy and the ``prdc`` package.

Any FD here is named for its feature space (``fd_dino``, ...): it is not an Inception FID.
"""
from __future__ import annotations

import numpy as np

from ..runtime import derive_seed


class MetricError(ValueError):
    pass


def reference_draw(n_train: int, n_reference: int, seed: int) -> np.ndarray:
    """fid_umap_coverage's real reference: a seeded ``n_reference`` of the ``n_train`` real train images (sorted
    indices; all of them where there are fewer). The benchmarks judge against the same draw."""
    rng = np.random.default_rng(derive_seed(seed, "fid_reference"))
    return np.sort(rng.choice(n_train, min(n_reference, n_train), replace=False))


def check_features(real: np.ndarray, fake: np.ndarray, min_n: int = 2) -> None:
    for name, f in (("real", real), ("synthetic", fake)):
        if f.ndim != 2:
            raise MetricError(f"{name} features must be [N, D], got shape {f.shape}")
        if len(f) < min_n:
            raise MetricError(f"{name} features: {len(f)} images, at least {min_n} needed")
        if not np.isfinite(f).all():
            raise MetricError(f"{name} features contain NaN or infinite values")
    if real.shape[1] != fake.shape[1]:
        raise MetricError(f"feature widths differ: real {real.shape[1]}, synthetic {fake.shape[1]}")


def trace_sqrt_product(sigma1, sigma2) -> float:
    """Tr (S1 S2)^1/2, the sum of the square roots of the eigenvalues of S1 S2. With S1 = L L^T, S1 S2 has the
    eigenvalues of the symmetric L^T S2 L (AB and BA share them), so a Cholesky factor and ``eigvalsh`` give them
    at about a quarter of the cost of the general ``eigvals`` of S1 S2 (bootstrap CIs need hundreds); equal to the
    trace of scipy's sqrtm (tested). A covariance from fewer images than dimensions has no Cholesky factor: the
    other one is factored, or, both singular, S1's eigendecomposition gives L."""
    for a, b in ((sigma1, sigma2), (sigma2, sigma1)):
        try:
            low = np.linalg.cholesky(a)
            break
        except np.linalg.LinAlgError:
            continue
    else:
        w, v = np.linalg.eigh(sigma1)
        low, b = v * np.sqrt(np.clip(w, 0, None)), sigma2
    eig = np.linalg.eigvalsh(low.T @ b @ low)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)."""
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2))


def _shifted_ci(value: float, boots: list[float]) -> list[float]:
    """The percentile 95% interval of the bootstrap values, shifted by the bootstrap's bias estimate
    (mean of the resamples minus the estimate): resampling with replacement repeats images, which
    inflates FD, so the raw percentile interval can lie wholly above the estimate."""
    bias = float(np.mean(boots)) - value
    return np.maximum(np.percentile(boots, [2.5, 97.5]) - bias, 0.0).tolist()  # both statistics are >= 0


def _stats(f: np.ndarray):
    f = f.astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def fd(real: np.ndarray, fake: np.ndarray, n_bootstrap: int = 0, seed: int = 0) -> dict:
    """FD of two feature sets, with a bootstrap 95% CI (images of both sets resampled; ``_shifted_ci``)."""
    check_features(real, fake)
    value = frechet_distance(*_stats(real), *_stats(fake))
    out = {"value": value, "n_real": len(real), "n_fake": len(fake)}
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        boots = [frechet_distance(*_stats(real[rng.integers(0, len(real), len(real))]),
                                  *_stats(fake[rng.integers(0, len(fake), len(fake))])) for _ in range(n_bootstrap)]
        out.update(ci95=_shifted_ci(value, boots), n_bootstrap=n_bootstrap, seed=seed,
                   ci_method="percentile bootstrap over images, shifted by the bootstrap bias")
    return out


def fd_ratio(real: np.ndarray, a: np.ndarray, b: np.ndarray, n_bootstrap: int = 200, seed: int = 0) -> dict:
    """fd(a) / fd(b) against one real reference (the paper's fd(cfg_mep) / fd(cfg_baseline)), with a paired
    bootstrap 95% CI (``_shifted_ci``): each resample draws the real images once for both distances, and the
    images of a and of b; a CI that excludes 1 says one set is closer to real than the other."""
    check_features(real, a)
    check_features(real, b)
    value = frechet_distance(*_stats(real), *_stats(a)) / frechet_distance(*_stats(real), *_stats(b))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_bootstrap):
        r = _stats(real[rng.integers(0, len(real), len(real))])
        boots.append(frechet_distance(*r, *_stats(a[rng.integers(0, len(a), len(a))]))
                     / frechet_distance(*r, *_stats(b[rng.integers(0, len(b), len(b))])))
    return {"value": float(value), "ci95": _shifted_ci(value, boots), "n_real": len(real),
            "n_a": len(a), "n_b": len(b), "n_bootstrap": n_bootstrap, "seed": seed}


def _poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3."""
    d, m = x.shape[1], len(x)
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def kid(real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> dict:
    """KID: MMD^2 over ``subsets`` seeded subsets of ``subset_size`` images of each set (mean, std)."""
    check_features(real, fake)
    if subset_size > min(len(real), len(fake)):
        raise MetricError(f"KID subset size {subset_size} is larger than the sets ({len(real)} real, {len(fake)} "
                          "synthetic images): lower it or give more images")
    rng = np.random.default_rng(seed)
    vals = [_poly_mmd2(real[rng.choice(len(real), subset_size, replace=False)].astype(np.float64),
                       fake[rng.choice(len(fake), subset_size, replace=False)].astype(np.float64))
            for _ in range(subsets)]
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "subsets": subsets, "subset_size": subset_size,
            "seed": seed}


def _knn_radii(x: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(np.maximum(_sqdist(x, x), 0))
    return np.partition(d, k, axis=1)[:, k]  # the k-th neighbour, the point itself being the 0-th


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict:
    """Precision, recall, density and coverage (Naeem et al. 2020) with k-NN balls in the feature space."""
    check_features(real, fake, min_n=k + 1)
    r_real, r_fake = _knn_radii(real, k), _knn_radii(fake, k)
    d = np.sqrt(np.maximum(_sqdist(real, fake), 0))  # [n_real, n_fake]
    inside = d < r_real[:, None]
    return {"precision": float(inside.any(0).mean()),
            "recall": float((d < r_fake[None, :]).any(1).mean()),
            "density": float(inside.sum(0).mean() / k),
            "coverage": float((d.min(1) < r_real).mean()), "k": k, "n_real": len(real), "n_fake": len(fake)}


def coverage_by_group(real: np.ndarray, fake: np.ndarray, groups: np.ndarray, k: int = 5) -> dict:
    """Per real group (a prototype): the share of its real images whose k-NN ball holds a synthetic image,
    i.e. coverage restricted to that morphology. Shows which prototypes a generator misses."""
    check_features(real, fake, min_n=k + 1)
    r_real = _knn_radii(real, k)
    covered = np.sqrt(np.maximum(_sqdist(real, fake), 0)).min(1) < r_real
    return {int(g): {"coverage": float(covered[groups == g].mean()), "n": int((groups == g).sum())}
            for g in np.unique(groups)}
