"""The outlier filter of the reference code (STUDY.md B.1), applied to native-resolution patches.

Per image, in PIL HSV (0-255) and greyscale, a patch is removed if any holds:
mean V < 70 (too dark), mean S < 3 (unstained / glass), std V < 4, std S < 4, std H < 1.5,
variance of the Laplacian < 100 (blurry), fewer than 10 contours of the grey image thresholded at 150
(cv2.findContours, RETR_TREE, CHAIN_APPROX_NONE). The first failing rule is reported as the reason.
"""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
from PIL import Image

from ..config import FilterParams

FEATURES = ("mean_v", "mean_s", "std_v", "std_s", "std_h", "laplacian_var", "n_contours")
RULES = (  # (feature, params attribute, reason)
    ("mean_v", "min_mean_v", "too dark (mean V)"),
    ("mean_s", "min_mean_s", "unstained (mean S)"),
    ("std_v", "min_std_v", "flat (std V)"),
    ("std_s", "min_std_s", "flat (std S)"),
    ("std_h", "min_std_h", "flat hue (std H)"),
    ("laplacian_var", "min_laplacian_var", "blurry (Laplacian variance)"),
    ("n_contours", "min_contours", "few contours"),
)


def image_features(img: np.ndarray, contour_threshold: int = 150) -> dict[str, float]:
    pil = Image.fromarray(img)
    hsv = np.asarray(pil.convert("HSV"), dtype=np.float64)
    grey = np.asarray(pil.convert("L"))
    _, binary = cv2.threshold(grey, contour_threshold, 255, cv2.THRESH_BINARY)
    contours, _ = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_NONE)
    return {
        "mean_v": hsv[..., 2].mean(), "mean_s": hsv[..., 1].mean(),
        "std_v": hsv[..., 2].std(), "std_s": hsv[..., 1].std(), "std_h": hsv[..., 0].std(),
        "laplacian_var": float(cv2.Laplacian(grey, cv2.CV_64F).var()),
        "n_contours": len(contours),
    }


def filter_features(x: np.ndarray, params: FilterParams, progress=None) -> pd.DataFrame:
    """One row per image: the features, ``keep`` and the first failing ``reason`` ('' if kept)."""
    it = range(len(x)) if progress is None else progress(range(len(x)), desc="outlier filter", unit="img")
    df = pd.DataFrame([image_features(x[i], params.contour_threshold) for i in it],
                      columns=list(FEATURES))
    reason = np.full(len(df), "", dtype=object)
    if params.enabled:
        for feat, attr, why in reversed(RULES):  # reversed so the first rule in RULES wins
            reason[df[feat].to_numpy() < getattr(params, attr)] = why
    df["reason"] = reason
    df["keep"] = reason == ""
    return df
