"""The guided_sampling stage: resumable, sharded synthetic datasets in the study's image-set format.

Every image has its own seed (``derive_seed(seed, "guided_sampling", index)``, the same index -> the
same seed in every mode, so grids compare modes on equal noise). Images are generated in shards of
``shard_size``; a shard is written atomically to ``checkpoints/guided_sampling/<run>/<mode>/``, so a
killed run continues with the first missing shard, and because an image depends only on its seed,
sharded output equals unsharded output. With several processes, shard i is made by process i mod N:

    accelerate launch -m pathsynth.diffusion.sampling     # several GPUs (torchrun works for CPU processes)
    dvc repro guided_sampling                             # finds every shard made, merges, measures

The shards are merged into ``data/guided_sampling/<mode>.h5`` (evaluation sets) and
``data/guided_sampling/pretrain/<mode>.h5`` (the dino_pretrain stage's training sets: the same models
and modes, their own counts and seeds) at the end.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..data.dataset import DataError, ImageSet, read_imageset, write_imageset
from ..prototypes.prompts import baseline_prompt, mep_prompt
from ..runtime import derive_seed, log_reused
from . import guidance

MODE_SPEC = {  # mode -> (model variant, prompt kind, classifier-free guidance?, classifier guidance?)
    "unguided": ("mep", "empty", False, False),
    "cfg_baseline": ("baseline", "baseline", True, False),
    "cfg_mep": ("mep", "mep", True, False),
    "classifier": ("mep", "empty", False, True),
    "cfg_mep_classifier": ("mep", "mep", True, True),
}


@dataclass
class Request:
    """What is asked of each image of a mode: label, prototype, prompt, seed."""

    label: np.ndarray
    prototype: np.ndarray
    seed: np.ndarray


def allocate(table: pd.DataFrame, n: int, allocation: str, balance_labels: bool, seed: int,
             purpose: str = "guided_sampling") -> Request:
    """Requested (label, prototype) per image, over the (label, prototype) pairs present in the diffusion
    training set (``table``: prompts_train.csv rows of the prompt-balanced subset), so every MEP prompt is
    one the model was trained on, and label and prototype are not tied to each other.

    uniform:      each label's prototypes in turn (with ``balance_labels``: labels alternate, so each
                  label gets half); without it, every pair in turn;
    proportional: prototypes drawn with their frequency among that label's training images (with
                  ``balance_labels``), or pairs drawn with their frequency (without).

    ``purpose`` keys the per-image seeds: the evaluation sets ("guided_sampling") and the pretraining
    sets ("guided_sampling_pretrain") share no seed, so no image is in both.
    """
    if n <= 0:
        raise ValueError(f"guided_sampling.n_per_mode must be > 0, got {n}")
    counts = table.groupby(["label", "prototype"]).size().sort_index()
    pairs = np.array(counts.index.tolist(), dtype=np.int64)  # [P, 2] (label, prototype), sorted
    freq = counts.to_numpy(float)
    rng = np.random.default_rng(derive_seed(seed, "allocation") if purpose == "guided_sampling"
                                else derive_seed(seed, purpose, "allocation"))
    if balance_labels:
        labels = np.unique(pairs[:, 0])
        label = labels[np.arange(n) % len(labels)]
        proto = np.empty(n, np.int64)
        for c in labels:
            rows = np.flatnonzero(label == c)
            own = pairs[:, 0] == c
            if allocation == "uniform":
                proto[rows] = pairs[own, 1][np.arange(len(rows)) % own.sum()]
            else:
                proto[rows] = rng.choice(pairs[own, 1], len(rows), p=freq[own] / freq[own].sum())
    else:
        pick = (np.arange(n) % len(pairs) if allocation == "uniform"
                else rng.choice(len(pairs), n, p=freq / freq.sum()))
        label, proto = pairs[pick, 0], pairs[pick, 1]
    seeds = np.array([derive_seed(seed, purpose, i) for i in range(n)], dtype=np.int64)
    return Request(label.astype(np.int64), proto.astype(np.int64), seeds)


def chance_hit_rate(requested: np.ndarray, real_prototypes: np.ndarray) -> float:
    """The requested-prototype hit rate of a generator that ignores the request and makes prototypes with
    their real frequency q: sum_k a_k q_k, a_k the share of requests for k. 1/K for a uniform request over
    all K prototypes; sum_k q_k^2 for a proportional one; other values when only some are requested."""
    k = int(max(requested.max(), real_prototypes.max())) + 1
    a = np.bincount(requested, minlength=k) / len(requested)
    q = np.bincount(real_prototypes, minlength=k) / len(real_prototypes)
    return float(a @ q)


def prompts_for(mode: str, req: Request, known: set[str]) -> list[str]:
    kind = MODE_SPEC[mode][1]
    if kind == "empty":
        return [""] * len(req.label)
    ps = [baseline_prompt(y) if kind == "baseline" else mep_prompt(y, k) for y, k in zip(req.label, req.prototype)]
    unknown = sorted(set(ps) - known)
    if unknown:
        raise DataError(f"guided_sampling: prompt '{unknown[0]}' was not in the training prompts of the model")
    return ps


def jpeg_roundtrip(x: np.ndarray, quality: int) -> np.ndarray:
    out = np.empty_like(x)
    for i, img in enumerate(x):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality, subsampling=2)  # 4:2:0 as pcam_ai4all
        out[i] = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def generate_mode(mode: str, req: Request, models_: dict, gp, run_dir: Path, device: str = "cpu",
                  process_index: int = 0, num_processes: int = 1, progress=None) -> dict:
    """Generate (or resume) every shard of one mode that belongs to this process; returns timing."""
    variant, _, use_cfg, use_clf = MODE_SPEC[mode]
    m = models_[variant]
    prompts = prompts_for(mode, req, m["prompts"])
    n, S = len(req.label), gp.shard_size
    shards = list(range(process_index, (n + S - 1) // S, num_processes))
    folder = run_dir / mode
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{process_index}"  # one per process: several share the folder
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DataError(f"{folder}: output folder cannot be written ({err.strerror or err})") from None
    made, reused, t_gen = 0, 0, 0.0
    for sh in (progress(shards, desc=f"{mode} shards", unit="shard") if progress else shards):
        path = folder / f"shard-{sh:05d}.h5"
        lo, hi = sh * S, min(n, (sh + 1) * S)
        key = shard_key(mode, req, lo, hi, gp, models_)
        if path.exists() and shard_matches(path, key):  # written atomically: complete, and made the same way
            reused += 1
            continue
        xs = []
        t0 = time.perf_counter()
        for b in range(lo, hi, gp.batch_size):
            e = min(hi, b + gp.batch_size)
            sched = guidance.make_scheduler(gp.sampler, m["train_scheduler_config"])
            z = guidance.sample_latents(m["unet"], m["text_encoder"], m["tokenizer"], sched, prompts[b:e],
                                        req.seed[b:e], gp.steps, gp.cfg_scale if use_cfg else 1.0,
                                        models_.get("classifier") if use_clf else None,
                                        req.prototype[b:e] if use_clf else None,
                                        gp.classifier_scale if use_clf else 0.0, device)
            xs.append(guidance.decode(m["vae"], z))
        t_gen += time.perf_counter() - t0
        x = np.concatenate(xs)
        if gp.jpeg_quality:
            x = jpeg_roundtrip(x, gp.jpeg_quality)
        meta = {"index": np.arange(lo, hi), "prompt": np.array(prompts[lo:hi], dtype=object).astype(str),
                "prototype": req.prototype[lo:hi], "seed": req.seed[lo:hi],
                "guidance_mode": np.array([mode] * (hi - lo)),
                "cfg_scale": np.full(hi - lo, gp.cfg_scale if use_cfg else 1.0),
                "classifier_scale": np.full(hi - lo, gp.classifier_scale if use_clf else 0.0),
                "sampler": np.array([gp.sampler] * (hi - lo)), "steps": np.full(hi - lo, gp.steps),
                "jpeg_quality": np.full(hi - lo, gp.jpeg_quality or 0), "model_variant": np.array([variant] * (hi - lo))}
        write_imageset(path, ImageSet(x, req.label[lo:hi], meta, {"source": "synthetic", "mode": mode, "shard": sh,
                                                                   "key": key}))
        made += hi - lo
    if reused:
        log_reused(mode, folder, f"{reused} of {len(shards)} shards")
    return {"images_made": made, "seconds": t_gen}


def model_digest(folder: Path) -> str:
    """sha256 of a model folder's files (names and bytes): the same model gives the same digest after a
    fresh clone, `dvc checkout` or `dvc pull`, which change file times but not contents."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted(q for q in Path(folder).rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def shard_key(mode: str, req: Request, lo: int, hi: int, gp, models_: dict) -> str:
    """What decides the images of shard [lo, hi) of a mode: the content of the models it uses, its own
    sampling settings, and the request (label, prototype, seed) of each of its images. Other modes, the
    number of images and settings the mode does not use are not part of it, so adding a mode or images
    keeps every finished shard."""
    from ..training import params_hash

    variant, _, use_cfg, use_clf = MODE_SPEC[mode]
    return params_hash({
        "mode": mode, "model": models_[variant]["digest"],
        "classifier": models_["classifier_digest"] if use_clf else None,
        "sampler": gp.sampler, "steps": gp.steps, "batch_size": gp.batch_size, "jpeg_quality": gp.jpeg_quality,
        "cfg_scale": gp.cfg_scale if use_cfg else None, "classifier_scale": gp.classifier_scale if use_clf else None,
        "label": req.label[lo:hi].tolist(), "prototype": req.prototype[lo:hi].tolist(), "seed": req.seed[lo:hi].tolist()})


def shard_matches(path: Path, key: str) -> bool:
    import h5py

    with h5py.File(path, "r") as f:
        return f.attrs.get("key") == json.dumps(key)


def shard_dir(root: Path) -> Path:
    """Where the shards live; each shard carries its own key (``shard_key``), checked before reuse."""
    return root / "checkpoints" / "guided_sampling"


def shard_keys(mode: str, req: Request, gp, models_: dict) -> list[str]:
    n, S = len(req.label), gp.shard_size
    return [shard_key(mode, req, lo, min(n, lo + S), gp, models_) for lo in range(0, n, S)]


def merge_mode(mode: str, n: int, shard_size: int, run_dir: Path, out_path: Path, keys: list[str] | None = None) -> ImageSet:
    """One image set from the shards of a mode; with ``keys`` (``shard_keys``), every shard must have been
    made for exactly this request and these settings."""
    parts = []
    for sh in range((n + shard_size - 1) // shard_size):
        p = run_dir / mode / f"shard-{sh:05d}.h5"
        if not p.exists():
            raise DataError(f"{p}: shard missing; rerun the stage to generate it")
        if keys is not None and not shard_matches(p, keys[sh]):
            raise DataError(f"{p}: made with other models, settings or requests; rerun the stage to remake it")
        parts.append(read_imageset(p))
    ds = ImageSet(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]),
                  {k: np.concatenate([p.meta[k] for p in parts]) for k in parts[0].meta},
                  {"source": "synthetic", "mode": mode})
    if len(ds) != n or not (ds.meta["index"] == np.arange(n)).all():
        raise DataError(f"{run_dir / mode}: shards do not add up to images 0..{n - 1}")
    write_imageset(out_path, ds)
    return ds


def load_models(model_root: Path, variants: set[str], device: str) -> dict:
    """The ldm_finetune outputs: each variant's pipeline parts (plain diffusers), the classifier."""
    from diffusers import StableDiffusionPipeline

    from .classifier import NoisyLatentClassifier

    out = {}
    for v in variants:
        folder = model_root / v
        if not (folder / "model_index.json").is_file():
            raise DataError(f"{folder}: no '{v}' model (run the ldm_finetune stage with variant '{v}')")
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        pfile = folder / "training_prompts.json"
        if not pfile.is_file():
            raise DataError(f"{pfile}: missing (the prompts the model was trained on; rerun ldm_finetune)")
        out[v] = {"prompts": set(json.loads(pfile.read_text())) | {""}, "digest": model_digest(folder), "unet": pipe.unet.to(device).eval(), "text_encoder": pipe.text_encoder.to(device).eval(),
                  "tokenizer": pipe.tokenizer, "vae": pipe.vae.to(device).eval(),
                  "train_scheduler_config": pipe.scheduler.config}
    cpath = model_root / "prototype_classifier"
    if cpath.is_dir():
        out["classifier"] = NoisyLatentClassifier.from_pretrained(cpath).to(device).eval()
        out["classifier_digest"] = model_digest(cpath)
    return out


def check_mode(models_: dict, mode: str, req: Request) -> None:
    """Before any compute: the prompts of the mode must be ones its model was trained on (a model folder
    from another variant fails here), and classifier guidance needs the classifier."""
    prompts_for(mode, req, models_[MODE_SPEC[mode][0]]["prompts"])
    if MODE_SPEC[mode][3] and "classifier" not in models_:
        raise DataError(f"models/ldm_finetune/prototype_classifier is missing: mode '{mode}' needs the "
                        "noise-aware prototype classifier")


@dataclass
class Plan:
    """What the guided_sampling stage makes: the evaluation sets (``req`` for every mode of ``modes``)
    and the pretraining sets for dino_pretrain (``pretrain_req`` for ``pretrain.modes``), apart."""

    table: pd.DataFrame
    req: Request
    pretrain_req: Request | None
    models: dict
    run_dir: Path

    def jobs(self, gp) -> list[tuple[str, Request, Path, int]]:
        """(mode, request, shard folder, images) of every set, evaluation sets first."""
        out = [(m, self.req, self.run_dir, gp.n_per_mode) for m in gp.modes]
        if self.pretrain_req is not None:
            out += [(m, self.pretrain_req, self.run_dir / "pretrain", gp.pretrain.n_per_mode) for m in gp.pretrain.modes]
        return out


def plan(root: Path, params, device: str) -> Plan:
    """What the guided_sampling stage makes, checked before any compute: the prompt table (train split),
    the request per image of the evaluation and pretraining sets, the models of every mode and the shard
    folder of this run."""
    gp = params.guided_sampling
    table = pd.read_csv(root / "data" / "prototypes" / "prompts_train.csv")
    all_modes = list(gp.modes) + [m for m in gp.pretrain.modes if m not in gp.modes]
    models_ = load_models(root / "models" / "ldm_finetune", {MODE_SPEC[m][0] for m in all_modes}, device)
    train = table[table.in_balanced_subset]
    req = allocate(train, gp.n_per_mode, gp.allocation, gp.balance_labels, params.seed)
    pre = (allocate(train, gp.pretrain.n_per_mode, gp.allocation, gp.balance_labels, params.seed,
                    purpose="guided_sampling_pretrain") if gp.pretrain.modes else None)
    for mode in gp.modes:
        check_mode(models_, mode, req)  # every prompt known to its model, classifier present
    for mode in gp.pretrain.modes:
        check_mode(models_, mode, pre)
    return Plan(table, req, pre, models_, shard_dir(root))


def main() -> int:
    """Make this process's share of the shards of every mode (``accelerate launch -m pathsynth.diffusion.sampling``)."""
    from accelerate import PartialState

    from ..runtime import progress, start_stage

    ctx = start_stage("guided_sampling")
    state = PartialState(cpu=ctx.device == "cpu")  # cpu=True: CPU processes under torchrun form a gloo group
    device = "cpu" if ctx.device == "cpu" else str(state.device)
    p = plan(ctx.root, ctx.params, device)
    for mode, req, folder, _ in p.jobs(ctx.params.guided_sampling):
        t = generate_mode(mode, req, p.models, ctx.params.guided_sampling, folder, device, state.process_index,
                          state.num_processes, progress=progress)
        print(f"process {state.process_index}/{state.num_processes} {folder.name}/{mode}: {t['images_made']} "
              f"images made in {t['seconds']:.1f} s", flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"shards in {p.run_dir}; `dvc repro guided_sampling` merges them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
