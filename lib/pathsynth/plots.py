"""Small figure helpers shared by the stages' notebooks (image grids, saving)."""
from __future__ import annotations

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
