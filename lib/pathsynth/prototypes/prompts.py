"""Image-derived prompts exactly as in the paper's code (STUDY.md B.2) and the prompt-balanced subset.

baseline:              ``Histology image of {label} tissue``
morphology-enriched:   ``Histology image of {label} tissue, morphology type {index in words}``
with label ``healthy``/``cancer`` and the 0-based cluster index spelled out by ``inflect``
(21 -> ``twenty-one``).
"""
from __future__ import annotations

from functools import cache

import numpy as np
import pandas as pd

from ..data.dataset import LABEL_NAMES

BASELINE_TEMPLATE = "Histology image of {label} tissue"
MEP_TEMPLATE = "Histology image of {label} tissue, morphology type {cluster}"


@cache
def _engine():
    # imported on first use: inflect takes ~5 s to import (typeguard), and most stages import this
    # module only for its templates and tables
    import inflect
    return inflect.engine()


def number_words(i: int) -> str:
    return _engine().number_to_words(int(i))


def baseline_prompt(label: int) -> str:
    return BASELINE_TEMPLATE.format(label=LABEL_NAMES[int(label)])


def mep_prompt(label: int, cluster: int) -> str:
    return MEP_TEMPLATE.format(label=LABEL_NAMES[int(label)], cluster=number_words(cluster))


def prompt_table(labels: np.ndarray, prototypes: np.ndarray) -> pd.DataFrame:
    """One row per image: label, prototype, both prompts."""
    return pd.DataFrame({"label": labels.astype(int), "prototype": prototypes.astype(int),
                         "prompt_baseline": [baseline_prompt(y) for y in labels],
                         "prompt_mep": [mep_prompt(y, c) for y, c in zip(labels, prototypes)]})


def prompt_balanced_subset(table: pd.DataFrame, min_prompts_per_class: int, seed: int,
                           max_images: int | None = None) -> tuple[np.ndarray, dict]:
    """Rows of the largest subset with an equal count per prompt and per class (reference code
    ``balancing.py``): per class, the n most populated prompts are used, each contributing m images,
    with n >= ``min_prompts_per_class`` prompts per class and 2*n*m as large as possible.

    The reference code scans candidate sizes on a grid and, at the largest feasible size, uses the
    largest feasible n; maximising 2*n*m directly reaches the same optimum without the grid.
    Returns (row indices, summary)."""
    counts = {c: table[table.label == c].prompt_mep.value_counts() for c in (0, 1)}  # sorted, descending
    n_max = min(len(counts[0]), len(counts[1]))
    if n_max < min_prompts_per_class:
        raise ValueError(f"only {n_max} prompts per class occur; at least {min_prompts_per_class} "
                         "(prototypes.balance_min_prompts_per_class) are needed for a prompt-balanced subset")
    best = None
    for n in range(min_prompts_per_class, n_max + 1):
        m = int(min(counts[0].iloc[n - 1], counts[1].iloc[n - 1]))
        if max_images is not None:
            m = min(m, max_images // (2 * n))
        if m > 0 and (best is None or 2 * n * m >= 2 * best[0] * best[1]):
            best = (n, m)
    if best is None:
        raise ValueError("no prompt-balanced subset is possible with these settings")
    n, m = best
    rng = np.random.default_rng(seed)
    rows = []
    for c in (0, 1):
        for prompt in counts[c].index[:n]:
            idx = np.flatnonzero((table.prompt_mep == prompt).to_numpy())
            rows.append(np.sort(rng.choice(idx, m, replace=False)))
    rows = np.sort(np.concatenate(rows))
    return rows, {"prompts_per_class": n, "images_per_prompt": m, "n_images": int(len(rows)),
                  "prompts": sorted(table.prompt_mep.iloc[rows].unique().tolist())}
