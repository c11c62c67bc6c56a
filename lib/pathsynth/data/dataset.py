"""The one image-set format of the study, for real and synthetic patches alike.

An image set is an HDF5 file with
    x       uint8 [N, H, W, 3]   RGB patches
    y       int64 [N]            0 = healthy / normal, 1 = cancer / tumour (PCam semantics)
    meta/*  [N]                  per-image metadata: numbers or UTF-8 strings (source index, true
                                 morphology type of the phantom, prototype id, prompt, guidance mode, seed...)
    attrs   format = "pathsynth-imageset/1", plus JSON-able descriptive attributes

Files are written to ``<name>.tmp`` and renamed when complete, so a crash never leaves a file
that looks finished.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

FORMAT = "pathsynth-imageset/1"
LABEL_NAMES = {0: "healthy", 1: "cancer"}  # the words used in the paper's prompts


class DataError(ValueError):
    """Bad input data: the message names the file, key or value."""


@dataclass
class ImageSet:
    x: np.ndarray  # uint8 [N,H,W,3]
    y: np.ndarray  # int64 [N]
    meta: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.y = np.asarray(self.y, dtype=np.int64)
        check_arrays(self.x, self.y, self.meta, where="ImageSet")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def image_size(self) -> int:
        return int(self.x.shape[1])

    def subset(self, idx) -> "ImageSet":
        idx = np.asarray(idx)
        return ImageSet(self.x[idx], self.y[idx], {k: v[idx] for k, v in self.meta.items()}, dict(self.attrs))

    def class_counts(self) -> dict[int, int]:
        return {int(c): int((self.y == c).sum()) for c in (0, 1)}

    def torch_dataset(self):
        """(image float [3,H,W] in [0,1], label) pairs, for DataLoaders."""
        import torch

        x, y = self.x, self.y

        class _DS(torch.utils.data.Dataset):
            def __len__(self):
                return len(y)

            def __getitem__(self, i):
                return torch.from_numpy(x[i]).permute(2, 0, 1).float().div_(255.0), int(y[i])

        return _DS()


def check_arrays(x: np.ndarray, y: np.ndarray, meta: dict, where: str) -> None:
    if x.dtype != np.uint8:
        raise DataError(f"{where}: images 'x' must be uint8, got {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise DataError(f"{where}: images 'x' must have shape [N,H,W,3], got {list(x.shape)}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{where}: labels 'y' must have shape [{len(x)}], got {list(y.shape)}")
    bad = np.setdiff1d(np.unique(y), [0, 1])
    if bad.size:
        raise DataError(f"{where}: label out of range (expected 0 or 1): {bad[:5].tolist()}")
    for k, v in meta.items():
        if len(v) != len(x):
            raise DataError(f"{where}: metadata 'meta/{k}' has {len(v)} rows, expected {len(x)}")


def write_imageset(path: str | Path, ds: ImageSet) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n, h, w, _ = ds.x.shape
    with h5py.File(tmp, "w") as f:
        f.create_dataset("x", data=ds.x, chunks=(min(max(n, 1), 256), h, w, 3), compression="lzf")
        f.create_dataset("y", data=ds.y.astype(np.int64))
        g = f.create_group("meta")
        for k, v in ds.meta.items():
            v = np.asarray(v)
            if v.dtype.kind in "UOS":
                g.create_dataset(k, data=np.asarray(v, dtype=object).astype(str).astype(object),
                                 dtype=h5py.string_dtype())
            else:
                g.create_dataset(k, data=v)
        f.attrs["format"] = FORMAT
        for k, v in ds.attrs.items():
            f.attrs[k] = json.dumps(v, default=str)
    tmp.replace(path)
    return path


def read_imageset(path: str | Path) -> ImageSet:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image set not found")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file ({err})") from None
    with f:
        if f.attrs.get("format") != FORMAT:
            raise DataError(f"{path}: not a pathsynth image set (attribute 'format' is {f.attrs.get('format')!r})")
        for key in ("x", "y"):
            if key not in f:
                raise DataError(f"{path}: missing dataset '{key}'")
        x, y = f["x"][()], f["y"][()]
        meta = {}
        for k, d in f.get("meta", {}).items():
            v = d[()]
            meta[k] = np.asarray([s.decode() if isinstance(s, bytes) else s for s in v]) if v.dtype == object else v
        attrs = {k: json.loads(v) for k, v in f.attrs.items() if k != "format"}
    check_arrays(x, y, meta, where=str(path))
    return ImageSet(x, y, meta, attrs)
