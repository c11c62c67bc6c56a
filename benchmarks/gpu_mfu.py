"""Model FLOP utilisation of the gpu profile's UNet training step, bare and in the study's loop (GPU only).

    python benchmarks/gpu_mfu.py [--steps 30] [--out results.json] [--only TEXT ...] [--list]

The gpu profile's text-conditioned UNet (profiles/gpu.yaml: 71M parameters at 24x24x4 latents) is trained
on random latents and prompts in bf16 autocast with fused AdamW: (a) a bare step (noise, add_noise, text
encoder, UNet, MSE, backward, optimiser), eager and under torch.compile, with and without channels-last,
at batch 256 to 1024, with torch.compile's max-autotune mode, and with wider blocks, (192, 384, 768) and Stable
Diffusion's (320, 640, 1280), in place of the profile's (128, 256, 512): the levers results/gpu/README.md names for a UNet too
narrow to fill the GPU; (b) the study's train_loop with the profile's own settings (EMA, clipping, seeded
generators, Min-SNR weights). FLOPs are counted once per configuration with torch.utils.flop_counter
(forward + backward); MFU is FLOP/s over the GPU's dense bf16 peak (training.PEAK_FLOPS). Times are
medians of CUDA-synchronised windows after warm-up (compilation excluded).

One device command runs at most 10 minutes, so `--only` picks rows by a part of their label (`--list` prints the
labels); with `--out`, each row is added to that JSON file as soon as it is measured (rows already there are kept,
a row measured again replaces its old one, and a file from another GPU is refused), so a command cut off at its
limit loses only the row it was in.
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


def widened(lp, channels):
    """The profile's UNet settings with other block widths (the attention head size stays the profile's)."""
    return lp.model_copy(update={"unet": lp.unet.model_copy(update={"block_out_channels": list(channels)})})


def bare(lp, batch, compile_, channels_last, steps, device="cuda", mode=None):
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
        task.unet.compile(mode=mode)
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
    ap.add_argument("--only", nargs="+", default=None, help="run only the rows whose label contains one of these")
    ap.add_argument("--list", action="store_true", help="print the row labels and stop")
    a = ap.parse_args()
    lp = config.validate(config.profile_params("gpu")).ldm_finetune
    wide, sd = widened(lp, (192, 384, 768)), widened(lp, (320, 640, 1280))  # 159M and 440M parameters (counted)
    table = [
        ("bare, eager, batch 256", lambda: bare(lp, 256, False, False, a.steps)),
        ("bare, compiled, batch 256", lambda: bare(lp, 256, True, False, a.steps)),
        ("bare, compiled, channels-last, batch 256", lambda: bare(lp, 256, True, True, a.steps)),
        ("bare, compiled, channels-last, batch 512", lambda: bare(lp, 512, True, True, a.steps)),
        ("bare, compiled, batch 512", lambda: bare(lp, 512, True, False, a.steps)),
        ("bare, compiled, batch 1024", lambda: bare(lp, 1024, True, False, a.steps)),
        ("bare, compiled max-autotune, batch 256", lambda: bare(lp, 256, True, False, a.steps, mode="max-autotune")),
        ("bare, compiled, widths (192,384,768), batch 256", lambda: bare(wide, 256, True, False, a.steps)),
        ("bare, compiled, SD widths (320,640,1280), batch 128", lambda: bare(sd, 128, True, False, a.steps)),
        ("study train_loop (gpu profile settings), batch 256", lambda: study_loop(lp, 256, 10 * (a.steps // 10) + 40)),
    ]
    if a.list:
        print("\n".join(label for label, _ in table))
        return
    chosen = [(label, fn) for label, fn in table if a.only is None or any(o in label for o in a.only)]
    if not chosen:
        raise SystemExit(f"--only {a.only}: no row matches; the rows are:\n  " + "\n  ".join(lb for lb, _ in table))
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_mfu.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    name, peak = peak_flops("cuda")
    out = Path(a.out) if a.out else None
    res = json.loads(out.read_text()) if out and out.exists() else {}
    if res and res.get("device") != name:  # rows of two GPUs in one file would read as one GPU's table
        raise SystemExit(f"{out}: holds rows measured on {res.get('device')}, this is {name}; give another --out")
    rows = res.get("rows", [])
    for label, fn in chosen:
        t_start = time.perf_counter()
        try:
            flops, sec = fn()
            row = {"config": label, "flops_per_step": flops, "seconds_per_step": sec,
                   "tflops_per_s": flops / sec / 1e12, "mfu": flops / sec / peak if peak else None,
                   "steps_timed": a.steps, "wall_s": time.perf_counter() - t_start}
            print(f"{label:55s} {sec * 1e3:7.1f} ms/step {row['tflops_per_s']:6.1f} TFLOP/s  MFU {row['mfu']:.1%}", flush=True)
        except torch.OutOfMemoryError as e:  # a batch too large for this GPU is a finding, not the end of the run
            row = {"config": label, "error": "out of GPU memory: " + str(e).splitlines()[0]}
            print(f"{label:55s} {row['error']}", flush=True)
        rows = [r for r in rows if r["config"] != label] + [row]
        torch.cuda.empty_cache()
        if out:  # after every row: a command cut off at its time limit keeps what it measured
            res = {"device": name, "peak_flops": peak, "torch": torch.__version__, "rows": rows}
            out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
