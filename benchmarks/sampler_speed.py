"""Sampling benchmarks, measured side by side in one run (run after `dvc repro ldm_finetune prototypes`).

    .venv/bin/python benchmarks/sampler_speed.py [--n 32] [--steps 25] [--repeats 3]

1. Images/s of the study's sampler (pathsynth.diffusion.guidance, with classifier-free guidance and no
   classifier term) against diffusers' own StableDiffusionPipeline call, same model (models/ldm_finetune/mep),
   scheduler (DDIM), steps, guidance scale and batch. Runs alternate; the ratio of medians is printed
   (target >= 0.95).
2. How many DPM-Solver++ steps match DDIM-50 on a quality metric of the study: the requested-prototype hit
   rate of cfg_mep samples (clean-image prototype by the prototypes stage's extractor and centroids),
   N images, 95% Wilson CIs.
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
from statsmodels.stats.proportion import proportion_confint

from pathsynth.config import project_root
from pathsynth.diffusion import guidance, train as T
from pathsynth.prototypes.cluster import assign
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

    # 2. DPM-Solver++ steps against DDIM-50 on the prototype hit rate
    ext = SelfTrained.load(root / "models" / "prototypes" / "extractor")
    centroids = np.load(root / "data" / "prototypes" / "centroids.npz")["centroids"]
    qp = [pairs[i % len(pairs)] for i in range(a.quality_n)]
    qprompts, target = [mep_prompt(*p) for p in qp], np.array([p[1] for p in qp])
    qseeds = list(range(1000, 1000 + a.quality_n))

    def hit(sampler, steps):
        z = guidance.sample_latents(pipe.unet, pipe.text_encoder, pipe.tokenizer,
                                    guidance.make_scheduler(sampler, pipe.scheduler.config), qprompts, qseeds, steps, a.cfg)
        k = int((assign(centroids, ext(guidance.decode(pipe.vae, z))) == target).sum())
        lo, hi = proportion_confint(k, a.quality_n, method="wilson")
        return k / a.quality_n, lo, hi

    ref = hit("ddim", 50)
    print(f"DDIM 50 steps: hit rate {ref[0]:.3f} [{ref[1]:.3f}, {ref[2]:.3f}] (N = {a.quality_n})")
    match = None
    for steps in (5, 10, 15, 20, 25):
        r = hit("dpmsolver++", steps)
        inside = ref[1] <= r[0] <= ref[2]
        print(f"DPM-Solver++ {steps:2d} steps: hit rate {r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]" + ("  within DDIM-50's CI" if inside else ""))
        if inside and match is None:
            match = steps
    print(f"fewest DPM-Solver++ steps within DDIM-50's 95% CI: {match}")


if __name__ == "__main__":
    main()
