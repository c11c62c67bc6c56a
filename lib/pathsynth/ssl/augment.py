"""Batched multi-crop augmentation for H&E patches, done on whole tensors.

Per-image torchvision transforms run at ~156 img/s on this 2-core machine, as slow as the model
(../shared/MACHINE.md); these batched versions run one kernel per batch. Every random choice comes
from an explicit ``torch.Generator`` so an augmentation stream is reproducible.

H&E-specific choices (ours, following common pathology SSL practice):
- flips and 90-degree rotations: tissue has no canonical orientation;
- colour jitter in stain space (HED jitter, Tellez et al. 2018): RGB -> optical density ->
  hematoxylin/eosin concentrations, each scaled and shifted per image, and back, so colours stay
  plausible stains instead of arbitrary hue shifts (DINO's hue jitter and grey-scale are dropped);
- Gaussian blur with a per-image sigma (DINO: p = 1.0 / 0.1 / 0.5 for global 1 / global 2 / local);
- no solarisation (not a plausible appearance for a stained slide).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

# Ruifrok & Johnston stain matrix (rows: hematoxylin, eosin, DAB/residual), normalised
_HED = torch.tensor([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105], [0.268, 0.570, 0.776]])
_HED = _HED / _HED.norm(dim=1, keepdim=True)
_HED_INV = torch.linalg.inv(_HED)


def _uniform(g, n, lo, hi, device):
    return torch.rand(n, generator=g, device=device) * (hi - lo) + lo


def random_resized_crop(x, size: int, scale, g: torch.Generator, ratio=(3 / 4, 4 / 3)):
    """Per-image random crop (area fraction in ``scale``, aspect in ``ratio``) resized to ``size``."""
    b, _, h, w = x.shape
    dev = x.device
    area = _uniform(g, b, *scale, dev) * h * w
    logr = _uniform(g, b, torch.log(torch.tensor(ratio[0])).item(), torch.log(torch.tensor(ratio[1])).item(), dev)
    ar = torch.exp(logr)
    cw = torch.sqrt(area * ar).clamp(1, w)
    ch = torch.sqrt(area / ar).clamp(1, h)
    x0 = torch.rand(b, generator=g, device=dev) * (w - cw)
    y0 = torch.rand(b, generator=g, device=dev) * (h - ch)
    boxes = torch.stack([torch.arange(b, device=dev, dtype=x.dtype), x0, y0, x0 + cw, y0 + ch], 1)
    return roi_align(x, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def flips_and_rot90(x, g: torch.Generator):
    b = x.shape[0]
    hflip = torch.rand(b, generator=g, device=x.device) < 0.5
    x = torch.where(hflip[:, None, None, None], x.flip(-1), x)
    k = torch.randint(0, 4, (b,), generator=g, device=x.device)
    out = x.clone()
    for r in (1, 2, 3):
        sel = k == r
        if sel.any():
            out[sel] = torch.rot90(x[sel], r, dims=(-2, -1))
    return out


def hed_jitter(x, g: torch.Generator, sigma: float = 0.05, bias: float = 0.05, p: float = 0.8):
    """Stain-space colour jitter: concentrations c -> c * (1 + a) + b, a ~ U(-sigma, sigma), b ~ U(-bias, bias)."""
    b = x.shape[0]
    dev = x.device
    od = -torch.log10(x.clamp(1 / 255, 1.0))
    conc = torch.einsum("bchw,cs->bshw", od, _HED_INV.to(dev, x.dtype))
    a = (torch.rand(b, 3, generator=g, device=dev) * 2 - 1) * sigma
    s = (torch.rand(b, 3, generator=g, device=dev) * 2 - 1) * bias
    apply = (torch.rand(b, generator=g, device=dev) < p).to(x.dtype)[:, None]
    a, s = a * apply, s * apply
    conc = conc * (1 + a[..., None, None]) + s[..., None, None]
    od = torch.einsum("bshw,sc->bchw", conc, _HED.to(dev, x.dtype))
    return torch.pow(10.0, -od).clamp(0, 1)


def brightness_contrast(x, g: torch.Generator, strength: float = 0.2, p: float = 0.8):
    b = x.shape[0]
    dev = x.device
    apply = (torch.rand(b, generator=g, device=dev) < p).to(x.dtype)
    br = 1 + (torch.rand(b, generator=g, device=dev) * 2 - 1) * strength * apply
    ct = 1 + (torch.rand(b, generator=g, device=dev) * 2 - 1) * strength * apply
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x * br[:, None, None, None] - mean) * ct[:, None, None, None] + mean).clamp(0, 1)


def gaussian_blur(x, g: torch.Generator, p: float, sigma=(0.1, 1.0)):
    """Per-image Gaussian blur (separable, grouped convolution); sigma in pixels of the crop."""
    b, c, h, w = x.shape
    dev = x.device
    sig = _uniform(g, b, *sigma, dev)
    apply = torch.rand(b, generator=g, device=dev) < p
    radius = max(1, int(round(3 * sigma[1])))
    t = torch.arange(-radius, radius + 1, device=dev, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sig[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)
    ident = torch.zeros_like(k)
    ident[:, radius] = 1
    k = torch.where(apply[:, None], k, ident)
    k = k.repeat_interleave(c, 0)  # [b*c, K]
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise(x):
    m = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype)[None, :, None, None]
    s = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype)[None, :, None, None]
    return (x - m) / s


@dataclass
class MultiCrop:
    """DINO's multi-crop, adapted to small patches.

    A 96 px PCam patch (or its 32/64 px resize) is not a 224 px ImageNet image: global crops keep
    the full input size (the whole patch is about one field of tissue), local crops are
    ``local_fraction`` of it (16 px of a 32 px patch, 32 of 64, 48 of 96), so each local crop still
    holds several nuclei. Crop-size side lengths are rounded to a multiple of the ViT patch size.
    """

    image_size: int
    patch_size: int
    global_scale: tuple = (0.5, 1.0)
    local_scale: tuple = (0.2, 0.5)
    n_local: int = 4
    local_fraction: float = 0.5

    @property
    def global_size(self) -> int:
        return max(self.patch_size, self.image_size // self.patch_size * self.patch_size)

    @property
    def local_size(self) -> int:
        s = int(round(self.image_size * self.local_fraction / self.patch_size)) * self.patch_size
        return max(self.patch_size, s)

    def _view(self, x, size, scale, blur_p, g):
        v = random_resized_crop(x, size, scale, g)
        v = flips_and_rot90(v, g)
        v = hed_jitter(v, g)
        v = brightness_contrast(v, g)
        v = gaussian_blur(v, g, blur_p, sigma=(0.1, max(0.2, size / 32)))
        return normalise(v)

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
        """x: float [B,3,H,W] in [0,1]. Returns 2 global views then ``n_local`` local views."""
        views = [self._view(x, self.global_size, self.global_scale, 1.0, g),
                 self._view(x, self.global_size, self.global_scale, 0.1, g)]
        views += [self._view(x, self.local_size, self.local_scale, 0.5, g) for _ in range(self.n_local)]
        return views
