"""The set-up the UNet training benchmarks share (train_loop_overhead.py on CPU, gpu_mfu.py on a GPU): a profile's
text-conditioned UNet and CLIP text encoder, built as ldm_finetune builds them, and random latents with
morphology-enriched prompts to train them on (speed does not depend on what the latents show)."""
from __future__ import annotations

import torch

from pathsynth.diffusion import models
from pathsynth.prototypes.prompts import mep_prompt


def unet_and_latents(lp, latent_size: int, n: int, k: int, seed: int = 0):
    """ldm_finetune settings ``lp`` -> (tokenizer, text encoder, UNet, data): ``n`` random 4-channel latents of
    ``latent_size`` px as ``mean``/``std`` (the study's latent format), with prompts cycling over 2 labels and
    ``k`` prototypes, tokenised as ``ids``."""
    prompts = [mep_prompt(i % 2, i % k) for i in range(n)]
    tok = models.build_tokenizer(sorted(set(prompts)) + [""], lp.text_encoder.max_length)
    torch.manual_seed(seed)
    te = models.build_text_encoder(lp.text_encoder, tok)
    unet = models.build_unet(lp.unet, latent_size, 4, te.config.hidden_size)
    g = torch.Generator().manual_seed(seed)
    data = {"mean": torch.randn(n, 4, latent_size, latent_size, generator=g),
            "std": torch.full((n, 4, latent_size, latent_size), 0.1), "ids": models.tokenize(tok, prompts)}
    return tok, te, unet, data
