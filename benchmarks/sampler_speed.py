"""Sampling benchmarks, measured side by side in one run (run after `dvc repro ldm_finetune prototypes`).

    .venv/bin/python benchmarks/sampler_speed.py [--n 32] [--steps 25] [--repeats 3]

1. Images/s of the study's sampler (pathsynth.diffusion.guidance, with classifier-free guidance and no
   classifier term) against diffusers' own StableDiffusionPipeline call, same model (models/ldm_finetune/mep),
   scheduler (DDIM), steps, guidance scale and batch. Runs alternate; the ratio of medians is printed
   (target >= 0.95).
2. How many DPM-Solver++ steps match DDIM-50 on sample quality: fd_dino (the prototypes stage's DINO) of
   cfg_mep samples against real train images, 5 to 25 steps against DDIM at 50, the same seeds, 95% bootstrap
   CIs, with images per second.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import StableDiffusionPipeline

from pathsynth.config import project_root
from pathsynth.diffusion import guidance, train as T
from pathsynth.prototypes.features import SelfTrained
from pathsynth.prototypes.prompts import mep_prompt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quality-n", type=int, default=96)
    a = ap.parse_args()
    root = project_root()
    pipe = StableDiffusionPipeline.from_pretrained(root / "models" / "ldm_finetune" / "mep", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    table = pd.read_csv(root / "data" / "prototypes" / "prompts_train.csv")
    table = table[table.in_balanced_subset]
    pairs = table[["label", "prototype"]].drop_duplicates().to_numpy()
    prompts = [mep_prompt(*pairs[i % len(pairs)]) for i in range(a.n)]
    seeds = list(range(a.n))

    def ours():
        t0 = time.perf_counter()
        sched = guidance.make_scheduler("ddim", pipe.scheduler.config)
        z = guidance.sample_latents(pipe.unet, pipe.text_encoder, pipe.tokenizer, sched, prompts, seeds, a.steps, a.cfg)
        guidance.decode(pipe.vae, z)
        return a.n / (time.perf_counter() - t0)

    def theirs():
        t0 = time.perf_counter()
        T.sample_images(pipe, prompts, seeds, a.steps, a.cfg, "cpu")
        return a.n / (time.perf_counter() - t0)

    ours(), theirs()  # warm-up
    o, t = [], []
    for r in range(a.repeats):
        t.append(theirs())
        o.append(ours())
        print(f"repeat {r}: diffusers pipeline {t[-1]:.2f} img/s | study sampler {o[-1]:.2f} img/s")
    print(f"n={a.n} steps={a.steps} cfg={a.cfg} threads={torch.get_num_threads()}")
    print(f"RATIO study/pipeline = {statistics.median(o) / statistics.median(t):.3f} (target >= 0.95)")

    # 2. DPM-Solver++ steps against DDIM-50 on fd_dino (replaces the hit-rate comparison, which lacked power)
    from pathsynth.metrics.fidelity import fd

    ext = SelfTrained.load(root / "models" / "prototypes" / "extractor")
    reference = np.load(root / "data" / "prototypes" / "features_train.npy")
    reference = reference[np.random.default_rng(0).choice(len(reference), min(len(reference), 2000), replace=False)]
    qp = [pairs[i % len(pairs)] for i in range(a.quality_n)]
    qprompts, qseeds = [mep_prompt(*p) for p in qp], list(range(1000, 1000 + a.quality_n))

    def quality(sampler, steps):
        t0 = time.perf_counter()
        z = guidance.sample_latents(pipe.unet, pipe.text_encoder, pipe.tokenizer,
                                    guidance.make_scheduler(sampler, pipe.scheduler.config), qprompts, qseeds, steps, a.cfg)
        images = guidance.decode(pipe.vae, z)
        ips = a.quality_n / (time.perf_counter() - t0)
        return fd(reference, ext(images), n_bootstrap=200, seed=0), ips

    rows = [("ddim", 50, *quality("ddim", 50))] + [("dpmsolver++", s_, *quality("dpmsolver++", s_)) for s_ in (5, 10, 15, 20, 25)]
    ref = rows[0][2]
    print(f"fd_dino against {len(reference)} real train images, N = {a.quality_n} cfg_mep images per sampler, same seeds, "
          f"CFG {a.cfg}, 95% bootstrap CI:")
    match = None
    for sampler, steps, r, ips in rows:
        inside = ref["ci95"][0] <= r["value"] <= ref["ci95"][1]
        print(f"{sampler:12s} {steps:2d} steps: fd_dino {r['value']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
              f"{ips:.2f} img/s" + ("  within DDIM-50's CI" if inside and sampler != "ddim" else ""))
        if inside and sampler != "ddim" and match is None:
            match = steps
    print(f"fewest DPM-Solver++ steps whose fd_dino lies within DDIM-50's 95% CI: {match}")


if __name__ == "__main__":
    main()
