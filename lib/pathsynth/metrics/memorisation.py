"""Memorisation audit: is a synthetic image a copy of a training image?

For each synthetic image, the distance to its nearest neighbour among the images the generator was
trained on, in pixel space (over the eight flips and quarter turns of the synthetic image, so a flipped
or rotated copy is found too) and in a feature space. The same distance for real held-out images (test
to train) says how close genuinely new images come; the copy threshold is a low quantile of it, chosen
in params, and a set is reported with the fraction of its images under that threshold.
"""
from __future__ import annotations

import numpy as np

from .fidelity import MetricError, _sqdist


def dihedral(x: np.ndarray) -> list[np.ndarray]:
    """The eight flips and quarter turns of uint8 images [N, H, W, C]."""
    out = []
    for k in range(4):
        r = np.rot90(x, k, axes=(1, 2))
        out += [r, r[:, :, ::-1]]
    return out


def nearest_distance(queries: np.ndarray, reference: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distance of each query row to its nearest reference row, and that row's index."""
    if queries.shape[1] != reference.shape[1]:
        raise MetricError(f"widths differ: {queries.shape[1]} and {reference.shape[1]}")
    dist, idx = np.empty(len(queries)), np.empty(len(queries), np.int64)
    for s in range(0, len(queries), chunk):
        d = _sqdist(queries[s:s + chunk], reference)
        idx[s:s + chunk] = d.argmin(1)
        dist[s:s + chunk] = np.sqrt(np.maximum(d[np.arange(len(d)), idx[s:s + chunk]], 0))
    return dist, idx


def pixel_nearest(synthetic: np.ndarray, train: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per synthetic image: the smallest RMS pixel distance (0-255) to any training image over the eight
    flips and turns of the synthetic image, and the index of that training image."""
    if synthetic.shape[1:] != train.shape[1:]:
        raise MetricError(f"image sizes differ: synthetic {synthetic.shape[1:]}, training {train.shape[1:]}")
    ref = train.reshape(len(train), -1).astype(np.float32)
    best, where = np.full(len(synthetic), np.inf), np.zeros(len(synthetic), np.int64)
    for view in dihedral(synthetic):
        d, i = nearest_distance(np.ascontiguousarray(view).reshape(len(view), -1).astype(np.float32), ref)
        better = d < best
        best[better], where[better] = d[better], i[better]
    return best / np.sqrt(ref.shape[1]), where


def audit(syn_dist: np.ndarray, real_dist: np.ndarray, quantile: float) -> dict:
    """The copy threshold is the ``quantile`` of real held-out images' nearest-training distances; the
    result gives the share of synthetic images under it, with both distributions summarised."""
    if not 0 < quantile < 1:
        raise MetricError(f"copy-threshold quantile must be in (0, 1), got {quantile}")
    thr = float(np.quantile(real_dist, quantile))
    under = syn_dist < thr
    return {"threshold": thr, "quantile": quantile, "n_synthetic": int(len(syn_dist)), "n_real": int(len(real_dist)),
            "fraction_under": float(under.mean()), "n_under": int(under.sum()),
            "synthetic_median": float(np.median(syn_dist)), "real_median": float(np.median(real_dist))}
