"""The one feature-file format of the study: frozen-backbone features of named image sets.

A feature file is an HDF5 file with one group per image set (``real_train``, ``real_valid``,
``real_test``, ``synthetic_<mode>``), each holding
    features  float32 [N, D]   e.g. the CLS token of a DINO teacher
    labels    int64   [N]      the set's labels (real: PCam labels; synthetic: the label asked for)
and attributes ``format`` = "pathsynth-features/1" and JSON-able descriptions (backbone, regime,
feature space). Written to ``<name>.tmp`` and renamed when complete. dino_pretrain writes them;
linear_probe and fid_umap_coverage read them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .dataset import DataError

FORMAT = "pathsynth-features/1"


@dataclass
class FeatureSet:
    features: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def write_features(path: str | Path, sets: dict[str, FeatureSet], attrs: dict | None = None) -> Path:
    path = Path(path)
    for name, s in sets.items():
        if s.features.ndim != 2 or len(s.features) != len(s.labels):
            raise DataError(f"{path}: set '{name}' has features {list(s.features.shape)} and {len(s.labels)} labels")
        if not np.isfinite(s.features).all():
            raise DataError(f"{path}: set '{name}' has NaN or infinite features")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for name, s in sets.items():
            g = f.create_group(name)
            g.create_dataset("features", data=s.features.astype(np.float32))
            g.create_dataset("labels", data=np.asarray(s.labels, dtype=np.int64))
        f.attrs["format"] = FORMAT
        for k, v in (attrs or {}).items():
            f.attrs[k] = json.dumps(v, default=str)
    tmp.replace(path)
    return path


def read_features(path: str | Path) -> tuple[dict[str, FeatureSet], dict]:
    """(sets by name, attributes)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: feature file not found")
    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != FORMAT:
            raise DataError(f"{path}: not a pathsynth feature file (attribute 'format' is {f.attrs.get('format')!r})")
        sets = {name: FeatureSet(g["features"][()], g["labels"][()]) for name, g in f.items()}
        attrs = {k: json.loads(v) for k, v in f.attrs.items() if k != "format"}
    return sets, attrs
