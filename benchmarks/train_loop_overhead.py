"""Training throughput of the study's loop against a bare diffusers loop, same model, batch and device.

    .venv/bin/python benchmarks/train_loop_overhead.py [--steps 60] [--repeats 3] [--device cpu]

Both train the tiny profile's text-conditioned UNet (UNet2DConditionModel + CLIP text encoder) on the
same random latents and prompts. The bare loop is what the diffusers text-to-image example does per
step (noise, timesteps, add_noise, forward, MSE, backward, AdamW step). The study's loop adds
seeded per-step generators, deterministic batch indexing, gradient clipping, EMA, CSV logging and
the NaN guard. Runs alternate (A, B, A, B, ...) so a busy machine hurts both alike; the ratio of
median images/s is printed (target: >= 0.95, i.e. the extras cost under 5%). Checkpoint writing is
timed separately, not in images/s.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _unet_setup import unet_and_latents
from pathsynth.config import defaults, section
from pathsynth.diffusion import models, train as T
from pathsynth.training import train_loop


def setup():
    lp = defaults().ldm_finetune  # profiles/defaults.yaml, as the tiny profile
    return (lp, *unet_and_latents(lp, 8, 256, 8))  # 8x8x4 latents (32 px)


def bare(steps, batch, device):
    lp, tok, te, unet, data = setup()
    sched = models.noise_scheduler()
    unet.to(device).train(), te.to(device).train()
    opt = torch.optim.AdamW(list(unet.parameters()) + list(te.parameters()), lr=5e-4, weight_decay=1e-2)
    n = len(data["ids"])
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, n, (batch,))
        z0 = data["mean"][idx].to(device) + data["std"][idx].to(device) * torch.randn(batch, 4, 8, 8, device=device)
        hidden = te(data["ids"][idx].to(device))[0]
        noise = torch.randn_like(z0)
        t = torch.randint(0, 1000, (batch,), device=device)
        loss = F.mse_loss(unet(sched.add_noise(z0, noise, t), t, encoder_hidden_states=hidden).sample, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return steps * batch / (time.perf_counter() - t0)


def ours(steps, batch, device):
    lp, tok, te, unet, data = setup()
    task = T.LDMTask(unet, te, True, models.noise_scheduler(), lp.cond_dropout, models.tokenize(tok, [""])[0])
    cfg = section("ldm_finetune.train", steps=steps, batch_size=batch, lr=5e-4, ema_decay=0.99, clip_grad=1.0,
                  warmup_steps=0, log_every=10, checkpoint_every=10 ** 9, sample_every=0)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        out = train_loop(task, data, cfg, Path(d), "bench", seed=0, device=device, log_csv=Path(d) / "log.csv")
        wall = time.perf_counter() - t0
    return out["images_per_s"], steps * batch / wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    ours(5, a.batch, a.device), bare(5, a.batch, a.device)  # warm-up
    b, o, ow = [], [], []
    for r in range(a.repeats):
        b.append(bare(a.steps, a.batch, a.device))
        ips, wall_ips = ours(a.steps, a.batch, a.device)
        o.append(ips)
        ow.append(wall_ips)
        print(f"repeat {r}: bare {b[-1]:.1f} img/s | study loop {o[-1]:.1f} img/s (with final checkpoint: {ow[-1]:.1f})")
    ratio = statistics.median(o) / statistics.median(b)
    print(f"device={a.device} steps={a.steps} batch={a.batch} repeats={a.repeats} threads={torch.get_num_threads()}")
    print(f"median images/s: bare diffusers loop {statistics.median(b):.1f}, study loop {statistics.median(o):.1f}")
    print(f"RATIO study/bare = {ratio:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
