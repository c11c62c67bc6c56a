"""Guided sampling in latent space: classifier-free guidance on the prompt and prototype classifier
guidance, with DDIM or DPM-Solver++ (diffusers schedulers).

One denoising step, for a target prototype k and noise level t (Dhariwal & Nichol 2021, eq. 14, in
epsilon form; STUDY.md A.4):

    eps   = eps_uncond + w * (eps_cond - eps_uncond)                  classifier-free guidance (w = 1: none)
    eps  <- eps - s * sqrt(1 - alpha_bar_t) * grad_z log p(k | z_t, t)  prototype classifier guidance (s = 0: none)

Written as a loop here rather than a ``StableDiffusionPipeline`` call because the pipeline has no hook
for a gradient term; every piece (UNet, text encoder, schedulers, VAE) is the diffusers one, and with
s = 0 the loop gives the same images as the pipeline (checked in the tests).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from . import models

SAMPLERS = ("ddim", "dpmsolver++")


def make_scheduler(name: str, train_config):
    if name == "ddim":
        return DDIMScheduler.from_config(train_config, steps_offset=1, set_alpha_to_one=False)
    if name == "dpmsolver++":
        return DPMSolverMultistepScheduler.from_config(train_config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown sampler '{name}' (one of {', '.join(SAMPLERS)})")


def initial_latents(seeds, shape, device) -> torch.Tensor:
    """One generator per image, so an image depends only on its own seed (shards equal one batch)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(device)


def sample_latents(unet, text_encoder, tokenizer, scheduler, prompts, seeds, steps: int, cfg_scale: float = 1.0,
                   classifier=None, targets=None, classifier_scale: float = 0.0, device: str = "cpu") -> torch.Tensor:
    if cfg_scale < 0 or classifier_scale < 0:
        raise ValueError(f"guidance scales must be >= 0 (got cfg {cfg_scale}, classifier {classifier_scale})")
    if classifier_scale > 0 and (classifier is None or targets is None):
        raise ValueError("classifier guidance needs the prototype classifier and a target prototype per image")
    n = len(seeds)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    with torch.no_grad():
        cond = text_encoder(models.tokenize(tokenizer, prompts).to(device))[0]
        uncond = text_encoder(models.tokenize(tokenizer, [""] * n).to(device))[0] if cfg_scale != 1.0 else None
    scheduler.set_timesteps(steps, device=device)
    z = initial_latents(seeds, shape, device) * scheduler.init_noise_sigma
    alphas = scheduler.alphas_cumprod.to(device)
    tgt = None if targets is None else torch.as_tensor(np.asarray(targets), device=device).long()
    for t in scheduler.timesteps:
        zin = scheduler.scale_model_input(z, t)
        with torch.no_grad():
            if cfg_scale != 1.0:
                e_u, e_c = unet(torch.cat([zin, zin]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample.chunk(2)
                eps = e_u + cfg_scale * (e_c - e_u)
            else:
                eps = unet(zin, t, encoder_hidden_states=cond).sample
        if classifier_scale > 0:
            with torch.enable_grad():
                zg = z.detach().requires_grad_(True)
                logp = F.log_softmax(classifier(zg, t.expand(n) if t.ndim == 0 else t), dim=-1)
                grad = torch.autograd.grad(logp[torch.arange(n), tgt].sum(), zg)[0]
            eps = eps - classifier_scale * torch.sqrt(1 - alphas[t]) * grad
        z = scheduler.step(eps, t, z).prev_sample
    return z


@torch.no_grad()
def decode(vae, z: torch.Tensor) -> np.ndarray:
    """Latents -> uint8 [N,H,W,3], the diffusers pipeline's post-processing."""
    x = vae.decode(z.to(next(vae.parameters()).dtype) / vae.config.scaling_factor).sample.float()
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
