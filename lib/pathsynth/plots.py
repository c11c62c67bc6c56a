"""Small figure helpers shared by the stages' notebooks (image grids, saving)."""
from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np


def image_rows(rows: dict[str, np.ndarray], ncols: int, title: str | None = None, cell: float = 1.1):
    """One row of patches per key (uint8 [n,H,W,3] each); short rows are padded with blanks."""
    fig, axes = plt.subplots(len(rows), ncols, figsize=(ncols * cell + 1.6, len(rows) * cell + 0.4),
                             squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        for c in range(ncols):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if c < len(imgs):
                ax.imshow(imgs[c], interpolation="nearest")
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    height = len(rows) * cell + 0.4
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height) if title else None)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save(fig, path: Path, dpi: int = 110) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def umap_2d(x: np.ndarray, seed: int, n_neighbors: int = 15) -> np.ndarray:
    """A seeded 2-D UMAP embedding of ``x`` (umap-learn). The neighbour graph is computed exactly by
    scikit-learn and handed to umap-learn as ``precomputed_knn``: umap-learn would compute the same
    exact graph below 4,096 points, but with functions numba compiles afresh in every process
    (~10 s of each notebook's UMAP on 2 cores)."""
    import umap  # slow to import (numba); only the cells that draw a UMAP need it
    from sklearn.neighbors import NearestNeighbors

    x = np.asarray(x, np.float32)
    k = min(n_neighbors, len(x) - 1)
    dist, idx = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)  # each point first, at distance 0
    reducer = umap.UMAP(n_components=2, n_neighbors=k, random_state=seed % 2**31, n_jobs=1,
                        precomputed_knn=(idx, dist.astype(np.float32), None))
    with warnings.catch_warnings():  # "no search index, so no transform": this embedding only draws
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        warnings.filterwarnings("ignore", message=".*n_jobs value.*")
        return reducer.fit_transform(x)
