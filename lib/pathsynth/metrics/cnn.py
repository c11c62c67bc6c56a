"""A small CNN trained on pixels: the pixel machine reader (``readers.c2st_cnn``) and the supervised
experiment of the image-derived-prompt paper (a classifier trained on synthetic images, judged on real
test images; ``linear_probe`` stage). One architecture, one augmentation, one loop, so every run of it
is comparable: random horizontal flips and quarter turns per batch (tissue has no orientation), AdamW,
a fixed number of steps.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..runtime import derive_seed, log_reused


class SmallCNN(nn.Module):
    """Three conv blocks and a linear read-out (one logit): enough to see blur, colour and texture."""

    def __init__(self, width: int = 16):
        super().__init__()
        layers, c = [], 3
        for w in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, 1)

    def forward(self, x):
        return self.head(self.features(x)).squeeze(1)


def to_tensor(images: np.ndarray, image_size: int | None = None) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, S, S] in [0, 1], area-downsampled to ``image_size`` if given."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)
    if image_size and image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="area")
    return x


def train_cnn(x: torch.Tensor, y: np.ndarray, train_idx: np.ndarray, steps: int, batch_size: int, seed: int,
              device: str = "cpu", lr: float = 2e-3, width: int = 16, cosine: bool = False, progress=None) -> SmallCNN:
    """Binary cross-entropy on ``x[train_idx]`` for ``steps`` steps: epochs of a seeded permutation, each batch
    flipped with probability 1/2 and turned by a random multiple of 90 degrees. ``cosine``: the learning rate
    decays to 0 over the steps (short runs then end at a settled point, not wherever the last batch left them)."""
    if len(train_idx) < 2:
        raise ValueError(f"the CNN needs at least 2 training images, got {len(train_idx)}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = SmallCNN(width).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + np.cos(np.pi * i / steps)) if cosine else 1.0)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.float32)
    tr = torch.as_tensor(np.asarray(train_idx))
    done = 0
    bar = progress(total=steps, desc="cnn", unit="step") if progress else None
    net.train()
    while done < steps:
        order = tr[torch.randperm(len(tr), generator=g)]
        for s in range(0, len(order), batch_size):
            if done == steps:
                break
            b = order[s:s + batch_size]
            xb = x[b]
            if torch.rand(1, generator=g) < 0.5:
                xb = xb.flip(-1)
            xb = torch.rot90(xb, int(torch.randint(0, 4, (1,), generator=g)), dims=(-2, -1))
            loss = F.binary_cross_entropy_with_logits(net(xb.to(device)), yt[b].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return net.eval()


@torch.no_grad()
def predict(net: SmallCNN, x: torch.Tensor, device: str = "cpu", batch_size: int = 256) -> np.ndarray:
    """P(class 1) per image."""
    net.eval()
    return torch.cat([torch.sigmoid(net(x[s:s + batch_size].to(device))).cpu()
                      for s in range(0, len(x), batch_size)]).numpy()


def balanced_draws(y: np.ndarray, n: int, k: int, seed: int) -> list[np.ndarray]:
    """k draws of n indices of ``y``, n/2 per class, each sorted. Each class is read in one seeded order and cut into
    k equal blocks; draw j is the first n/2 of block j (running on cyclically where n/2 exceeds a block). So the draws
    are disjoint wherever the set holds k x n/2 images of each class (all k the whole set where n is all of it), and for
    one seed the draws of growing n are nested (a data-efficiency curve adds images rather than redrawing them)."""
    y = np.asarray(y)
    if n % 2 or n < 2:
        raise ValueError(f"a balanced subset needs an even size of at least 2, got {n}")
    if k < 1:
        raise ValueError(f"at least one draw, got {k}")
    rng = np.random.default_rng(seed)
    draws = [[] for _ in range(k)]
    for c in (0, 1):
        members = np.flatnonzero(y == c)
        if len(members) < n // 2:
            raise ValueError(f"a balanced subset of {n} needs {n // 2} images of class {c}; there are {len(members)}")
        order, block = rng.permutation(members), len(members) // k
        for j in range(k):
            draws[j].append(order[(j * block + np.arange(n // 2)) % len(members)])
    return [np.sort(np.concatenate(d)) for d in draws]


def draw_size(sets: dict[str, np.ndarray], n: int | None, k: int) -> int:
    """Images per draw when each of ``sets`` (name -> labels) gives k disjoint class-balanced draws: ``n``, or where
    it is None the most that the smallest class of any set allows; a set that cannot hold k draws of n is an error
    naming it."""
    per_class = {name: min(int((np.asarray(y) == c).sum()) for c in (0, 1)) for name, y in sets.items()}
    n = n or 2 * (min(per_class.values()) // k)
    held = {name: 2 * c for name, c in per_class.items()}  # balanced images each set can give
    short = {name: h for name, h in held.items() if k * (n // 2) > h // 2}
    if short or n < 2 or n % 2:
        where = f"these hold fewer: {short}" if short else f"the sets hold {held}"
        raise ValueError(f"linear_probe.supervised: {k} disjoint draws (n_seeds) of {n} images (n_synthetic, even) "
                         f"need {k * max(n, 2)} per synthetic set in balanced classes; {where}: "
                         "raise guided_sampling.n_per_mode or lower n_synthetic / n_seeds")
    return n


def disjoint(draws: list[np.ndarray]) -> bool:
    """Whether no index is in two draws."""
    return len(np.unique(np.concatenate(draws))) == sum(len(d) for d in draws)


def supervised_run(images: np.ndarray, labels: np.ndarray, test_images: torch.Tensor, cfg, seed: int, cache: Path,
                   device: str = "cpu", progress=None) -> np.ndarray:
    """Train the small CNN on ``images``/``labels`` with recipe ``cfg`` (linear_probe.supervised) and return
    P(cancer) of each test image; a finished run is kept in ``cache`` (an .npy named by the hash of its data,
    recipe and seed), so a killed stage redoes only the run it was in."""
    from ..prototypes.features import data_fingerprint
    from ..training import params_hash

    key = params_hash({"images": data_fingerprint(images), "labels": data_fingerprint(np.asarray(labels)),
                       "test": data_fingerprint(test_images.numpy()), "recipe": "cosine/1",
                       "cfg": cfg.model_dump(mode="json", exclude={"n_seeds"}), "seed": seed})
    path = Path(cache) / f"{key}.npy"
    if path.is_file():
        log_reused("supervised CNN", path, "its test scores")
        return np.load(path)
    x = to_tensor(images, cfg.image_size)
    net = train_cnn(x, labels, np.arange(len(labels)), cfg.steps, cfg.batch_size, seed, device, cfg.lr, cosine=True,
                    progress=progress)
    p = predict(net, test_images, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, p)
    tmp.replace(path)
    return p


def seed_list(seed: int, n: int) -> list[int]:
    """The CNN seeds of one experiment: ``seed`` itself, then seeds derived from it (so n = 1 is the one-seed run)."""
    return [seed] + [derive_seed(seed, "cnn_seed", i) for i in range(1, n)]


def supervised_seeds(draws: list[tuple[np.ndarray, np.ndarray]], test_images: torch.Tensor, cfg, seed: int,
                     cache: Path, device: str = "cpu", progress=None) -> np.ndarray:
    """One ``supervised_run`` per (images, labels) draw, the j-th with the j-th of ``seed_list(seed, cfg.n_seeds)``
    (initialisation, batch order, flips and turns): P(cancer) as [n_seeds, n_test]. Their mean is the study's score;
    the spread of the per-run AUROCs is the variance a test-image bootstrap cannot see: the CNN's training, and, where
    the draws are different images, which images a set of that size happens to hold. Pass one draw ``n_seeds``
    times to measure the CNN's part alone."""
    if len(draws) != cfg.n_seeds:
        raise ValueError(f"{len(draws)} training draws for linear_probe.supervised.n_seeds {cfg.n_seeds}: one each")
    return np.stack([supervised_run(x, y, test_images, cfg, s, cache, device, progress)
                     for (x, y), s in zip(draws, seed_list(seed, cfg.n_seeds))])
