"""The VAE lever of issue 14, measured as the ceiling it sets: how well can the autoencoder alone pass for
real? Every image the generator makes is decoded by the VAE, so a set of VAE reconstructions of real patches is
the best synthetic set that VAE allows; if a small CNN tells reconstructions from real patches, it tells every
generated set from them too.

    .venv/bin/python benchmarks/vae_levers.py --root DIR                                   # the stage's VAE and the floor
    .venv/bin/python benchmarks/vae_levers.py --root DIR --vae disc_weight=0.5 perceptual_weight=1.0

For the stage's VAE (``models/ldm_finetune/vae``) and, with ``--vae KEY=VALUE`` (keys under
``ldm_finetune.vae``, YAML values), a VAE retrained with those settings (resumably, everything else as the
profile has it), N real test patches are reconstructed (posterior mean), JPEG-encoded as guided_sampling encodes
its sets, and judged with:

- ``psnr`` / ``ssim``: ldm_finetune's own reconstruction quality (torchmetrics) on the same N test patches;
- ``c2st``: fid_umap_coverage's pixel machine reader (``readers.c2st_cnn``, its epochs, held-out share and
  bootstrap) on N real valid patches against the N reconstructions (other patches than the real side's, so the
  reader cannot match pairs), AUROC with a bootstrap 95% CI: 0.5 means indistinguishable;
- ``fd_dino``: Fréchet distance of the reconstructions' prototypes-stage DINO features to fid_umap_coverage's
  real reference (not an Inception FID), bootstrap 95% CI.

A row ``real (no VAE)`` puts the N real test patches themselves through the same judges: the floor of both; with
JPEG encoding on, a row ``real (no VAE), JPEG qQ`` puts them through that encoding alone, which is what the
encoding costs by itself (at 64 px it is not like with like: pcam_ai4all's patches were JPEG-encoded at 96 px and
data_prep resized them). ``--jpeg Q`` judges the reconstructions under another encoding than guided_sampling's
(``--jpeg 0``: none); their label says so.
Rows land in a CSV as they finish (``--out``; default ``<root>/checkpoints/benchmarks/vae_levers.csv``).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers import AutoencoderKL

from generator_levers import overridden, retrained_vae
from pathsynth import config
from pathsynth.data.dataset import read_imageset
from pathsynth.diffusion import sampling as S, train as T
from pathsynth.metrics import readers as R
from pathsynth.metrics.fidelity import fd, reference_draw
from pathsynth.prototypes.features import load_extractor
from pathsynth.runtime import derive_seed


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, jpeg_quality: int | None, device: str) -> np.ndarray:
    """uint8 reconstructions (posterior mean, decoded), JPEG-encoded as guided_sampling encodes its sets."""
    vae.eval().to(device)
    out = []
    for s in range(0, len(images), 128):
        x = T.to_model_range(images[s:s + 128]).to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mean).sample.float().clamp(-1, 1)
        out.append(((rec + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
    rec = np.concatenate(out)
    return S.jpeg_roundtrip(rec, jpeg_quality) if jpeg_quality else rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=None, help="a project whose stages up to ldm_finetune have run "
                    "(up to prototypes will do with --vae: the stage VAE's row is then left out)")
    ap.add_argument("--n", type=int, default=512, help="real valid patches and reconstructed test patches")
    ap.add_argument("--vae", nargs="*", default=[], metavar="KEY=VALUE", help="retrain the VAE with these ldm_finetune.vae settings")
    ap.add_argument("--jpeg", type=int, default=None, metavar="Q",
                    help="JPEG quality of the reconstructions (0: none; default: guided_sampling.jpeg_quality)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    root = (a.root or config.project_root()).resolve()
    P = config.load(root / "params.yaml")
    lp, Q, GP = P.ldm_finetune, P.fid_umap_coverage, P.guided_sampling
    if lp.regime != "scratch":
        raise SystemExit("--vae retrains the scratch regime's VAE; this profile uses a pretrained one")
    vae_cfg = overridden(lp, [f"vae.{p}" for p in a.vae], "--vae").vae  # bad keys or values fail here, before any compute
    if a.jpeg is not None and not 0 <= a.jpeg <= 100:
        raise SystemExit(f"--jpeg {a.jpeg}: a JPEG quality is 1 to 100 (0: no encoding)")
    jpeg = (GP.jpeg_quality or 0) if a.jpeg is None else a.jpeg
    encoding = "" if jpeg == (GP.jpeg_quality or 0) else f" ({f'JPEG q{jpeg}' if jpeg else 'no JPEG'})"
    name = (" ".join(a.vae) or "stage") + encoding
    out = a.out or root / "checkpoints" / "benchmarks" / "vae_levers.csv"
    done = pd.read_csv(out) if out.is_file() else pd.DataFrame(columns=["vae", "n"])

    valid = read_imageset(root / "data" / "data_prep" / "valid.h5")
    test = read_imageset(root / "data" / "data_prep" / "test.h5")
    if min(len(valid), len(test)) < a.n:
        raise SystemExit(f"--n {a.n}: the valid split has {len(valid)} patches and the test split {len(test)}")
    rng = np.random.default_rng(derive_seed(P.seed, "vae_levers"))
    real = valid.x[np.sort(rng.choice(len(valid), a.n, replace=False))]
    source = test.x[np.sort(rng.choice(len(test), a.n, replace=False))]
    extractor = load_extractor(P, root)
    feats_train = np.load(root / "data" / "prototypes" / "features_train.npy")
    ref = feats_train[reference_draw(len(feats_train), Q.n_reference, P.seed)]  # fid_umap_coverage's
    seed = derive_seed(P.seed, "vae_levers", "c2st")

    def judge(label: str, images: np.ndarray, extra: dict) -> None:
        nonlocal done
        c2st, _ = R.c2st_cnn(real, images, Q.c2st_test_fraction, seed, Q.c2st_cnn_epochs, n_bootstrap=Q.n_bootstrap,
                             device=a.device)
        r = fd(ref, extractor(images, device=a.device), n_bootstrap=Q.n_bootstrap, seed=seed)
        row = {"vae": label, "n": a.n, "jpeg_quality": extra.pop("jpeg_quality", jpeg), **extra,
               "c2st": c2st["auroc"], "c2st_lo": c2st["ci95"][0], "c2st_hi": c2st["ci95"][1],
               "fd_dino": r["value"], "fd_dino_lo": r["ci95"][0], "fd_dino_hi": r["ci95"][1], "seed": P.seed}
        done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        done.to_csv(out.with_suffix(".tmp"), index=False)
        out.with_suffix(".tmp").replace(out)
        print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)

    def is_done(label: str) -> bool:
        return bool(((done["vae"] == label) & (done["n"] == a.n)).any())

    if not is_done("real (no VAE)"):
        judge("real (no VAE)", source, {"jpeg_quality": 0})
    if jpeg and not is_done(f"real (no VAE), JPEG q{jpeg}"):
        judge(f"real (no VAE), JPEG q{jpeg}", S.jpeg_roundtrip(source, jpeg), {})
    labels = ["stage" + encoding, name]
    stage_vae = root / "models" / "ldm_finetune" / "vae"
    if not (stage_vae / "config.json").is_file() and a.vae:
        print(f"no stage VAE at {stage_vae} (`dvc repro ldm_finetune` makes it): its row is left out", flush=True)
        labels = [name]
    for label in dict.fromkeys(labels):
        if is_done(label):
            continue
        t0, train_s = time.perf_counter(), None
        if label == "stage" + encoding:
            vae = AutoencoderKL.from_pretrained(stage_vae, local_files_only=True)
        else:
            folder = retrained_vae(root, P, vae_cfg, a.device)
            vae = AutoencoderKL.from_pretrained(folder, local_files_only=True)
            train_s = round(json.loads((folder / "training.json").read_text())["train_seconds"], 1)
        q = T.reconstruction_quality(vae, source, None, a.device)
        judge(label, reconstruct(vae, source, jpeg or None, a.device),
              {"psnr": q["psnr"], "ssim": q["ssim"], "train_s": train_s, "seconds": round(time.perf_counter() - t0, 1)})
    print(f"\n{out}:\n" + done[done.n == a.n].round(3).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
