"""Official PatchCamelyon HDF5 files (Veeling et al. 2018), read from a local folder.

Files: ``camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5`` (or ``.h5.gz``, decompressed once
into ``data/raw/pcam``) with keys ``x`` uint8 [N,96,96,3] and ``y`` uint8 [N,1,1,1], plus optional
``..._meta.csv`` (coord_y, coord_x, tumor_patch, center_tumor_patch, wsi).

The opt-in download (``data.source.download: true`` with ``allow_network: true``) fetches the
.h5.gz files from the official Zenodo record 2546921 and checks their MD5s (the checksums of the
PCam README, also used by torchvision.datasets.PCAM). A file is filed under the split its MD5
identifies, because the record has been reported to swap the valid/test file names.
"""
from __future__ import annotations

import gzip
import hashlib
import shutil
import urllib.request
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from .dataset import DataError, ImageSet

RECORD_URL = "https://zenodo.org/records/2546921/files/{name}?download=1"
PREFIX = "camelyonpatch_level_2_split"
MD5 = {  # of the .h5.gz files
    "1571f514728f59376b705fc836ff4b63": "train_x", "35c2d7259d906cfc8143347bb8e05be7": "train_y",
    "d5b63470df7cfa627aeec8b9dc0c066e": "valid_x", "2b85f58b927af9964a4c15b8f7e8f179": "valid_y",
    "d8c2d60d490dbd479f8199bdfa0cf6ec": "test_x", "60a7035772fbdb7f34eb86d4420cf66a": "test_y",
}
SPLIT_SIZES = {"train": 262144, "valid": 32768, "test": 32768}


def file_name(split: str, kind: str) -> str:
    return f"{PREFIX}_{split}_{kind}.h5"


def md5sum(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def download(folder: Path, splits=("train", "valid", "test"), progress=None) -> None:
    """Fetch missing .h5.gz files and verify them. Only called when the user asked for it."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        for kind in ("x", "y"):
            target = folder / (file_name(split, kind) + ".gz")
            if target.exists() or (folder / file_name(split, kind)).exists():
                continue
            tmp = target.with_name(target.name + ".part")
            with urllib.request.urlopen(RECORD_URL.format(name=target.name), timeout=60) as r, open(tmp, "wb") as f:
                total = int(r.headers.get("Content-Length", 0)) or None
                bar = progress(total=total, desc=f"download {target.name}", unit="B") if progress else None
                for block in iter(lambda: r.read(1 << 20), b""):
                    f.write(block)
                    if bar:
                        bar.update(len(block))
                if bar:
                    bar.close()
            digest = md5sum(tmp)
            if digest not in MD5:
                tmp.unlink()
                raise DataError(f"{target.name}: MD5 {digest} matches no official PCam file; download discarded")
            real = folder / f"{PREFIX}_{MD5[digest]}.h5.gz"
            tmp.replace(real)


def _resolve(folder: Path, split: str, kind: str, cache: Path) -> Path:
    plain = folder / file_name(split, kind)
    if plain.is_file():
        return plain
    gz = folder / (file_name(split, kind) + ".gz")
    if gz.is_file():
        out = cache / file_name(split, kind)
        if not out.is_file() or out.stat().st_mtime < gz.stat().st_mtime:  # new or replaced .gz
            cache.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            try:
                with gzip.open(gz, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
            except (OSError, EOFError) as err:
                tmp.unlink(missing_ok=True)
                raise DataError(f"{gz}: corrupt or truncated gzip ({err})") from None
            tmp.replace(out)
        return out
    raise DataError(f"{folder}: missing {plain.name} (or {gz.name}); "
                    "set data.source.download: true and allow_network: true to fetch it")


def _open_key(path: Path, key: str) -> h5py.Dataset:
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file ({err})") from None
    if key not in f:
        raise DataError(f"{path}: missing key '{key}' (keys: {list(f.keys())})")
    return f[key]


def check_split(folder: Path, split: str, cache: Path) -> tuple[Path, Path, int]:
    """Check names, keys, shapes and dtypes without reading the pixels."""
    px, py = _resolve(folder, split, "x", cache), _resolve(folder, split, "y", cache)
    dx, dy = _open_key(px, "x"), _open_key(py, "y")
    if dx.dtype != np.uint8 or dx.ndim != 4 or dx.shape[1:] != (96, 96, 3):
        raise DataError(f"{px}: key 'x' must be uint8 [N,96,96,3], got {dx.dtype} {list(dx.shape)}")
    if dy.shape[0] != dx.shape[0] or int(np.prod(dy.shape[1:])) != 1:
        raise DataError(f"{py}: key 'y' must be [N,1,1,1] with N = {dx.shape[0]}, got {list(dy.shape)}")
    if dx.shape[0] == 0:
        raise DataError(f"{px}: split '{split}' is empty")
    n = dx.shape[0]
    dx.file.close()
    dy.file.close()
    return px, py, n


def read_split(folder: str | Path, split: str, cache: Path, limit: int | None = None, seed: int = 0,
               progress=None) -> ImageSet:
    """Read one split; ``limit`` draws a seeded random subset (sorted indices, read in chunks)."""
    folder = Path(folder)
    px, py, n = check_split(folder, split, cache)
    idx = np.arange(n)
    if limit is not None and limit < n:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
    with h5py.File(py, "r") as f:
        y = f["y"][()].reshape(-1)[idx].astype(np.int64)
    bad = np.setdiff1d(np.unique(y), [0, 1])
    if bad.size:
        raise DataError(f"{py}: key 'y' has labels out of range (expected 0 or 1): {bad[:5].tolist()}")
    x = np.empty((len(idx), 96, 96, 3), np.uint8)
    chunks = range(0, len(idx), 4096)
    with h5py.File(px, "r") as f:
        for s in (progress(chunks, desc=f"read PCam {split}", unit="chunk") if progress else chunks):
            x[s:s + 4096] = f["x"][idx[s:s + 4096]]
    meta = {"source_index": idx}
    csv = folder / f"{PREFIX}_{split}_meta.csv"
    if csv.is_file():
        m = pd.read_csv(csv)
        if len(m) != n:
            raise DataError(f"{csv}: {len(m)} rows, but {px.name} has {n} images")
        for col in ("wsi", "coord_x", "coord_y"):
            if col in m:
                meta[col] = m[col].to_numpy()[idx].astype(str if col == "wsi" else np.int64)
    return ImageSet(x, y, meta, {"source": f"pcam_h5:{folder}", "split": split})
