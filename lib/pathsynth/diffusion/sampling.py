"""The guided_sampling stage: resumable, sharded synthetic datasets in the study's image-set format.

Every image has its own seed (``derive_seed(seed, "guided_sampling", index)``, the same index -> the
same seed in every mode, so grids compare modes on equal noise). Images are generated in shards of
``shard_size``; a shard is written atomically to ``checkpoints/guided_sampling/<run>/<mode>/``, so a
killed run continues with the first missing shard, and because an image depends only on its seed,
sharded output equals unsharded output. With several processes, shard i is made by process i mod N:

    accelerate launch -m pathsynth.diffusion.sampling     # several GPUs (torchrun works for CPU processes)
    dvc repro guided_sampling                             # finds every shard made, merges, measures

The shards are merged into ``data/guided_sampling/<mode>.h5`` at the end.
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
from ..runtime import derive_seed
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


def allocate(table: pd.DataFrame, n: int, allocation: str, balance_labels: bool, seed: int) -> Request:
    """Requested (label, prototype) per image, from the pairs present in the diffusion training set
    (``table``: prompts_train.csv rows of the prompt-balanced subset), so every MEP prompt is one the
    model was trained on."""
    if n <= 0:
        raise ValueError(f"guided_sampling.n_per_mode must be > 0, got {n}")
    pairs = table.groupby(["prototype", "label"]).size()
    protos = np.array(sorted(table.prototype.unique()))
    rng = np.random.default_rng(derive_seed(seed, "allocation"))
    if allocation == "uniform":
        proto = protos[np.arange(n) % len(protos)]
    else:
        freq = table.prototype.value_counts().reindex(protos).to_numpy(float)
        proto = rng.choice(protos, n, p=freq / freq.sum())
    label = np.empty(n, np.int64)
    for i, k in enumerate(proto):
        have = [c for c in (0, 1) if (k, c) in pairs.index]
        want = i % 2 if balance_labels else rng.choice(have, p=pairs.loc[k].reindex(have).to_numpy() / pairs.loc[k].sum())
        label[i] = want if want in have else have[0]
    seeds = np.array([derive_seed(seed, "guided_sampling", i) for i in range(n)], dtype=np.int64)
    return Request(label, proto.astype(np.int64), seeds)


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
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise DataError(f"{folder}: output folder cannot be written ({err.strerror or err})") from None
    made, t_gen = 0, 0.0
    for sh in (progress(shards, desc=f"{mode} shards", unit="shard") if progress else shards):
        path = folder / f"shard-{sh:05d}.h5"
        if path.exists():  # written atomically: complete
            continue
        lo, hi = sh * S, min(n, (sh + 1) * S)
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
        write_imageset(path, ImageSet(x, req.label[lo:hi], meta, {"source": "synthetic", "mode": mode, "shard": sh}))
        made += hi - lo
    return {"images_made": made, "seconds": t_gen}


def shard_dir(root: Path, gp, seed: int) -> Path:
    """Where the shards of this run live: keyed by the sampling params, the seed and the model files
    (path, size, mtime), so shards are only reused for the same models and settings."""
    from ..training import params_hash

    files = sorted(p for p in (root / "models" / "ldm_finetune").rglob("*") if p.is_file() and "samples" not in p.parts)
    stamp = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return root / "checkpoints" / "guided_sampling" / params_hash({"gp": gp.model_dump(mode="json"), "seed": seed,
                                                                   "models": stamp})


def merge_mode(mode: str, n: int, shard_size: int, run_dir: Path, out_path: Path) -> ImageSet:
    parts = []
    for sh in range((n + shard_size - 1) // shard_size):
        p = run_dir / mode / f"shard-{sh:05d}.h5"
        if not p.exists():
            raise DataError(f"{p}: shard missing; rerun the stage to generate it")
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
        out[v] = {"prompts": set(json.loads(pfile.read_text())) | {""},"unet": pipe.unet.to(device).eval(), "text_encoder": pipe.text_encoder.to(device).eval(),
                  "tokenizer": pipe.tokenizer, "vae": pipe.vae.to(device).eval(),
                  "train_scheduler_config": pipe.scheduler.config}
    cpath = model_root / "prototype_classifier"
    if cpath.is_dir():
        out["classifier"] = NoisyLatentClassifier.from_pretrained(cpath).to(device).eval()
    return out


def check_mode(models_: dict, mode: str, req: Request) -> None:
    """Before any compute: the prompts of the mode must be ones its model was trained on (a model folder
    from another variant fails here), and classifier guidance needs the classifier."""
    prompts_for(mode, req, models_[MODE_SPEC[mode][0]]["prompts"])
    if MODE_SPEC[mode][3] and "classifier" not in models_:
        raise DataError(f"models/ldm_finetune/prototype_classifier is missing: mode '{mode}' needs the "
                        "noise-aware prototype classifier")


def plan(root: Path, params, device: str):
    """What the guided_sampling stage makes, checked before any compute: the prompt table (train split),
    the request per image, the models of every mode and the shard folder of this run."""
    gp = params.guided_sampling
    table = pd.read_csv(root / "data" / "prototypes" / "prompts_train.csv")
    models_ = load_models(root / "models" / "ldm_finetune", {MODE_SPEC[m][0] for m in gp.modes}, device)
    req = allocate(table[table.in_balanced_subset], gp.n_per_mode, gp.allocation, gp.balance_labels, params.seed)
    for mode in gp.modes:
        check_mode(models_, mode, req)  # every prompt known to its model, classifier present
    return table, req, models_, shard_dir(root, gp, params.seed)


def main() -> int:
    """Make this process's share of the shards of every mode (``accelerate launch -m pathsynth.diffusion.sampling``)."""
    from accelerate import PartialState

    from ..runtime import progress, start_stage

    ctx = start_stage("guided_sampling")
    state = PartialState(cpu=ctx.device == "cpu")  # cpu=True: CPU processes under torchrun form a gloo group
    device = "cpu" if ctx.device == "cpu" else str(state.device)
    _, req, models_, run_dir = plan(ctx.root, ctx.params, device)
    for mode in ctx.params.guided_sampling.modes:
        t = generate_mode(mode, req, models_, ctx.params.guided_sampling, run_dir, device, state.process_index,
                          state.num_processes, progress=progress)
        print(f"process {state.process_index}/{state.num_processes} {mode}: {t['images_made']} images made "
              f"in {t['seconds']:.1f} s", flush=True)
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"shards in {run_dir}; `dvc repro guided_sampling` merges them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
