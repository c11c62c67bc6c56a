"""What every training loop of the study shares: checkpoints that rotate and resume, a guard that
refuses to resume under changed params, a stop on non-finite loss, and CSV logs for `dvc plots`.

Checkpoints are folders ``checkpoint-<step>/`` holding ``state.pt`` (models, optimisers, step,
random states) and ``params.json`` with the hash of the params that produced them. They are written
to a temporary folder and renamed, so a kill mid-save never leaves a checkpoint that looks complete.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch


class TrainingError(RuntimeError):
    pass


# when the loop logs, saves or draws samples, and how it executes (compiled, memory layout, FLOP count),
# not what it learns: left out of run hashes, so changing them does not invalidate finished checkpoints
CADENCE = frozenset({"log_every", "checkpoint_every", "keep_checkpoints", "sample_every",
                     "compile", "channels_last", "measure_flops"})


def _without_cadence(data):
    if isinstance(data, dict):
        return {k: _without_cadence(v) for k, v in data.items() if k not in CADENCE}
    return data


def params_hash(obj) -> str:
    """Stable hash of the settings that define a run (a pydantic model or a JSON-able dict), at any
    depth without the loop's cadence settings (``CADENCE``)."""
    data = obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj
    return hashlib.sha256(json.dumps(_without_cadence(data), sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


class Checkpoints:
    def __init__(self, folder: Path, run_hash: str, keep: int = 2):
        self.folder, self.hash, self.keep = Path(folder), run_hash, keep

    def list(self) -> list[Path]:
        found = [p for p in self.folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

    def latest(self) -> Path | None:
        """The latest complete checkpoint, after checking it was made with the same params."""
        ckpts = self.list()
        if not ckpts:
            return None
        last = ckpts[-1]
        meta = json.loads((last / "params.json").read_text())
        if meta.get("params_hash") != self.hash:
            raise TrainingError(
                f"{last}: made with different params (hash {meta.get('params_hash')}, now {self.hash}); "
                f"refusing to resume. Delete {self.folder} to start over with the new params.")
        return last

    def save(self, step: int, state: dict, extra: dict | None = None) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"checkpoint-{step}"
        tmp = self.folder / f".tmp-checkpoint-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")
        (tmp / "params.json").write_text(json.dumps({"params_hash": self.hash, "step": step, **(extra or {})}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self.list()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(path: Path) -> dict:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def check_finite(loss: float, step: int, last_good: Path | None) -> None:
    if not math.isfinite(loss) or abs(loss) > 1e6:
        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
        raise TrainingError(f"loss became {loss} at step {step}; training stopped ({where}). "
                            "Lower the learning rate or check the data.")


class CSVLog:
    """One row per logged step. The rows also travel in the checkpoints (``rows``), so a resumed run
    rewrites the whole file even where the file itself is gone (DVC deletes a stage's outputs before
    rerunning it). Without saved rows, rows of the file past the resumed step are dropped."""

    def __init__(self, path: Path, fields: list[str], resume_step: int = 0, rows: list[dict] | None = None):
        self.path, self.fields = Path(path), fields
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if rows is None:
            rows = []
            if resume_step and self.path.is_file():
                with open(self.path) as f:
                    rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= resume_step]
        self.rows = [{k: r.get(k) for k in fields} for r in rows]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(self.rows)

    def write(self, **row) -> None:
        self.rows.append({k: row.get(k) for k in self.fields})
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow(self.rows[-1])


# ============================================================================ THE training loop
class Task(torch.nn.Module):
    """A model as the loop sees it: an nn.Module whose ``forward(batch, generator)`` returns the loss
    (so several processes sync through accelerate's DDP wrapper), holding its trainable modules
    (kept in fp32). Frozen parts are held outside the module tree and placed by ``prepare(device,
    dtype)`` (cast to the mixed-precision dtype, as in the diffusers examples). ``compile_targets()``
    names the modules ``torch.compile`` should compile in place with ``compile: true`` (the forward
    itself draws from seeded generators, which the compiler would break the graph on)."""

    # hooks for recipes that schedule more than the lr (DINO: weight decay, teacher momentum), update
    # more than the optimiser does (an EMA teacher) or log more than the loss; the defaults do nothing
    owns_schedule = False  # True: before_step sets lr (and more) itself; the loop's lr scheduler is off
    log_fields: tuple[str, ...] = ()  # extra CSV columns, filled by log_values at every log step

    def prepare(self, device, dtype) -> None:
        pass

    def compile_targets(self) -> list[torch.nn.Module]:
        return []

    def param_groups(self) -> list[dict] | None:
        """Optimiser parameter groups (e.g. no weight decay on biases and norms); None: one group."""
        return None

    def before_step(self, step: int, optimizer) -> None:
        """Before the step's forward passes (0-based step)."""

    def before_optimizer_step(self, step: int) -> None:
        """After backward and gradient clipping, before ``optimizer.step()``."""

    def after_step(self, step: int) -> None:
        """After ``optimizer.step()``."""

    def log_values(self, step: int, loss: float) -> dict:
        """The ``log_fields`` values at a log step (``loss``: the mean since the last log step)."""
        return {}


# dense bf16/fp16 tensor-core peaks from the vendors' data sheets (SXM parts), for model FLOP utilisation
PEAK_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device) -> tuple[str, float | None]:
    """The device's name and its dense half-precision peak (None where the table does not know it)."""
    if torch.device(device).type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def step_flops(task: Task, batch: dict, g: torch.Generator) -> int:
    """Model FLOPs of one forward and backward pass of ``task`` on ``batch``, counted by
    ``torch.utils.flop_counter`` (matrix products and convolutions; the usual MFU numerator). The
    gradients it makes are cleared again."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        task(batch, g).backward()
    for p in task.parameters():
        p.grad = None
    return int(counter.get_total_flops())


class MixedStream:
    """Global batches that take a share ``ratio`` of their images from the second part of the data
    (items ``n_first .. n_first + n_second - 1``) and the rest from the first part, for hybrid training
    (first: real, second: synthetic). Each part is read in its own seeded epochs (a permutation per pass,
    no image twice before every image was used once). The split of each batch is Bresenham's: the
    second part's count up to draw d is floor(d * ratio * batch), so the share over any run of draws is
    ``ratio`` to within one image, and any draw can be recomputed after a resume without replaying the
    draws before it. ``ratio`` 0 or 1 reads one part only."""

    def __init__(self, n_first: int, n_second: int, ratio: float, global_batch: int, seed: int):
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"mixing ratio must be in [0, 1], got {ratio}")
        if ratio < 1 and n_first < 1 or ratio > 0 and n_second < 1:
            raise ValueError(f"mixing ratio {ratio} needs images in both parts (got {n_first} and {n_second})")
        self.n = (n_first, n_second)
        self.ratio, self.gb, self.seed = ratio, global_batch, seed
        self._perm: dict = {}

    def _second_before(self, draw: int) -> int:
        return math.floor(draw * self.ratio * self.gb + 1e-9)

    def _take(self, part: int, start: int, count: int) -> torch.Tensor:
        n = self.n[part]
        out = []
        for pos in range(start, start + count):
            epoch, i = divmod(pos, n)
            key = (part, epoch)
            if key not in self._perm:
                if len(self._perm) > 8:
                    self._perm.clear()
                g = torch.Generator().manual_seed(self.seed * 7919 + epoch * 2 + part)
                self._perm[key] = torch.randperm(n, generator=g)
            out.append(int(self._perm[key][i]))
        return torch.tensor(out, dtype=torch.long) + (self.n[0] if part else 0)

    def __call__(self, draw: int) -> torch.Tensor:
        s0, s1 = self._second_before(draw), self._second_before(draw + 1)
        k = s1 - s0  # images from the second part in this batch
        first = self._take(0, draw * self.gb - s0, self.gb - k) if k < self.gb else torch.empty(0, dtype=torch.long)
        second = self._take(1, s0, k) if k else torch.empty(0, dtype=torch.long)
        return torch.cat([first, second])


class _BatchStream:
    """Indices of the ``draw``-th global batch: epochs are seeded permutations (drop_last), so any
    position of the stream can be recomputed after a resume. One permutation per epoch, cached."""

    def __init__(self, n: int, global_batch: int, seed: int):
        self.n, self.gb, self.seed, self.epoch, self.perm = n, global_batch, seed, None, None

    def __call__(self, draw: int) -> torch.Tensor:
        epoch, b = divmod(draw, self.n // self.gb)
        if epoch != self.epoch:
            self.epoch = epoch
            self.perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        return self.perm[b * self.gb:(b + 1) * self.gb]


def _optimizer(params, cfg, fused: bool = False):
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("use_8bit_adam: true needs bitsandbytes (pip install bitsandbytes; CUDA only)") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # fused: one kernel for the whole update on a GPU; on the CPU the default (foreach) keeps runs bit-exact
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **({"fused": True} if fused else {}))


def train_loop(task: Task, data: dict, cfg, out_dir: Path, run_hash: str, seed: int, device: str = "cpu",
               log_csv: Path | None = None, name: str = "train", on_sample=None, batches=None,
               evaluate=None, eval_every: int = 0) -> dict:
    """Train ``task`` on ``data`` (a dict of equally long CPU tensors) for ``cfg.steps`` optimiser steps.

    accelerate places the model and data, runs mixed precision and several processes
    (``accelerate launch``); EMA (diffusers EMAModel, with warm-up) is swapped in for samples and
    is what the returned model holds; checkpoints ``checkpoint-<step>`` rotate and the latest is
    resumed, unless it was made with other params; a non-finite loss stops with a clear message.

    ``batches(draw)`` gives the indices of the draw-th global batch (default: seeded epochs over all
    items; ``MixedStream`` for hybrid data). ``evaluate(model) -> dict`` runs before the first step,
    every ``eval_every`` steps and at the end; its results (with step and images seen) travel in the
    checkpoints and come back as ``evals``."""
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from .runtime import RateLogger, log

    n = len(next(iter(data.values())))
    acc = Accelerator(mixed_precision=cfg.mixed_precision, cpu=(device == "cpu"),
                      gradient_accumulation_steps=cfg.grad_accum)
    on_gpu = acc.device.type == "cuda"
    global_batch = cfg.batch_size * acc.num_processes
    if global_batch > n:
        raise TrainingError(f"{name}: batch size {global_batch} is larger than the {n} training items")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision, torch.float32)
    model = task
    if cfg.gradient_checkpointing:
        for m in model.modules():
            if m is not model and hasattr(m, "enable_gradient_checkpointing"):
                m.enable_gradient_checkpointing()
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _optimizer(task.param_groups() or params, cfg, fused=on_gpu)
    sched = None if task.owns_schedule else get_scheduler(cfg.lr_schedule, opt, num_warmup_steps=cfg.warmup_steps,
                                                          num_training_steps=cfg.steps)
    ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, foreach=True) if cfg.ema_decay else None

    ckpt = Checkpoints(out_dir, run_hash, keep=cfg.keep_checkpoints)
    start, history, log_rows, evals, seconds_before = 0, [], None, [], 0.0
    last = ckpt.latest()
    if last is not None:
        st = Checkpoints.load(last)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        if sched is not None:
            sched.load_state_dict(st["sched"])
        if ema is not None:
            ema.load_state_dict(st["ema"])
        set_rng_state(st["rng"])
        start, history, log_rows, evals = st["step"], st["history"], st.get("log_rows"), st.get("evals", [])
        seconds_before = st.get("train_seconds", 0.0)  # training time of the runs before this resume
        log.info(f"{name}: resumed from {last} (step {start}/{cfg.steps})")
    model, opt = acc.prepare(model, opt)
    task.prepare(acc.device, weight_dtype)
    if ema is not None:
        ema.to(acc.device)
    if on_gpu:  # the training tensors live on the GPU: no host copy per step
        data = {k: v.to(acc.device) for k, v in data.items()}
    flops = None
    if on_gpu and cfg.measure_flops:
        probe = {k: v[:cfg.batch_size] for k, v in data.items()}
        with acc.autocast():
            flops = step_flops(task, probe, torch.Generator(device=acc.device).manual_seed(seed))
        flops *= cfg.grad_accum  # per optimiser step and process
    if cfg.compile:
        for m in task.compile_targets():
            m.compile()
    csv_log = CSVLog(log_csv, ["step", "loss", "lr", "images_per_s", *task.log_fields], resume_step=start,
                     rows=log_rows) if log_csv else None
    rate = RateLogger(cfg.steps, name)
    train_time, images_done, window = 0.0, 0, []
    batches = batches or _BatchStream(n, global_batch, seed)
    import time

    def run_eval(done):
        was_training = model.training
        model.eval()
        with torch.no_grad():
            result = evaluate(acc.unwrap_model(model))
        model.train(was_training)
        evals.append({"step": done, "images_seen": done * global_batch * cfg.grad_accum, **result})

    if evaluate is not None and start == 0:
        run_eval(0)

    def finite_check(values, step):  # values: the step losses since the last check (floats or device scalars)
        for v in values:
            v = float(v)
            if not math.isfinite(v) or abs(v) > 1e6:
                check_finite(v, step, ckpt.list()[-1] if ckpt.list() else None)

    marks = []  # (step, training seconds so far) at every log step, where the GPU queue is synced
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        model.train()
        task.before_step(step, opt)
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            draw = step * cfg.grad_accum + micro
            idx = batches(draw)[acc.process_index::acc.num_processes]
            batch = {k: v[idx.to(v.device)] for k, v in data.items()}
            g = torch.Generator(device=acc.device).manual_seed(seed * 100003 + draw * 31 + acc.process_index)
            # accelerate's accumulate: gradients sync across processes only on the last micro-batch, and
            # acc.backward divides the loss by grad_accum, so k batches of n give the gradient of one of k*n
            with acc.accumulate(model):
                with acc.autocast():
                    loss = model(batch, g)
                acc.backward(loss)
            # on a GPU the loss stays on the device (no sync per step); it is checked at every log step
            lv = loss.detach().float() if on_gpu else float(loss.detach())
            if not on_gpu:
                finite_check([lv], step)
            loss_sum += lv / cfg.grad_accum
        if cfg.clip_grad:
            acc.clip_grad_norm_(params, cfg.clip_grad)
        task.before_optimizer_step(step)
        lr_now = opt.param_groups[0]["lr"]
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad(set_to_none=True)
        task.after_step(step)
        if ema is not None:
            ema.step(params)
        images_done += global_batch * cfg.grad_accum
        window.append(loss_sum)
        done = step + 1
        logging_now = done % cfg.log_every == 0 or done == cfg.steps
        saving_now = done % cfg.checkpoint_every == 0 or done == cfg.steps
        if on_gpu and (logging_now or saving_now):
            window = [float(v) for v in window]  # the one sync of the window
            finite_check(window, step)
        train_time += time.perf_counter() - t0
        if logging_now:
            marks.append((done, train_time))
            ips = images_done / train_time
            entry = {"step": done, "loss": float(np.mean(window)), "lr": lr_now, "images_per_s": ips}
            entry.update(task.log_values(step, entry["loss"]))
            history.append(entry)
            window = []
            if csv_log and acc.is_main_process:
                csv_log.write(**entry)
            rate(done, images_done, loss=entry["loss"], lr=entry["lr"])
            # the rate logger's own clock includes checkpoints and samples; images_per_s does not
        if on_sample and cfg.sample_every and done % cfg.sample_every == 0 and acc.is_main_process:
            # eager: sample grids have other shapes, and recompiling for them cost 71 s on an H100
            with torch.compiler.set_stance("force_eager"):
                _with_ema(ema, params, lambda: on_sample(done, acc.unwrap_model(model)))
        if evaluate is not None and (eval_every and done % eval_every == 0 or done == cfg.steps):
            run_eval(done)
        if saving_now and acc.is_main_process:
            ckpt.save(done, {"model": acc.unwrap_model(model).state_dict(), "opt": opt.state_dict(),
                             "sched": sched.state_dict() if sched is not None else None,
                             "ema": ema.state_dict() if ema is not None else None,
                             "rng": rng_state(), "step": done, "history": history, "evals": evals,
                             "train_seconds": seconds_before + train_time,
                             "log_rows": csv_log.rows if csv_log else None})
        acc.wait_for_everyone()
    final = acc.unwrap_model(model)
    for m in task.compile_targets():  # what is returned runs eagerly (grids, saving, sampling)
        if getattr(m, "_compiled_call_impl", None) is not None:
            m._compiled_call_impl = None
    if ema is not None:
        ema.copy_to(params)  # the returned (and saved) weights are the EMA weights
    final.eval()
    # steady state: from the first log step past 10% of the run (compilation and warm-up done) to the end
    later = [m for m in marks if m[0] >= start + 0.1 * (cfg.steps - start)]
    steady = (later[-1][1] - later[0][1]) / (later[-1][0] - later[0][0]) if len(later) >= 2 else None
    device_name, peak = peak_flops(acc.device)
    speed = {"device_name": device_name, "seconds_per_step": steady,
             "steady_images_per_s": global_batch * cfg.grad_accum / steady if steady else None,
             "model_flops_per_step": flops, "peak_flops": peak,
             "mfu": flops * acc.num_processes / steady / (peak * acc.num_processes) if flops and steady and peak else None}
    if speed["mfu"] is not None:
        log.info(f"{name}: {steady * 1e3:.1f} ms/step, {speed['steady_images_per_s']:.0f} img/s, "
                 f"{flops / steady / 1e12:.1f} TFLOP/s per process = MFU {speed['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s ({device_name})")
    return {"model": final, "history": history, "evals": evals, "steps": cfg.steps, "resumed_from": start,
            "images_seen": cfg.steps * global_batch * cfg.grad_accum,
            "images_per_s": images_done / train_time if train_time else None, "accelerator": acc, "speed": speed,
            "train_seconds": seconds_before + train_time}  # over every run that made these weights


def _with_ema(ema, params, fn):
    if ema is None:
        return fn()
    ema.store(params)
    ema.copy_to(params)
    try:
        return fn()
    finally:
        ema.restore(params)
