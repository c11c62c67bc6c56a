"""Shared fixtures: tiny data made in code, and a throw-away copy of the study for end-to-end runs."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core (pytest-xdist). Each worker and the stages it starts then use
    # one thread: two 2-thread OpenMP pools on 2 cores spin against each other and run several times slower.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "pcam_ai4all"


def shared_npz() -> Path:
    p = SHARED / "pcam_ai4all.npz"
    if not p.is_file():
        pytest.skip(f"{p} not present (a fresh clone has no ../shared)")
    return p


@pytest.fixture(scope="session")
def phantom_small():
    from pathsynth.data import phantom

    return phantom.generate(48, seed=7, artefact_rate=0.0)


def write_fake_pcam(folder: Path, images: np.ndarray, labels: np.ndarray, splits=("train", "valid", "test"),
                    y_shape_4d: bool = True) -> Path:
    """Fake official PCam files: same names, keys, dtypes and per-image shapes, few images."""
    folder.mkdir(parents=True, exist_ok=True)
    for s in splits:
        with h5py.File(folder / f"camelyonpatch_level_2_split_{s}_x.h5", "w") as f:
            f.create_dataset("x", data=images)
        with h5py.File(folder / f"camelyonpatch_level_2_split_{s}_y.h5", "w") as f:
            f.create_dataset("y", data=labels.astype(np.uint8).reshape(-1, 1, 1, 1) if y_shape_4d else labels)
    return folder


def make_study(dst: Path):
    """A copy of the study (code, notebooks, dvc.yaml, profiles, the stage command) in ``dst``, with a
    helper to set params. The package is imported from the real checkout (installed in editable mode)."""
    dst.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", "profiles", "notebooks", "lib", "bin", "data/reader_stats/reads/README.md"):
        src = ROOT / name
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst / name)

    class Study:
        root = dst

        def set_params(self, profile="tiny", **overrides):
            from pathsynth import config

            merged = config.deep_merge(config.profile_params(profile, dst), overrides)
            (dst / "params.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
            return config.validate(merged)

    return Study()


@pytest.fixture
def study(tmp_path):
    return make_study(tmp_path / "study")


SMALL = {"data": {"source": {"counts": {"train": 160, "valid": 40, "test": 40}}}}


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval written out (independent of statsmodels, which the study uses)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return centre - half, centre + half


LONGEST = ("test_stages.py", "test_repro.py")  # ~7.5 and ~5 min on 2 cores (make test prints the slowest)


def pytest_collection_modifyitems(config, items):
    """The longest files first, then the other files with end-to-end (`slow`) tests, then the rest. pytest-xdist
    hands whole files to its workers in this order (`--dist loadfile --no-loadscope-reorder`; its default reorder
    puts files with many tests first, which left both long files to the end, often on one worker: 19 min instead
    of 10.5), so the two longest run side by side from the start and the short ones fill in around them."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item):
        if item.path.name in LONGEST:
            return LONGEST.index(item.path.name)
        return len(LONGEST) + (item.path not in slow_files)

    items.sort(key=rank)  # stable: the order within a file is kept
