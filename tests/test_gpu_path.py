"""What the gpu profile relies on, checked on the CPU: the in-process stage runner (no Jupyter kernel),
the FLOP count behind the MFU figure, and the JPEG NPZ export that brings synthetic sets back."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

from pathsynth import config
from pathsynth.data.dataset import ImageSet, write_imageset
from pathsynth.data.npz import export_imagesets, read_npz
from pathsynth.training import Task, step_flops

from conftest import ROOT, SMALL


class _Linear(Task):
    def __init__(self, i, o):
        super().__init__()
        self.lin = torch.nn.Linear(i, o, bias=False)

    def forward(self, batch, g):
        return self.lin(batch["x"]).pow(2).mean()


def test_step_flops_counts_forward_and_backward_of_a_matmul():
    task = _Linear(16, 8)
    flops = step_flops(task, {"x": torch.randn(32, 16)}, torch.Generator())
    # forward 2*B*I*O; backward: the weight gradient only (the input needs none), 2*B*I*O
    assert flops == 2 * (2 * 32 * 16 * 8)
    assert all(p.grad is None for p in task.parameters())  # the count leaves no gradients behind


def test_gpu_profile_is_valid_and_at_native_resolution():
    p = config.validate(config.profile_params("gpu", ROOT))
    assert p.data.image_size == 96 and p.device == "cuda"
    assert p.ldm_finetune.train.compile and p.ldm_finetune.train.mixed_precision == "bf16"
    assert p.guided_sampling.jpeg_quality is None  # encoded once, at q75, by the export that packs the sets


def test_export_imagesets_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    # smooth images (JPEG keeps them close), with the metadata guided_sampling writes
    base = rng.integers(60, 200, (6, 1, 1, 3))
    x = np.clip(base + rng.normal(0, 3, (6, 32, 32, 3)), 0, 255).astype(np.uint8)
    meta = {"prototype": np.arange(6), "prompt": np.array([f"p{i}" for i in range(6)]), "seed": np.arange(6) + 10}
    write_imageset(tmp_path / "cfg_mep.h5", ImageSet(x, np.array([0, 1] * 3), meta, {"mode": "cfg_mep"}))
    (tmp_path / "out").mkdir()
    report = export_imagesets(tmp_path, tmp_path / "out", quality=90)
    assert [r["set"] for r in report] == ["cfg_mep"] and report[0]["n"] == 6
    back = read_npz(tmp_path / "out" / "guided_sampling_cfg_mep.npz", splits=("train",))["train"]
    assert back.x.shape == x.shape and (back.y == [0, 1] * 3).all()
    assert np.abs(back.x.astype(int) - x).mean() == report[0]["mean_abs_diff"] < 3
    z = np.load(tmp_path / "out" / "guided_sampling_cfg_mep.npz")
    assert (z["meta_prototype"] == np.arange(6)).all() and z["meta_prompt"][2] == "p2"


def test_inline_runner_runs_a_stage_without_a_kernel(study):
    study.set_params(**SMALL)
    env = {**os.environ, "PYTHONPATH": str(study.root / "lib")}
    r = subprocess.run([sys.executable, "-m", "pathsynth.run", "--inline", "data_prep"], cwd=study.root, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.loads((study.root / "metrics" / "data_prep.json").read_text())
    assert m["stage"] == "data_prep" and sum(m["n"].values()) > 0
    assert not (study.root / "reports" / "executed" / "01_data_prep.ipynb").exists()  # no executed notebook


class _Compiled(Task):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 1)

    def forward(self, batch, g):
        return (self.lin(batch["x"]).squeeze(1) - batch["y"]).pow(2).mean()

    def compile_targets(self):
        return [self.lin]


def test_compiled_training_matches_eager_and_returns_an_eager_model(tmp_path):
    from pathsynth.training import train_loop

    g = torch.Generator().manual_seed(0)
    data = {"x": torch.randn(32, 4, generator=g), "y": torch.randn(32, generator=g)}
    out = {}
    for comp in (False, True):
        cfg = config.section("ldm_finetune.vae.train", steps=4, batch_size=8, lr=1e-2, compile=comp,
                             checkpoint_every=100, log_every=2, sample_every=2)
        seen = []
        res = train_loop(_Compiled(), data, cfg, tmp_path / str(comp), "h", seed=0,
                         on_sample=lambda step, task: seen.append(step))  # grids run (eagerly) mid-training
        out[comp] = res["model"]
        assert seen == [2, 4]
    assert out[True].lin._compiled_call_impl is None  # compiled while training, eager once returned
    torch.testing.assert_close(out[True].lin.weight, out[False].lin.weight, rtol=1e-5, atol=1e-6)
