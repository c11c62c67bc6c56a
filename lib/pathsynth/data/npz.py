"""JPEG-bytes NPZ subsets of PCam (format of ``shared/data/pcam_ai4all/README.md``).

    jpeg     uint8 [total_bytes]  all JPEG files concatenated
    offsets  int64 [N+1]          image i is jpeg[offsets[i]:offsets[i+1]]
    labels   uint8 [N]            0 normal, 1 tumour
    split    str [N]              'train' / 'valid' (/ 'test')
    src_path str [N]              where the file came from

The JPEG bytes are decoded as they are (no second lossy encoding).
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from .dataset import DataError, ImageSet

KEYS = ("jpeg", "offsets", "labels", "split", "src_path")


def _open(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: NPZ file not found")
    try:
        z = np.load(path, allow_pickle=False)
        names = set(z.files)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: not a readable NPZ file ({err})") from None
    missing = [k for k in KEYS if k not in names]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; expected {list(KEYS)}")
    return z


def read_index(path: str | Path) -> dict[str, np.ndarray]:
    """Read and check everything but the pixels (cheap): offsets, labels, splits, paths."""
    path = Path(path)
    z = _open(path)
    try:
        offsets, labels = z["offsets"], z["labels"]
        split, src = z["split"].astype(str), z["src_path"].astype(str)
        n_bytes = z["jpeg"].shape[0]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: truncated or corrupt NPZ ({err})") from None
    n = len(labels)
    if offsets.ndim != 1 or len(offsets) != n + 1:
        raise DataError(f"{path}: 'offsets' must have N+1 = {n + 1} entries, got {offsets.shape}")
    if offsets[0] != 0 or np.any(np.diff(offsets) <= 0) or offsets[-1] != n_bytes:
        raise DataError(f"{path}: 'offsets' must rise from 0 to len(jpeg) = {n_bytes}")
    if len(split) != n or len(src) != n:
        raise DataError(f"{path}: 'split' and 'src_path' must have {n} entries")
    bad = np.setdiff1d(np.unique(labels), [0, 1])
    if bad.size:
        raise DataError(f"{path}: key 'labels' has values out of range (expected 0 or 1): {bad[:5].tolist()}")
    bad_split = sorted(set(np.unique(split)) - {"train", "valid", "test"})
    if bad_split:
        raise DataError(f"{path}: key 'split' has unknown values {bad_split}")
    return {"offsets": offsets, "labels": labels.astype(np.int64), "split": split, "src_path": src}


def read_npz(path: str | Path, splits=("train", "valid", "test"), progress=None) -> dict[str, ImageSet]:
    """Decode the requested splits. A JPEG that does not decode is an error naming it."""
    path = Path(path)
    idx = read_index(path)
    jpeg = _open(path)["jpeg"]
    out = {}
    for s in splits:
        rows = np.flatnonzero(idx["split"] == s)
        if rows.size == 0:
            continue
        it = rows if progress is None else progress(rows, desc=f"decode {path.name}:{s}", unit="img")
        imgs = []
        for i in it:
            o0, o1 = idx["offsets"][i], idx["offsets"][i + 1]
            try:
                im = Image.open(io.BytesIO(jpeg[o0:o1].tobytes()))
                im.load()
                arr = np.asarray(im.convert("RGB"))
            except Exception as err:  # PIL raises many types for broken data
                raise DataError(f"{path}: image {i} ({idx['src_path'][i]}) is not a readable JPEG: {err}") from None
            if imgs and arr.shape != imgs[0].shape:
                raise DataError(f"{path}: image {i} ({idx['src_path'][i]}) has shape {arr.shape}, "
                                f"the others {imgs[0].shape}")
            imgs.append(arr)
        out[s] = ImageSet(np.stack(imgs), idx["labels"][rows],
                          {"source_index": rows, "src_path": idx["src_path"][rows]},
                          {"source": f"npz:{path.name}", "split": s})
    return out


def write_npz(path: str | Path, images: np.ndarray, labels, split, src_path=None, quality: int = 75) -> Path:
    """Write images in the same JPEG-bytes format (used by tests and to export synthetic sets)."""
    blobs = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=2)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64)
    n = len(images)
    src_path = src_path if src_path is not None else [f"img{i:07d}.jpg" for i in range(n)]
    np.savez(path, jpeg=np.concatenate(blobs), offsets=offsets, labels=np.asarray(labels, np.uint8),
             split=np.asarray(split), src_path=np.asarray(src_path))
    return Path(path)


def export_imagesets(folder: str | Path, out: str | Path, quality: int = 75) -> list[dict]:
    """Write every image set ``folder/<name>.h5`` as ``out/guided_sampling_<name>.npz`` in this JPEG-bytes
    format (split 'train', ``src_path`` '<name>/<index>'), with the per-image metadata beside it as
    ``meta_<key>`` arrays: how the lent GPU machine sends synthetic sets back. Images that already went
    through a JPEG round trip at the same quality change by little; the mean and largest absolute
    difference are returned per set, so the loss is on record."""
    from .dataset import read_imageset

    folder, out, rows = Path(folder), Path(out), []
    for h5 in sorted(folder.glob("*.h5")):
        ds = read_imageset(h5)
        dest = out / f"guided_sampling_{h5.stem}.npz"
        write_npz(dest, ds.x, ds.y, ["train"] * len(ds), [f"{h5.stem}/{i}" for i in range(len(ds))], quality)
        z = dict(np.load(dest))
        z.update({f"meta_{k}": np.asarray(v) for k, v in ds.meta.items()})
        np.savez(dest, **z)
        back = read_npz(dest, splits=("train",))["train"].x
        diff = np.abs(back.astype(np.int16) - ds.x.astype(np.int16))
        rows.append({"set": h5.stem, "n": len(ds), "bytes": dest.stat().st_size, "quality": quality,
                     "mean_abs_diff": float(diff.mean()), "max_abs_diff": int(diff.max())})
    return rows


if __name__ == "__main__":  # python -m pathsynth.data.npz export FOLDER OUT [QUALITY]
    import json
    import sys

    if len(sys.argv) not in (4, 5) or sys.argv[1] != "export":
        raise SystemExit("usage: python -m pathsynth.data.npz export FOLDER OUT [QUALITY]")
    report = export_imagesets(sys.argv[2], sys.argv[3], int(sys.argv[4]) if len(sys.argv) == 5 else 75)
    print(json.dumps(report, indent=1))
    (Path(sys.argv[3]) / "export_report.json").write_text(json.dumps(report, indent=1))
