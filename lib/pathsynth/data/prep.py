"""The data_prep stage: sources -> outlier filter -> class balance -> resize -> image sets.

Every input is checked before any pixel is processed; the splits are written into a temporary
folder that replaces the output folder only when all of them are complete.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..config import Params, Source
from ..runtime import derive_seed
from . import npz, pcam, phantom
from .dataset import DataError, ImageSet, write_imageset
from .filters import filter_features

SPLITS = ("train", "valid", "test")


@dataclass
class PrepResult:
    splits: dict[str, ImageSet]  # final, resized
    raw_counts: pd.DataFrame  # split x class before filtering
    filter_report: pd.DataFrame  # one row per raw image: split, label, features, keep, reason
    removed_examples: dict[str, np.ndarray]  # reason -> a few native-resolution removed patches


def _resolve_path(root: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


def check_source(src: Source, root: Path, splits) -> None:
    """Cheap checks of a source before any work (files, keys, shapes, labels)."""
    if src.kind == "phantom":
        for s in splits:
            if (src.counts.get(s) or 0) <= 0:
                raise DataError(f"phantom source: counts.{s} must be > 0 (the split would be empty)")
    elif src.kind == "npz":
        idx = npz.read_index(_resolve_path(root, src.path))
        for s in splits:
            if not (idx["split"] == s).any():
                raise DataError(f"{src.path}: split '{s}' is empty (key 'split' has {sorted(set(idx['split']))})")
    elif src.kind == "pcam_h5":
        folder = _resolve_path(root, src.path)
        if not src.download:
            for s in splits:
                pcam.check_split(folder, s, root / "data" / "raw" / "pcam")


def load_source(src: Source, root: Path, splits, seed: int, progress=None,
                allow_network: bool = False) -> dict[str, ImageSet]:
    if src.kind == "phantom":
        return {s: phantom.generate(src.counts[s], derive_seed(seed, "phantom", src.seed_offset, s),
                                    progress=progress, split=s) for s in splits}
    if src.kind == "npz":
        return npz.read_npz(_resolve_path(root, src.path), splits, progress=progress)
    folder = _resolve_path(root, src.path)
    if src.download:
        from ..runtime import network_allowed

        with network_allowed("PCam download (data.source.download)", allow_network):
            pcam.download(folder, splits, progress=progress)
    return {s: pcam.read_split(folder, s, root / "data" / "raw" / "pcam", limit=src.counts.get(s),
                               seed=derive_seed(seed, "pcam", s), progress=progress) for s in splits}


def holdout(ds: ImageSet, fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Stratified split of ``ds`` into (rest, held out)."""
    rng = np.random.default_rng(seed)
    out = []
    for c in (0, 1):
        idx = np.flatnonzero(ds.y == c)
        out.append(rng.permutation(idx)[: int(round(fraction * len(idx)))])
    held = np.sort(np.concatenate(out))
    rest = np.setdiff1d(np.arange(len(ds)), held)
    return ds.subset(rest), ds.subset(held)


def balance(ds: ImageSet, max_per_class: int | None, seed: int, equalise: bool) -> ImageSet:
    counts = ds.class_counts()
    target = {c: counts[c] for c in (0, 1)}
    if equalise:
        target = {c: min(counts.values()) for c in (0, 1)}
    if max_per_class is not None:
        target = {c: min(t, max_per_class) for c, t in target.items()}
    rng = np.random.default_rng(seed)
    keep = [np.sort(rng.choice(np.flatnonzero(ds.y == c), target[c], replace=False)) for c in (0, 1)]
    return ds.subset(np.sort(np.concatenate(keep)))


def resize(x: np.ndarray, size: int, batch: int = 2048) -> np.ndarray:
    """Antialiased bilinear resize of uint8 [N,H,W,3] (torch, batched)."""
    if x.shape[1] == size and x.shape[2] == size:
        return x
    out = np.empty((len(x), size, size, 3), np.uint8)
    for s in range(0, len(x), batch):
        t = torch.from_numpy(x[s:s + batch]).permute(0, 3, 1, 2).float()
        r = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[s:s + batch] = r.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    return out


def prepare(params: Params, root: Path, progress=None) -> PrepResult:
    d, dp, seed = params.data, params.data_prep, params.seed
    test_kind = d.test.kind
    src_splits = ["train", "valid"] + (["test"] if test_kind == "same" else [])
    # 1. every input checked before any work
    check_source(d.source, root, src_splits)
    ext_test = None
    if test_kind not in ("same", "holdout"):
        ext_test = d.test.as_source()
        check_source(ext_test, root, [d.test.split])
    # 2. load
    raw = load_source(d.source, root, src_splits, seed, progress, params.allow_network)
    if test_kind == "holdout":
        raw["train"], raw["test"] = holdout(raw["train"], d.test.holdout_fraction, derive_seed(seed, "holdout"))
    elif ext_test is not None:
        ext = load_source(ext_test, root, [d.test.split], seed, progress, params.allow_network)
        raw["test"] = ext[d.test.split]
    # 3. filter at native resolution, per split
    reports, removed, filtered = [], {}, {}
    for s in SPLITS:
        ds = raw[s]
        rep = filter_features(ds.x, dp.filter, progress)
        rep.insert(0, "split", s)
        rep.insert(1, "label", ds.y)
        for k in ("artefact", "morphology"):  # phantom ground truth, to check the filter
            if k in ds.meta:
                rep[k] = ds.meta[k]
        reports.append(rep)
        for why in rep.loc[~rep.keep, "reason"].unique():
            idx = np.flatnonzero((rep.reason == why).to_numpy())[:8]
            removed[why] = np.concatenate([removed.get(why, np.zeros((0,) + ds.x.shape[1:], np.uint8)), ds.x[idx]])[:8]
        kept = ds.subset(np.flatnonzero(rep.keep.to_numpy()))
        counts = kept.class_counts()
        if len(kept) == 0:
            raise DataError(f"split '{s}' is empty after the outlier filter ({len(ds)} images before)")
        if min(counts.values()) == 0:
            raise DataError(f"split '{s}' has a single class after filtering: {counts} (labels 0/1)")
        filtered[s] = kept
    # 4. balance, 5. resize
    final = {}
    for s in SPLITS:
        ds = balance(filtered[s], dp.max_per_class.get(s), derive_seed(seed, "balance", s), dp.balance_classes)
        ds = ImageSet(resize(ds.x, d.image_size), ds.y, ds.meta,
                      {**ds.attrs, "split": s, "image_size": d.image_size, "native_size": int(ds.x.shape[1])})
        final[s] = ds
    raw_counts = pd.DataFrame({s: raw[s].class_counts() for s in SPLITS}).T
    return PrepResult(final, raw_counts, pd.concat(reports, ignore_index=True), removed)


def write_splits(result: PrepResult, out_dir: Path) -> dict[str, Path]:
    """Write all splits into ``<out_dir>.tmp`` and swap it in only when every file is complete."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for s, ds in result.splits.items():
        write_imageset(tmp / f"{s}.h5", ds)
    result.filter_report.to_csv(tmp / "filter_report.csv", index=False)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return {s: out_dir / f"{s}.h5" for s in result.splits}
