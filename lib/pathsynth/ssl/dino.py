"""DINO (Caron et al. 2021), following facebookresearch/dino: student and teacher ViTs, a projection
head with a weight-normalised last layer, centring and sharpening with a teacher-temperature
warm-up, an EMA teacher with a cosine momentum schedule, cosine lr and weight-decay schedules,
gradient clipping and a frozen last layer during the first epoch(s).

Written here rather than taken from lightly because the study needs, in one readable file, the
exact recipe of the reference implementation plus what lightly does not give: a collapse monitor,
batched stain-aware multi-crop on tensors, resumable checkpoints under a params guard, and the same
code on CPU, one GPU, or several through accelerate.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Dino
from ..runtime import RateLogger
from ..training import Checkpoints, CSVLog, check_finite, params_hash, rng_state, set_rng_state
from .augment import MultiCrop

log = logging.getLogger("pathsynth")

WIDTHS = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}


def build_vit(arch: str, depth: int, patch_size: int, img_size: int, drop_path_rate: float = 0.0) -> nn.Module:
    """A timm VisionTransformer returning the CLS token; accepts any input size (interpolated
    position embeddings), so global and local crops share it. Stochastic depth (``drop_path_rate``)
    is for the student only, as in the DINO reference (0.1 for ViT-S)."""
    if arch not in WIDTHS:
        raise ValueError(f"prototypes.dino.arch: unknown '{arch}' (one of {sorted(WIDTHS)})")
    if img_size % patch_size:
        raise ValueError(f"image size {img_size} is not a multiple of dino.patch_size {patch_size}")
    dim, heads = WIDTHS[arch]
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads,
        num_classes=0, global_pool="token", dynamic_img_size=True, drop_path_rate=drop_path_rate)


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256, nlayers=3):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
        for _ in range(nlayers - 2):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
        layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False  # norm_last_layer=True

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per crop resolution, then the head on all crops."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]):
        sizes = torch.tensor([c.shape[-1] for c in crops])
        ends = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
        feats, start = [], 0
        for end in ends.tolist():
            feats.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(feats))


class DINOLoss(nn.Module):
    """Cross-entropy between the sharpened, centred teacher distribution of each global view and
    the student distribution of every other view; the centre is an EMA of teacher outputs."""

    def __init__(self, out_dim, n_crops, warmup_teacher_temp, teacher_temp, warmup_epochs, epochs,
                 student_temp=0.1, center_momentum=0.9):
        super().__init__()
        self.student_temp, self.center_momentum, self.n_crops = student_temp, center_momentum, n_crops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_epochs),
            np.ones(max(0, epochs - warmup_epochs)) * teacher_temp))

    def teacher_probs(self, teacher_output, epoch: int):
        temp = self.teacher_temp_schedule[min(epoch, len(self.teacher_temp_schedule) - 1)]
        return F.softmax((teacher_output - self.center) / temp, dim=-1)

    def forward(self, student_output, teacher_output, epoch: int):
        student = (student_output / self.student_temp).chunk(self.n_crops)
        teacher = self.teacher_probs(teacher_output, epoch).detach().chunk(2)
        total, n_terms = 0.0, 0
        for iq, q in enumerate(teacher):
            for v in range(len(student)):
                if v == iq:
                    continue
                total = total + torch.sum(-q * F.log_softmax(student[v], dim=-1), dim=-1).mean()
                n_terms += 1
        self.update_center(teacher_output)
        return total / n_terms

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = teacher_output.mean(dim=0, keepdim=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            batch_center = batch_center / torch.distributed.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_center * (1 - self.center_momentum))


def cosine_schedule(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup=0.0):
    warm = np.linspace(start_warmup, base, warmup_epochs * niter_per_ep) if warmup_epochs else np.array([])
    iters = np.arange(epochs * niter_per_ep - len(warm))
    sched = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warm, sched))


def collapse_stats(teacher_probs: torch.Tensor) -> dict:
    """Entropy of the mean teacher distribution (near 0: all images map to one dimension) and the mean
    per-image entropy (near ln(out_dim): uniform outputs). Both signal collapse."""
    p = teacher_probs.float()
    mean_p = p.mean(0)
    return {"teacher_entropy": float(-(p * torch.log(p + 1e-12)).sum(-1).mean()),
            "batch_entropy": float(-(mean_p * torch.log(mean_p + 1e-12)).sum())}


class CollapseMonitor:
    def __init__(self, out_dim: int):
        self.max_entropy = math.log(out_dim)
        self.warned = False

    def check(self, loss: float, stats: dict, epoch: int) -> list[str]:
        problems = []
        if epoch >= 1 and abs(loss - self.max_entropy) < 0.01 * self.max_entropy:
            problems.append(f"loss {loss:.3f} is stuck at ln(out_dim) = {self.max_entropy:.3f} (uniform collapse)")
        if stats["batch_entropy"] < 0.1:
            problems.append(f"teacher outputs all fall on one dimension (batch entropy {stats['batch_entropy']:.3f})")
        if epoch >= 1 and stats["teacher_entropy"] > 0.98 * self.max_entropy:
            problems.append(f"teacher outputs are uniform (entropy {stats['teacher_entropy']:.2f} of max {self.max_entropy:.2f})")
        if problems and not self.warned:
            msg = "DINO COLLAPSE WARNING: " + "; ".join(problems)
            warnings.warn(msg)
            log.warning("!" * 20 + " " + msg + " " + "!" * 20)
            self.warned = True
        return problems


def build_student_teacher(cfg: Dino, size: int) -> tuple[nn.Module, nn.Module]:
    """Student (stochastic depth 0.1, trained) and teacher (the same weights, no stochastic depth, eval
    mode, no gradients: the EMA of the student, as in the DINO reference)."""
    def make(drop):
        return MultiCropWrapper(build_vit(cfg.arch, cfg.depth, cfg.patch_size, size, drop_path_rate=drop),
                                DINOHead(WIDTHS[cfg.arch][0], cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim))

    student, teacher = make(0.1), make(0.0)
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher.eval()


def _param_groups(model):
    reg, no_reg = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_reg if name.endswith(".bias") or p.ndim == 1 else reg).append(p)
    return [{"params": reg}, {"params": no_reg, "weight_decay": 0.0}]


def train_dino(images: np.ndarray, cfg: Dino, out_dir: Path, seed: int, device: str = "cpu",
               plots_csv: Path | None = None, progress=None) -> dict:
    """Train DINO on uint8 [N,H,W,3] images. Resumes from ``out_dir/checkpoint-*`` when the params
    match; returns {"backbone": teacher backbone (eval), "history": [...], "collapse": [...]}."""
    from accelerate import Accelerator

    n, size = len(images), images.shape[1]
    if cfg.batch_size > n:
        raise ValueError(f"dino.batch_size {cfg.batch_size} is larger than the {n} training images")
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=(device == "cpu"))
    torch.manual_seed(seed)
    student, teacher = build_student_teacher(cfg, size)
    crops = MultiCrop(size, cfg.patch_size, tuple(cfg.global_crop_scale), tuple(cfg.local_crop_scale),
                      cfg.local_crops_number, cfg.local_crop_fraction)
    loss_fn = DINOLoss(cfg.out_dim, 2 + cfg.local_crops_number, cfg.warmup_teacher_temp, cfg.teacher_temp,
                       cfg.warmup_teacher_temp_epochs, cfg.epochs, cfg.student_temp, cfg.center_momentum)
    opt = torch.optim.AdamW(_param_groups(student))
    global_batch = cfg.batch_size * acc.num_processes  # batch_size is per process, as in DINO
    steps_per_epoch = n // global_batch
    total = steps_per_epoch * cfg.epochs
    lr_s = cosine_schedule(cfg.lr * cfg.batch_size * acc.num_processes / 256.0, cfg.min_lr, cfg.epochs,
                           steps_per_epoch, cfg.warmup_epochs)
    wd_s = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch)
    mom_s = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps_per_epoch)

    ckpt = Checkpoints(out_dir, params_hash({"dino": cfg.model_dump(mode="json"), "seed": seed, "n": n, "size": size}))
    start_epoch, history, log_rows = 0, [], None
    last = ckpt.latest()
    if last is not None:
        st = Checkpoints.load(last)
        student.load_state_dict(st["student"]), teacher.load_state_dict(st["teacher"])
        opt.load_state_dict(st["opt"]), loss_fn.load_state_dict(st["loss"])
        set_rng_state(st["rng"])
        start_epoch, history, log_rows = st["epoch"] + 1, st["history"], st.get("log_rows")
        log.info(f"DINO: resumed from {last} (epoch {start_epoch}/{cfg.epochs})")
    student, opt = acc.prepare(student, opt)
    dev = acc.device
    teacher, loss_fn = teacher.to(dev), loss_fn.to(dev)  # no gradients: not wrapped for DDP
    csv_log = CSVLog(plots_csv, ["step", "epoch", "loss", "lr", "wd", "momentum", "teacher_entropy",
                                 "batch_entropy"], resume_step=start_epoch * steps_per_epoch, rows=log_rows) if plots_csv else None
    monitor = CollapseMonitor(cfg.out_dim)
    rate = RateLogger(total, "dino")
    x_all = torch.from_numpy(images)
    collapse = []
    for epoch in range(start_epoch, cfg.epochs):
        g = torch.Generator().manual_seed(seed * 1000 + epoch)
        order = torch.randperm(n, generator=g)
        student.train()
        ep_losses = []
        for it in range(steps_per_epoch):
            step = epoch * steps_per_epoch + it
            for i, group in enumerate(opt.param_groups):
                group["lr"] = lr_s[step]
                if i == 0:
                    group["weight_decay"] = wd_s[step]
            idx = order[it * global_batch:(it + 1) * global_batch][acc.process_index::acc.num_processes]
            batch = x_all[idx].to(dev).permute(0, 3, 1, 2).float().div_(255.0)
            views = crops(batch, g if dev.type == "cpu" else torch.Generator(device=dev).manual_seed(seed + step))
            with acc.autocast():
                t_out = teacher(views[:2])
                s_out = student(views)
                loss = loss_fn(s_out, t_out, epoch)
            lv = float(loss.detach())
            check_finite(lv, step, ckpt.list()[-1] if ckpt.list() else None)
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            if cfg.clip_grad:
                acc.clip_grad_norm_(student.parameters(), cfg.clip_grad)
            if epoch < cfg.freeze_last_layer_epochs:
                for p in acc.unwrap_model(student).head.last_layer.parameters():
                    p.grad = None
            opt.step()
            with torch.no_grad():
                m = mom_s[step]
                for ps, pt in zip(acc.unwrap_model(student).parameters(), teacher.parameters()):
                    pt.data.mul_(m).add_((1 - m) * ps.detach().data)
            ep_losses.append(lv)
            if step % cfg.log_every == 0 or it == steps_per_epoch - 1:
                with torch.no_grad():
                    stats = collapse_stats(loss_fn.teacher_probs(t_out.float(), epoch))
                problems = monitor.check(lv, stats, epoch)
                if problems:
                    collapse.append({"step": step, "problems": problems})
                if csv_log and acc.is_main_process:
                    csv_log.write(step=step, epoch=epoch, loss=lv, lr=lr_s[step], wd=wd_s[step], momentum=m, **stats)
                rate(step + 1, (step + 1 - start_epoch * steps_per_epoch) * cfg.batch_size, loss=lv, epoch=epoch)
        history.append({"epoch": epoch, "loss": float(np.mean(ep_losses))})
        if acc.is_main_process:
            ckpt.save(epoch, {"student": acc.unwrap_model(student).state_dict(),
                              "teacher": teacher.state_dict(),
                              "opt": opt.state_dict(), "loss": loss_fn.state_dict(),
                              "rng": rng_state(), "epoch": epoch, "history": history,
                              "log_rows": csv_log.rows if csv_log else None})
        acc.wait_for_everyone()
    backbone = teacher.backbone.eval()
    return {"backbone": backbone, "student": acc.unwrap_model(student).eval(), "teacher": teacher.eval(),
            "loss_fn": loss_fn, "crops": crops, "history": history, "collapse": collapse, "steps": total,
            "images_seen": total * cfg.batch_size, "max_entropy": math.log(cfg.out_dim)}
