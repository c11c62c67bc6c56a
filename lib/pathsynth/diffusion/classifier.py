"""The noise-aware prototype classifier p(prototype | z_t, t) for classifier guidance (Dhariwal &
Nichol 2021, carried into latent space; STUDY.md A.4, our reading of Redekop et al.).

A small convolutional network on noisy latents, conditioned on the timestep through a sinusoidal
embedding that scales and shifts every block (FiLM), with a K-way head. It is a diffusers
``ModelMixin`` so it saves and loads with ``save_pretrained`` / ``from_pretrained``.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin

from ..training import Task


class _Block(nn.Module):
    def __init__(self, cin, cout, tdim):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.n1, self.n2 = nn.GroupNorm(min(8, cout), cout), nn.GroupNorm(min(8, cout), cout)
        self.film = nn.Linear(tdim, 2 * cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = F.silu(self.n1(self.conv1(x)))
        scale, shift = self.film(temb)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.n2(self.conv2(h)) * (1 + scale) + shift)
        return h + self.skip(x)


class NoisyLatentClassifier(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, in_channels: int = 4, num_classes: int = 8, channels: tuple = (32, 64), time_dim: int = 64):
        super().__init__()
        self.time_proj = Timesteps(time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_emb = TimestepEmbedding(time_dim, time_dim)
        chans = [in_channels, *channels]
        self.blocks = nn.ModuleList(_Block(a, b, time_dim) for a, b in zip(chans[:-1], chans[1:]))
        self.head = nn.Linear(chans[-1], num_classes)

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.expand(z_t.shape[0]) if t.ndim == 0 else t
        temb = self.time_emb(self.time_proj(t).to(z_t.dtype))
        h = z_t
        for i, blk in enumerate(self.blocks):
            h = blk(h, temb)
            if i < len(self.blocks) - 1:
                h = F.avg_pool2d(h, 2)
        return self.head(h.mean(dim=(2, 3)))


class ClassifierTask(Task):
    """Cross-entropy on z_t = sqrt(a_t) z_0 + sqrt(1 - a_t) eps, t uniform over the training steps."""

    def __init__(self, model: NoisyLatentClassifier, scheduler):
        super().__init__()
        self.model, self.scheduler = model, scheduler

    def compile_targets(self):
        return [self.model]

    def forward(self, batch, g):
        z0 = batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, generator=g, device=g.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(z0),), generator=g, device=g.device)
        noise = torch.randn(z0.shape, generator=g, device=g.device)
        zt = self.scheduler.add_noise(z0, noise, t)
        return F.cross_entropy(self.model(zt, t), batch["prototype"])


@torch.no_grad()
def accuracy_by_noise(model, scheduler, latents: torch.Tensor, labels: torch.Tensor, bins: int, seed: int) -> list[dict]:
    """Accuracy at ``bins`` evenly spaced timesteps on held-out latents, with Wilson 95% CIs."""
    from statsmodels.stats.proportion import proportion_confint

    model.eval()
    g = torch.Generator().manual_seed(seed)
    T = scheduler.config.num_train_timesteps
    rows = []
    for t in np.linspace(0, T - 1, bins).round().astype(int):
        noise = torch.randn(latents.shape, generator=g)
        zt = scheduler.add_noise(latents, noise, torch.full((len(latents),), int(t)))
        pred = torch.cat([model(zt[i:i + 512], torch.full((len(zt[i:i + 512]),), int(t))).argmax(1)
                          for i in range(0, len(zt), 512)])
        k = int((pred == labels).sum())
        lo, hi = proportion_confint(k, len(labels), alpha=0.05, method="wilson")
        rows.append({"t": int(t), "alpha_bar": float(scheduler.alphas_cumprod[int(t)]), "accuracy": k / len(labels),
                     "ci_low": lo, "ci_high": hi, "n": len(labels)})
    return rows
