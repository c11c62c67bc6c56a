"""Model FLOP utilisation of the gpu profile's UNet training step, bare and in the study's loop (GPU only).

    python benchmarks/gpu_mfu.py [--steps 30] [--out results.json]

The gpu profile's text-conditioned UNet (profiles/gpu.yaml: 71M parameters at 24x24x4 latents) is trained
on random latents and prompts in bf16 autocast with fused AdamW: (a) a bare step (noise, add_noise, text
encoder, UNet, MSE, backward, optimiser), eager and under torch.compile, with and without channels-last,
at two batch sizes; (b) the study's train_loop with the profile's own settings (EMA, clipping, seeded
generators, Min-SNR weights). FLOPs are counted once per configuration with torch.utils.flop_counter
(forward + backward); MFU is FLOP/s over the GPU's dense bf16 peak (training.PEAK_FLOPS). Times are
medians of CUDA-synchronised windows after warm-up (compilation excluded).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _unet_setup import unet_and_latents
from pathsynth import config
from pathsynth.diffusion import models, train as T
from pathsynth.training import peak_flops, step_flops, train_loop


def setup(lp):
    return unet_and_latents(lp, 24, 4096, 33)  # the gpu profile's 24x24x4 latents (96 px), K = 33


def bare(lp, batch, compile_, channels_last, steps, device="cuda"):
    tok, te, unet, data = setup(lp)
    empty = models.tokenize(tok, [""])[0]
    task = T.LDMTask(unet, te, True, models.noise_scheduler(), lp.cond_dropout, empty, lp.snr_gamma).to(device)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    data = {k: v.to(device) for k, v in data.items()}
    batch_of = lambda i: {k: v[(i * batch) % (len(v) - batch):][:batch] for k, v in data.items()}  # noqa: E731
    g = torch.Generator(device=device).manual_seed(0)
    kind = torch.device(device).type
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    with torch.autocast(kind, dtype=torch.bfloat16):
        flops = step_flops(task, batch_of(0), g)
    if compile_:
        task.unet.compile()
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-4, fused=True)
    times = []
    for i in range(10 + steps):
        if i >= 10:
            sync()
            t0 = time.perf_counter()
        with torch.autocast(kind, dtype=torch.bfloat16):
            loss = task(batch_of(i), g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 10:
            sync()
            times.append(time.perf_counter() - t0)
    return flops, statistics.median(times)


def study_loop(lp, batch, steps, device="cuda"):
    tok, te, unet, data = setup(lp)
    task = T.LDMTask(unet, te, True, models.noise_scheduler(), lp.cond_dropout, models.tokenize(tok, [""])[0],
                     lp.snr_gamma)
    cfg = lp.train.model_copy(update={"steps": steps, "batch_size": batch, "warmup_steps": 0, "log_every": 10,
                                      "checkpoint_every": 10 ** 9, "sample_every": 0})
    with tempfile.TemporaryDirectory() as d:
        out = train_loop(task, data, cfg, Path(d), "bench", seed=0, device=device)
    s = out["speed"]
    return s["model_flops_per_step"], s["seconds_per_step"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_mfu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    lp = config.validate(config.profile_params("gpu")).ldm_finetune
    name, peak = peak_flops("cuda")
    rows = []
    for label, fn in [
        ("bare, eager, batch 256", lambda: bare(lp, 256, False, False, a.steps)),
        ("bare, compiled, batch 256", lambda: bare(lp, 256, True, False, a.steps)),
        ("bare, compiled, channels-last, batch 256", lambda: bare(lp, 256, True, True, a.steps)),
        ("bare, compiled, channels-last, batch 512", lambda: bare(lp, 512, True, True, a.steps)),
        ("study train_loop (gpu profile settings), batch 256", lambda: study_loop(lp, 256, 10 * (a.steps // 10) + 40)),
    ]:
        t_start = time.perf_counter()
        flops, sec = fn()
        row = {"config": label, "flops_per_step": flops, "seconds_per_step": sec,
               "tflops_per_s": flops / sec / 1e12, "mfu": flops / sec / peak if peak else None,
               "wall_s": time.perf_counter() - t_start}
        rows.append(row)
        print(f"{label:55s} {sec * 1e3:7.1f} ms/step {row['tflops_per_s']:6.1f} TFLOP/s  MFU {row['mfu']:.1%}", flush=True)
        torch.cuda.empty_cache()
    res = {"device": name, "peak_flops": peak, "torch": torch.__version__, "steps_timed": a.steps, "rows": rows}
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
