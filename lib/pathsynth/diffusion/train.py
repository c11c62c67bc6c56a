"""The ldm_finetune stage: the VAE (from scratch), the conditional UNet per prompt variant, and the
noise-aware prototype classifier, all trained by ``pathsynth.training.train_loop``.

Two regimes (``ldm_finetune.regime``):
- ``finetune``: the paper's set-up (STUDY.md B.3): a pretrained Stable Diffusion from a local folder
  (or a hub id the user named), VAE and CLIP text encoder frozen (cast to the mixed-precision dtype),
  only the UNet trained (fp32 weights), patches resized to ``resolution`` (the paper: 96 -> 512).
- ``scratch``: offline profiles: a small AutoencoderKL is trained first, then the UNet with a small
  CLIP text encoder and a tokenizer built from the prompt vocabulary.

Latents are encoded once (the VAE is frozen while the UNet trains) as the posterior mean and std,
and a fresh sample z = mean + std * eps is drawn at every step, as SD training does.
"""
from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from ..data.dataset import DataError, ImageSet
from ..training import Task, params_hash, train_loop
from . import models


# ------------------------------------------------------------------ data
def check_prompts(table: pd.DataFrame, ds: ImageSet, path: Path) -> None:
    """The prompt file must describe the image set it is used with, row by row."""
    need = {"index", "label", "prototype", "prompt_baseline", "prompt_mep"}
    if not need <= set(table.columns):
        raise DataError(f"{path}: missing columns {sorted(need - set(table.columns))}")
    if len(table) != len(ds):
        raise DataError(f"{path}: {len(table)} rows, but the image set has {len(ds)} images")
    if not (table["label"].to_numpy() == ds.y).all():
        bad = int(np.flatnonzero(table["label"].to_numpy() != ds.y)[0])
        raise DataError(f"{path}: row {bad} has label {table['label'].iloc[bad]} but image {bad} has label {ds.y[bad]}")


def to_model_range(x_uint8: np.ndarray, resolution: int | None = None) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,R,R] in [-1, 1] (bilinear resize when a resolution is given)."""
    x = torch.from_numpy(x_uint8).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    if resolution and resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.no_grad()
def encode(vae, images: np.ndarray, resolution: int | None, device, batch: int = 256, progress=None):
    """Posterior mean and std of every image, already multiplied by the VAE's scaling factor."""
    vae.eval().to(device)
    dtype = next(vae.parameters()).dtype
    means, stds = [], []
    starts = range(0, len(images), batch)
    for s in (progress(starts, desc="encode latents", unit="batch") if progress else starts):
        x = to_model_range(images[s:s + batch], resolution).to(device, dtype)
        post = vae.encode(x).latent_dist
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
    f = vae.config.scaling_factor
    return torch.cat(means) * f, torch.cat(stds) * f


# ------------------------------------------------------------------ tasks
def random_crops(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """One random size x size crop per image of a [N, H, W, C] batch, in one gather."""
    n = len(x)
    top, left = torch.randint(0, x.shape[1] - size + 1, (2, n), generator=g, device=g.device).to(x.device)
    ar = torch.arange(size, device=x.device)
    rows, cols = (top[:, None] + ar)[:, :, None], (left[:, None] + ar)[:, None, :]
    return x[torch.arange(n, device=x.device)[:, None, None], rows, cols]

class PatchDiscriminator(nn.Module):
    """The PatchGAN discriminator of Stable Diffusion's autoencoder loss (taming-transformers'
    ``NLayerDiscriminator``, after Isola et al. 2017): strided 4x4 convolutions with leaky ReLU, one logit
    per overlapping patch. Written here because diffusers ships the autoencoder but not its training loss.
    ``n_layers`` 2 (taming: 3) keeps a 34 px receptive field for 32 px training crops. No batch norm (taming
    has it): real and reconstructed images pass in separate batches, and normalising each batch's feature
    statistics hides what blur changes; with it the discriminator stayed at chance (hinge loss 1.03) through
    450 steps on pcam-subset."""

    def __init__(self, in_channels: int = 3, width: int = 64, n_layers: int = 2):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, n_layers + 1):
            out = width * min(2 ** i, 8)
            layers += [nn.Conv2d(ch, out, 4, 2 if i < n_layers else 1, 1), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def dino_perceptual(vit, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image perceptual distance of images in [-1, 1] in a frozen DINO ViT, built like LPIPS (Zhang et
    al. 2018) without its learned layer weights, which cannot be downloaded here: each block's patch tokens
    unit-normalised over channels, squared differences averaged over tokens and channels, summed over blocks."""
    from ..ssl.augment import normalise

    fa, fb = (vit.forward_intermediates(normalise((t + 1) / 2), intermediates_only=True, output_fmt="NLC")
              for t in (a, b))
    return sum((F.normalize(u, dim=-1) - F.normalize(v, dim=-1)).pow(2).mean(dim=(1, 2)) for u, v in zip(fa, fb))


class VAETask(Task):
    """Reconstruction (L1) + a small KL term, on images in [-1, 1] with random flips and, with
    ``crop_size``, one random square crop per image. The autoencoder is fully convolutional (its one
    attention block works at any size), so training on crops and encoding whole patches is sound; at
    64 px, 32 px crops see about 4x more images per second, which is what a CPU budget needs.

    Optionally the rest of Stable Diffusion's autoencoder loss: ``perceptual_weight`` x the DINO
    perceptual distance (``perceptual_net``: a frozen ViT, SD uses LPIPS) and, from step ``disc_start``,
    a PatchGAN hinge loss weighted by ``disc_weight`` times taming-transformers' adaptive weight (the ratio
    of gradient norms at the decoder's last layer, ``adaptive_weight``). Generator and discriminator learn in one backward
    pass and one optimiser step: the generator's term sees the discriminator through detached weights, the
    discriminator's term sees detached reconstructions, so neither term moves the other player."""

    log_fields = ("l1", "perceptual", "g_loss", "d_loss", "disc_scale")

    def __init__(self, vae, kl_weight: float, crop_size: int | None = None, disc_weight: float = 0.0,
                 disc_start: int = 0, perceptual_weight: float = 0.0, perceptual_net=None):
        super().__init__()
        self.vae, self.kl_weight, self.crop_size = vae, kl_weight, crop_size
        self.disc_weight, self.disc_start, self.perceptual_weight = disc_weight, disc_start, perceptual_weight
        if disc_weight:
            self.disc = PatchDiscriminator()
        if perceptual_weight:
            if perceptual_net is None:
                raise ValueError("perceptual_weight > 0 needs a perceptual_net (the prototypes stage's DINO)")
            perceptual_net.requires_grad_(False)
            self._frozen = [perceptual_net.eval()]  # outside the module tree: not trained, not checkpointed
        self.step, self._sums, self._count = 0, {}, 0

    def prepare(self, device, dtype):
        if hasattr(self, "_frozen"):
            self._frozen[0].to(device, dtype).eval()

    def before_step(self, step, optimizer):
        self.step = step

    def _note(self, **terms):
        for k, v in terms.items():  # device tensors: no GPU sync per step, one at the log step
            self._sums[k] = self._sums.get(k, 0.0) + v.detach().float()
        self._count += 1

    def log_values(self, step, loss):
        out = {k: float(self._sums.get(k, 0.0)) / max(self._count, 1) for k in self.log_fields}
        self._sums, self._count = {}, 0
        return out

    def forward(self, batch, g):
        x = batch["x"]
        if self.crop_size and self.crop_size < x.shape[1]:
            x = random_crops(x, self.crop_size, g)
        x = x.float().div(127.5).sub(1).permute(0, 3, 1, 2)
        flip = torch.rand(len(x), generator=g, device=g.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        post = self.vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=g.device)
        rec = self.vae.decode(z).sample
        l1 = F.l1_loss(rec.float(), x)
        nll = l1
        zero = l1.new_zeros(())
        perceptual = g_loss = d_loss = weight = zero
        if self.perceptual_weight:
            net = self._frozen[0]
            dtype = next(net.parameters()).dtype
            perceptual = dino_perceptual(net, rec.to(dtype), x.to(dtype)).float().mean()
            nll = nll + self.perceptual_weight * perceptual
        loss = nll + self.kl_weight * post.kl().mean()
        if self.disc_weight:
            # both terms are computed from the first step (so every parameter takes part in every step, as
            # DDP needs) and count from disc_start on, as taming's adopt_weight does
            on = float(self.step >= self.disc_start)
            frozen = {k: v.detach() for k, v in self.disc.named_parameters()}
            g_loss = -torch.func.functional_call(self.disc, frozen, (rec,)).float().mean()
            if on and torch.is_grad_enabled():
                weight = self.disc_weight * self.adaptive_weight(nll, g_loss)
            d_loss = 0.5 * (F.relu(1 - self.disc(x)).mean() + F.relu(1 + self.disc(rec.detach())).mean()).float()
            loss = loss + on * (weight * g_loss + d_loss)
        self._note(l1=l1, perceptual=perceptual, g_loss=g_loss, d_loss=d_loss, disc_scale=weight)
        return loss

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """taming-transformers' ``calculate_adaptive_weight``: the ratio of the reconstruction loss's gradient
        norm to the adversarial loss's at the decoder's last layer, clamped to [0, 1e4] and detached, so the
        adversarial term never outweighs the reconstruction by more than ``disc_weight``."""
        last = self.vae.decoder.conv_out.weight
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (g_nll.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR(t), gamma) / SNR(t): the Min-SNR-gamma weights for epsilon prediction."""
    snr = compute_snr(scheduler, t)
    return snr.clamp(max=gamma) / snr


class LDMTask(Task):
    """epsilon-prediction MSE of the text-conditioned UNet; the prompt is replaced by the empty prompt
    with probability ``cond_dropout`` so classifier-free guidance works at sampling time. With
    ``snr_gamma`` the per-sample loss is weighted by min(SNR, gamma) / SNR (Min-SNR, Hang et al. 2023),
    as diffusers' train_text_to_image example does; it converges faster, which short CPU runs need."""

    def __init__(self, unet, text_encoder, train_text_encoder: bool, scheduler, cond_dropout: float, empty_ids,
                 snr_gamma: float | None = None):
        super().__init__()
        self.snr_gamma = snr_gamma
        self.unet = unet
        if train_text_encoder:
            self.text_encoder = text_encoder
        else:
            text_encoder.requires_grad_(False)
            self._frozen = [text_encoder]  # outside the module tree: not trained, not checkpointed
        self.scheduler, self.cond_dropout = scheduler, cond_dropout
        self.register_buffer("empty_ids", empty_ids.clone(), persistent=False)

    def encoder(self):
        return self.text_encoder if hasattr(self, "text_encoder") else self._frozen[0]

    def compile_targets(self):
        return [self.unet]

    def prepare(self, device, dtype):
        if hasattr(self, "_frozen"):
            self._frozen[0].to(device, dtype).eval()

    def forward(self, batch, g):
        z0 = batch["mean"] + batch["std"] * torch.randn(batch["mean"].shape, generator=g, device=g.device)
        flip = torch.rand(len(z0), generator=g, device=g.device) < 0.5  # the paper's random flip, on latents
        z0 = torch.where(flip[:, None, None, None], z0.flip(-1), z0)
        ids = batch["ids"]
        drop = torch.rand(len(ids), generator=g, device=g.device) < self.cond_dropout
        ids = torch.where(drop[:, None], self.empty_ids[None], ids)
        hidden = self.encoder()(ids)[0]
        noise = torch.randn(z0.shape, generator=g, device=g.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(z0),), generator=g, device=g.device)
        zt = self.scheduler.add_noise(z0, noise, t)
        pred = self.unet(zt.to(hidden.dtype), t, encoder_hidden_states=hidden).sample
        if self.snr_gamma is None:
            return F.mse_loss(pred.float(), noise.float())
        per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_sample * min_snr_weights(self.scheduler, t, self.snr_gamma)).mean()


# ------------------------------------------------------------------ stage steps
SCALING_IMAGES = 2048  # the latent scaling factor is estimated on the first 2,048 training images (ample for one std)


def train_vae(train_x: np.ndarray, cfg, seed: int, device: str, ckpt_root: Path, log_csv: Path, fingerprint: str,
              perceptual=None):
    """The scratch regime's autoencoder. ``perceptual``: the prototypes stage's extractor (``SelfTrained``),
    needed when ``cfg.perceptual_weight`` > 0; its weights' digest joins the run hash."""
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    if cfg.crop_size and (cfg.crop_size > train_x.shape[1] or cfg.crop_size % factor):
        raise ValueError(f"ldm_finetune.vae.crop_size {cfg.crop_size} must be at most the image size {train_x.shape[1]} "
                         f"and a multiple of the VAE's downsampling factor {factor}")
    net = None
    if cfg.perceptual_weight:
        if not hasattr(perceptual, "backbone"):
            raise ValueError("ldm_finetune.vae.perceptual_weight > 0 needs the prototypes stage's own DINO "
                             "(prototypes.extractor: self); a pretrained extractor is not supported for it")
        net = copy.deepcopy(perceptual.backbone)
    torch.manual_seed(seed)
    vae = models.build_vae(cfg)
    task = VAETask(vae, cfg.kl_weight, cfg.crop_size, cfg.disc_weight, cfg.disc_start, cfg.perceptual_weight, net)
    identity = {"vae": cfg.model_dump(mode="json"), "seed": seed, "data": fingerprint}
    if net is not None:
        identity["perceptual"] = hashlib.sha256(b"".join(v.cpu().numpy().tobytes() for v in net.state_dict().values())).hexdigest()[:16]
    run = params_hash(identity)
    out = train_loop(task, {"x": torch.from_numpy(train_x)}, cfg.train, ckpt_root / f"vae-{run}", run, seed,
                     device, log_csv, name="vae")
    vae = out["model"].vae
    vae.register_to_config(scaling_factor=1.0)
    mean, _ = encode(vae, train_x[:SCALING_IMAGES], None, device)
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))  # as SD's 0.18215: unit-variance latents
    return vae, out


@torch.no_grad()
def reconstruction_quality(vae, images: np.ndarray, resolution: int | None, device) -> dict:
    """PSNR and SSIM (torchmetrics, data range [0, 1]) of VAE reconstructions of held-out real patches."""
    from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

    psnr, ssim = PeakSignalNoiseRatio(data_range=1.0), StructuralSimilarityIndexMeasure(data_range=1.0)
    vae.eval().to(device)
    dtype = next(vae.parameters()).dtype
    for s in range(0, len(images), 128):
        x = to_model_range(images[s:s + 128], resolution).to(device, dtype)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        a, b = (rec.float().cpu().clamp(-1, 1) + 1) / 2, (x.float().cpu() + 1) / 2
        psnr.update(a, b)
        ssim.update(a, b)
    return {"psnr": float(psnr.compute()), "ssim": float(ssim.compute()), "n": int(len(images))}


def build_text_side(regime: str, params, prompts: list[str], pretrained: dict | None):
    if regime == "finetune":
        return pretrained["tokenizer"], pretrained["text_encoder"]
    tok = models.build_tokenizer(sorted(set(prompts)) + [""], params.text_encoder.max_length)
    return tok, models.build_text_encoder(params.text_encoder, tok)


def build_variant(variant: str, lp, prompts: list[str], pretrained: dict | None, latent_shape: tuple, seed: int):
    """Tokenizer, text encoder and UNet of one prompt variant, built after seeding torch with the
    variant's own seed: the models of a variant do not depend on which variants ran before it."""
    import copy

    from ..runtime import derive_seed

    torch.manual_seed(derive_seed(seed, "ldm_finetune", variant))
    tok, te = build_text_side(lp.regime, lp, prompts, pretrained)
    unet = (copy.deepcopy(pretrained["unet"]) if pretrained else
            models.build_unet(lp.unet, latent_shape[-1], latent_shape[0], te.config.hidden_size))
    return tok, te, unet


def check_batch_sizes(lp, n_unet: int, n_vae: int) -> None:
    """Before any compute: each loop's batch must fit the images it trains on (named by its key)."""
    checks = [("ldm_finetune.train.batch_size", lp.train.batch_size, n_unet, "UNet (prompt-balanced subset)"),
              ("ldm_finetune.classifier.train.batch_size", lp.classifier.train.batch_size, n_vae, "classifier (train split)")]
    if lp.regime == "scratch":
        checks.append(("ldm_finetune.vae.train.batch_size", lp.vae.train.batch_size, n_vae, "VAE (train split)"))
    for key, batch, n, what in checks:
        if batch > n:
            raise ValueError(f"{key} {batch} is larger than the {n} training images of the {what}")


PROMPT_COLUMN = {"baseline": "prompt_baseline", "mep": "prompt_mep"}  # the prompts table's column per variant


def check_text_side(lp, table: pd.DataFrame) -> None:
    """Before any compute (scratch regime): every variant's prompts fit the text encoder's ``max_length``.
    Otherwise a too-short setting shows only when that variant's tokenizer is built, after the models before
    it have trained."""
    if lp.regime != "scratch":
        return
    for variant in lp.variants:
        models.build_tokenizer(sorted(set(table[PROMPT_COLUMN[variant]])) + [""], lp.text_encoder.max_length)


# ldm_finetune settings that do not change the UNet's weights (sample grids, the other models, which variants run);
# the loop's cadence settings are left out by params_hash itself
_NOT_UNET = {"sample_steps", "sample_guidance", "n_sample_seeds", "classifier", "variants"}


def unet_run_hash(variant: str, lp, seed: int, fingerprint: str, prompts: list[str]) -> str:
    return params_hash({"variant": variant, "ldm": lp.model_dump(mode="json", exclude=_NOT_UNET), "seed": seed,
                        "data": fingerprint, "prompts": params_hash({"p": prompts})})


def train_unet(variant: str, latents: tuple, prompts: list[str], tokenizer, text_encoder, unet, lp, seed: int,
               device: str, ckpt_root: Path, log_csv: Path, fingerprint: str, train_text_encoder: bool,
               on_sample=None):
    scheduler = models.noise_scheduler()
    ids = models.tokenize(tokenizer, prompts)
    empty = models.tokenize(tokenizer, [""])[0]
    task = LDMTask(unet, text_encoder, train_text_encoder, scheduler, lp.cond_dropout, empty, lp.snr_gamma)
    run = unet_run_hash(variant, lp, seed, fingerprint, prompts)
    out = train_loop(task, {"mean": latents[0], "std": latents[1], "ids": ids}, lp.train, ckpt_root / f"unet-{variant}-{run}",
                     run, seed, device, log_csv, name=f"unet[{variant}]", on_sample=on_sample)
    return out


def train_classifier(latents: tuple, prototypes: np.ndarray, k: int, cp, seed: int, device: str, ckpt_root: Path,
                     log_csv: Path, fingerprint: str):
    from .classifier import ClassifierTask, NoisyLatentClassifier

    torch.manual_seed(seed)
    model = NoisyLatentClassifier(in_channels=latents[0].shape[1], num_classes=k, channels=tuple(cp.channels))
    task = ClassifierTask(model, models.noise_scheduler())
    run = params_hash({"classifier": cp.model_dump(mode="json"), "k": k, "seed": seed, "data": fingerprint})
    out = train_loop(task, {"mean": latents[0], "std": latents[1], "prototype": torch.from_numpy(prototypes).long()},
                     cp.train, ckpt_root / f"classifier-{run}", run, seed, device, log_csv, name="classifier")
    return out["model"].model, out


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, device: str) -> np.ndarray:
    """Images from the diffusers pipeline call, one fixed seed per image (uint8 [N,H,W,3])."""
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
    out = pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=gens,
               output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
