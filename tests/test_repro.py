"""The README's reproducibility claim, proved: on one machine with one thread count, two runs of every
stage in fresh processes (with different Python hash seeds) give bit-identical data, features, model
weights and synthetic images. Across CPU models only statistical agreement is claimed (README)."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pathsynth.data.dataset import read_imageset

from conftest import SMALL, make_study

pytestmark = pytest.mark.slow

SLICE = {**SMALL, "prototypes": {
    "k": 4, "k_sweep": [3, 4], "umap_max_points": 200, "balance_min_prompts_per_class": 2, "n_init": 2,
    "k_sweep_n_init": 1, "n_bootstrap": 20,
    "dino": {"depth": 1, "epochs": 2, "out_dim": 128, "head_hidden_dim": 64, "head_bottleneck_dim": 32,
             "batch_size": 32, "local_crops_number": 2}},
    "ldm_finetune": {
        "vae": {"train": {"steps": 6, "batch_size": 16, "checkpoint_every": 3, "log_every": 3}},
        "train": {"steps": 6, "batch_size": 16, "checkpoint_every": 3, "sample_every": 0, "log_every": 3,
                  "warmup_steps": 0},
        "classifier": {"noise_bins": 2, "train": {"steps": 6, "batch_size": 16, "log_every": 3}},
        "n_sample_seeds": 1, "sample_steps": 2, "n_eval_images": 16},
    "guided_sampling": {"n_per_mode": 4, "steps": 2, "shard_size": 2, "batch_size": 2}}


def _run_study(study, hash_seed: str):
    study.set_params(**SLICE)
    env = {**os.environ, "PYTHONPATH": str(study.root / "lib"), "PYTHONHASHSEED": hash_seed}
    for stage in ("data_prep", "prototypes", "ldm_finetune", "guided_sampling"):
        r = subprocess.run([sys.executable, "-m", "pathsynth.run", "--inline", stage], cwd=study.root, env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{stage}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_runs_of_every_stage_are_bit_identical(tmp_path):
    a, b = (make_study(tmp_path / name) for name in ("a", "b"))
    for s, hash_seed in ((a, "1"), (b, "2")):
        _run_study(s, hash_seed)
    a, b = a.root, b.root
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(read_imageset(a / "data/data_prep" / f"{split}.h5").x,
                                      read_imageset(b / "data/data_prep" / f"{split}.h5").x)
    for name in ("features_train.npy", "centroids.npz", "prompts_train.csv"):
        assert _digest(a / "data/prototypes" / name) == _digest(b / "data/prototypes" / name), name
    weights = sorted(p.relative_to(a) for p in (a / "models").rglob("*.safetensors"))
    assert len(weights) >= 5  # extractor, VAE, two UNets (+ text encoders), classifier
    for w in weights:
        assert _digest(a / w) == _digest(b / w), f"{w} differs between two runs"
    for mode in ("unguided", "cfg_baseline", "cfg_mep", "classifier", "cfg_mep_classifier"):
        np.testing.assert_array_equal(read_imageset(a / "data/guided_sampling" / f"{mode}.h5").x,
                                      read_imageset(b / "data/guided_sampling" / f"{mode}.h5").x, err_msg=mode)
