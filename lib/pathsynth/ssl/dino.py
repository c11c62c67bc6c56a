"""DINO (Caron et al. 2021), following facebookresearch/dino: student and teacher ViTs, a projection
head with a weight-normalised last layer, centring and sharpening with a teacher-temperature
warm-up, an EMA teacher with a cosine momentum schedule, cosine lr and weight-decay schedules,
gradient clipping and a frozen last layer during the first epoch(s).

Written here rather than taken from lightly because the study needs, in one readable file, the
exact recipe of the reference implementation plus what lightly does not give: a collapse monitor,
batched stain-aware multi-crop on tensors, and the study's one training loop (``DinoTask`` on
``training.train_loop``: checkpoints every N steps under a params guard, resume, the same code on
CPU, one GPU, or several through accelerate).
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import Dino, Loop
from ..training import MixedStream, Task, params_hash, train_loop
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


class DinoTask(Task):
    """DINO as a task of the study's one training loop (``training.train_loop``): the loop does the
    accelerator, mixed precision, several processes, checkpoints every N steps, resume and logs; this
    adds what DINO needs around the optimiser step, as the reference does it per iteration: cosine
    schedules of lr (linear warm-up, scaled by batch/256) and weight decay (regularised group only),
    the last layer frozen during the first epochs, the EMA teacher with a cosine momentum schedule, and
    the collapse monitor at every log step. ``steps_per_epoch`` turns the recipe's epochs into steps.
    The teacher (no stochastic depth, eval mode, no gradients) and the loss centre are part of the
    module, so they travel in the checkpoints."""

    owns_schedule = True
    log_fields = ("epoch", "wd", "momentum", "teacher_entropy", "batch_entropy")

    def __init__(self, cfg: Dino, image_size: int, steps_per_epoch: int, world_size: int = 1):
        super().__init__()
        self.cfg, self.steps_per_epoch = cfg, steps_per_epoch
        self.student, self.teacher = build_student_teacher(cfg, image_size)
        self.loss_fn = DINOLoss(cfg.out_dim, 2 + cfg.local_crops_number, cfg.warmup_teacher_temp, cfg.teacher_temp,
                                cfg.warmup_teacher_temp_epochs, cfg.epochs, cfg.student_temp, cfg.center_momentum)
        self.crops = MultiCrop(image_size, cfg.patch_size, tuple(cfg.global_crop_scale), tuple(cfg.local_crop_scale),
                               cfg.local_crops_number, cfg.local_crop_fraction)
        self.lr_s = cosine_schedule(cfg.lr * cfg.batch_size * world_size / 256.0, cfg.min_lr, cfg.epochs,
                                    steps_per_epoch, cfg.warmup_epochs)
        self.wd_s = cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, cfg.epochs, steps_per_epoch)
        self.mom_s = cosine_schedule(cfg.momentum_teacher, 1.0, cfg.epochs, steps_per_epoch)
        self.monitor, self.collapse = CollapseMonitor(cfg.out_dim), []
        self.step_now, self._t_out = 0, None

    @property
    def total_steps(self) -> int:
        return len(self.lr_s)

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains and has no stochastic depth
        return self

    def param_groups(self):
        return _param_groups(self.student)

    def before_step(self, step, optimizer):
        self.step_now = step
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = float(self.lr_s[step])
            if i == 0:  # the regularised group; biases and norms keep weight decay 0
                group["weight_decay"] = float(self.wd_s[step])

    def forward(self, batch, g):
        x = batch["x"].permute(0, 3, 1, 2).float().div_(255.0)
        views = self.crops(x, g)
        with torch.no_grad():
            t_out = self.teacher(views[:2])
        self._t_out = t_out.detach()
        return self.loss_fn(self.student(views), t_out, self.epoch(self.step_now))

    def before_optimizer_step(self, step):
        if self.epoch(step) < self.cfg.freeze_last_layer_epochs:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_step(self, step):
        m = float(self.mom_s[step])
        tp, sp = list(self.teacher.parameters()), [p.detach() for p in self.student.parameters()]
        torch._foreach_mul_(tp, m)
        torch._foreach_add_(tp, sp, alpha=1 - m)

    def log_values(self, step, loss):
        epoch = self.epoch(step)
        with torch.no_grad():
            stats = collapse_stats(self.loss_fn.teacher_probs(self._t_out.float(), epoch))
        problems = self.monitor.check(loss, stats, epoch)
        if problems:
            self.collapse.append({"step": step, "problems": problems})
        return {"epoch": epoch, "wd": float(self.wd_s[step]), "momentum": float(self.mom_s[step]), **stats}

    def get_extra_state(self):  # the collapse record travels in the checkpoints
        return {"collapse": self.collapse, "warned": self.monitor.warned}

    def set_extra_state(self, state):
        self.collapse, self.monitor.warned = list(state["collapse"]), bool(state["warned"])


def world_size() -> int:
    """Processes of this run (``accelerate launch`` and torchrun set WORLD_SIZE), known before the loop
    starts: DINO's batch size is per process, so steps per epoch and the lr scaling depend on it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def loop_settings(cfg: Dino, steps: int) -> Loop:
    """The training-loop settings of a DINO run: its own schedules (``DinoTask``), no diffusers EMA."""
    return Loop(steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, lr_schedule="constant", warmup_steps=0,
                grad_accum=1, clip_grad=cfg.clip_grad or None, weight_decay=cfg.weight_decay, ema_decay=None,
                mixed_precision=cfg.mixed_precision, use_8bit_adam=False, gradient_checkpointing=False,
                compile=False, channels_last=False, measure_flops=True, checkpoint_every=cfg.checkpoint_every,
                keep_checkpoints=2, sample_every=0, log_every=cfg.log_every)


def check_images(images, what: str = "DINO training images") -> None:
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    if len(images) < 2:
        raise ValueError(f"{what}: {len(images)} image(s); DINO needs at least 2 (one batch of 2)")


def train_dino(images: np.ndarray, cfg: Dino, out_dir: Path, seed: int, device: str = "cpu",
               plots_csv: Path | None = None, progress=None, *, second: np.ndarray | None = None,
               ratio: float = 0.0, steps_per_epoch: int | None = None, evaluate=None, run_hash: str | None = None,
               name: str = "dino") -> dict:
    """Train DINO on uint8 [N,H,W,3] images through ``training.train_loop`` (resumes from
    ``out_dir/checkpoint-*`` when the params match). With ``second`` (e.g. synthetic images) each batch
    takes a share ``ratio`` from it (``MixedStream``). ``steps_per_epoch`` (default: one pass over
    ``images``) sets the length of an epoch of the recipe, so regimes of different data sizes get the same
    budget; ``evaluate(task) -> dict`` runs once per epoch. Returns the teacher backbone (eval), the
    student, teacher, loss and crops, the per-log-step history, the evaluations and the collapse record."""
    check_images(images)
    second = np.zeros((0, *images.shape[1:]), np.uint8) if second is None else second
    if len(second):
        check_images(second, "DINO second image set")
        if second.shape[1:] != images.shape[1:]:
            raise ValueError(f"the second image set has images of {list(second.shape[1:])}, the first of "
                             f"{list(images.shape[1:])}: both must have the same size")
    world = world_size()
    global_batch = cfg.batch_size * world
    n = len(images) + len(second)
    if global_batch > n:
        raise ValueError(f"dino.batch_size {cfg.batch_size} (x {world} processes) is larger than the {n} training images")
    steps_per_epoch = steps_per_epoch or len(images) // global_batch
    if steps_per_epoch < 1:
        raise ValueError(f"an epoch of {len(images)} images at batch {global_batch} has no step")
    size = images.shape[1]
    torch.manual_seed(seed)
    task = DinoTask(cfg, size, steps_per_epoch, world)
    batches = MixedStream(len(images), len(second), ratio, global_batch, seed)
    run_hash = run_hash or params_hash({"dino": cfg.model_dump(mode="json"), "seed": seed, "n": len(images),
                                        "second": len(second), "ratio": ratio, "size": size,
                                        "steps_per_epoch": steps_per_epoch, "world": world})
    data = {"x": torch.from_numpy(np.concatenate([images, second]) if len(second) else images)}
    out = train_loop(task, data, loop_settings(cfg, task.total_steps), Path(out_dir), run_hash, seed, device,
                     log_csv=plots_csv, name=name, batches=batches, evaluate=evaluate,
                     eval_every=steps_per_epoch if evaluate else 0)
    t = out["model"]
    return {"backbone": t.teacher.backbone.eval(), "student": t.student.eval(), "teacher": t.teacher.eval(),
            "loss_fn": t.loss_fn, "crops": t.crops, "history": out["history"], "evals": out["evals"],
            "collapse": t.collapse, "steps": task.total_steps, "images_seen": out["images_seen"],
            "images_per_s": out["images_per_s"], "train_seconds": out["train_seconds"], "speed": out["speed"],
            "max_entropy": math.log(cfg.out_dim)}
