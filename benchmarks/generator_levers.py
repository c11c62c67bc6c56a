"""The generator's levers (issue 14), swept on one trained run and judged by the study's own yardsticks:
sampling-time levers (classifier-free guidance scale per prompt kind, the prototype classifier's scale, both
together in cfg_mep_classifier with ``--combined CFG:SCALE``) and,
with ``--unet KEY=VALUE``, training-time ones (a mep UNet retrained with ldm_finetune settings changed).

    .venv/bin/python benchmarks/generator_levers.py --n 256                       # in a project after `dvc repro dino_pretrain`
    .venv/bin/python benchmarks/generator_levers.py --root /path/to/run --cfg 1 3 8 --classifier-scale 0 10 30
    .venv/bin/python benchmarks/generator_levers.py --unet train.steps=3000 --cfg 3 --cfg-baseline --classifier-scale 10

Every setting makes N images of one mode exactly as guided_sampling does (``sampling.generate_mode`` with the
profile's sampler, steps and JPEG quality; only the scale changes; the same per-image seeds and requests as the
first N images of guided_sampling's evaluation sets, so the profile's own setting repeats the stage's images) and
measures them with:

- ``hit_own``: requested prototype == nearest prototype centroid in the prototypes stage's DINO space (guided_sampling's
  own judge), Wilson 95% CI;
- ``hit_indep``: the same in the dino_pretrain ``real`` backbone's space (fid_umap_coverage's independent judge: a DINO
  trained apart from the generator), Wilson 95% CI; empty where that backbone does not exist;
- ``fd_dino``: Fréchet distance in the prototypes stage's DINO space against fid_umap_coverage's real reference (the same
  seeded ``n_reference`` train images), bootstrap 95% CI; it is not an Inception FID;
- ``auroc``: the synthetic-only experiment, linear_probe's own ``cnn.supervised_seeds`` (its recipe, seeds and cache)
  on the N synthetic images with their requested labels, judged on the real test split: the mean score of
  ``cnn_seeds`` CNNs (the profile's ``n_seeds``, or ``--cnn-seeds``) all trained on these same N images (the stage
  gives each CNN its own draw; here the draw is the setting's, repeated with ``--seed``), stratified bootstrap 95%
  CI, and each seed's AUROC alone from ``auroc_seed_min`` to ``auroc_seed_max`` (rows from before the seeds were
  repeated: one CNN);
- ``c2st``: fid_umap_coverage's pixel machine reader (``readers.c2st_cnn``, its epochs, held-out share and bootstrap)
  on N seeded real valid patches against the N images, AUROC with a bootstrap 95% CI (0.5: indistinguishable).
  Rows written before this column existed get it from their kept images on the next call that names them.

``--unet`` settings (YAML values, keys under ``ldm_finetune``: ``train.steps=3000``, ``snr_gamma=null``,
``unet.block_out_channels=[96,192]``, ``use_balanced_subset=false``, ...) retrain the mep UNet (and its text
encoder) on latents of the stage's own VAE, resumably, with everything else as the profile has it; its modes
use it, the baseline modes keep the stage's baseline model, and the classifier is the stage's. ``vae.*`` settings
(``vae.disc_weight=0.5``) retrain the VAE first (shared with ``vae_levers.py``), and the classifier on its latents. Rows name the
UNet in the ``unet`` column ("stage": the stage's own models).

``--allocation proportional`` and ``--request-pairs train_split`` change what the images are asked for
(``sampling.allocate``): guided_sampling asks, label by label in turn, for each of the prompt-balanced subset's
(label, prototype) pairs in turn (``uniform`` over ``balanced_subset``: each class's most populated prototypes, equally
often); ``proportional`` over ``train_split`` draws each label's prototype with its frequency among that label's
training images, so the requests follow the real p(prototype | label) over every pair the UNet was trained on (STUDY.md
B.4 leaves the allotment open). Rows carry ``allocation``, ``request_pairs`` and ``hit_chance``, the hit rate of a
generator that ignores the request (``sampling.chance_hit_rate``), which depends on the allotment.

``--seed S`` repeats settings under another seed: the requests and per-image seeds, the fd reference's bootstrap,
the pixel reader's real draw, the CNN, and any retrained model are drawn anew (the stage's models stay what they
are). One seed's CIs resample test images only, not the training and sampling that made the images: repeat a
setting over seeds before a recipe rests on its gain. Rows carry their seed in the ``seed`` column.

Each finished setting is appended to the CSV (``--out``), and images and UNets are kept under
``checkpoints/benchmarks/generator_levers/``: a killed sweep resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from diffusers import AutoencoderKL

from pathsynth import config
from pathsynth.data.dataset import DataError, read_imageset
from pathsynth.data.features import read_features
from pathsynth.diffusion import models, sampling as S, train as T
from pathsynth.metrics import classification as C, cnn as CNN, readers as R
from pathsynth.metrics.fidelity import fd, reference_draw
from pathsynth.prototypes.cluster import assign, centroids_in
from pathsynth.prototypes.features import SelfTrained, data_fingerprint, load_extractor
from pathsynth.readerstudy.stats import wilson
from pathsynth.runtime import derive_seed


def rate(hits: np.ndarray) -> list[float]:
    """Hit rate and its Wilson 95% CI."""
    return [float(hits.mean()), *wilson(int(hits.sum()), len(hits))]


def settings(a) -> list[tuple[str, float, float]]:
    """(mode, cfg scale, classifier scale); a mode without CFG or without the classifier ignores that scale."""
    out = [("cfg_mep", w, 0.0) for w in a.cfg] + [("cfg_baseline", w, 0.0) for w in a.cfg_baseline]
    return out + [("classifier", 1.0, s) for s in a.classifier_scale] + [("cfg_mep_classifier", w, s) for w, s in a.combined]


def scale_pair(text: str) -> tuple[float, float]:
    """'CFG:SCALE' -> (cfg scale, classifier scale), for --combined."""
    try:
        w, s = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected CFG:SCALE, such as 3:3") from None
    return w, s


def overridden(lp, pairs: list[str], option: str = "--unet"):
    """ldm_finetune settings with KEY=VALUE changes (dotted keys, YAML values), validated like params.yaml."""
    raw = lp.model_dump(mode="json")
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"{option} {pair!r}: expected KEY=VALUE")
        node, parts = raw, key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise SystemExit(f"{option} {pair!r}: ldm_finetune has no section '{p}'")
            node = node[p]
        if parts[-1] not in node:
            raise SystemExit(f"{option} {pair!r}: ldm_finetune has no setting '{key}'")
        node[parts[-1]] = yaml.safe_load(value)
    try:
        return type(lp).model_validate(raw)
    except ValueError as err:
        raise SystemExit(f"{option} {' '.join(pairs)}: {err}") from None


VAE_WORK = Path("checkpoints") / "benchmarks" / "vae_levers"  # VAEs retrained by either benchmark, shared


def retrained_vae(root: Path, P, vae_cfg, device: str, suffix: str = "") -> Path:
    """The VAE with settings ``vae_cfg`` (trained resumably under checkpoints/benchmarks/vae_levers/, where
    vae_levers.py trains it too; saved once), or the stage's own where the settings are the profile's."""
    if vae_cfg == P.ldm_finetune.vae:
        return root / "models" / "ldm_finetune" / "vae"
    tag = T.params_hash({"vae": vae_cfg.model_dump(mode="json")}) + suffix
    folder = root / VAE_WORK / f"vae-{tag}"
    if not (folder / "config.json").is_file():
        train = read_imageset(root / "data" / "data_prep" / "train.h5")
        vae, run = T.train_vae(train.x, vae_cfg, P.seed, device, root / VAE_WORK / "checkpoints",
                             root / VAE_WORK / f"vae-{tag}_loss.csv", data_fingerprint(train.x),
                             perceptual=load_extractor(P, root) if vae_cfg.perceptual_weight else None)
        vae.save_pretrained(folder.with_suffix(".tmp"))
        (folder.with_suffix(".tmp") / "training.json").write_text(json.dumps({"train_seconds": run["train_seconds"]}))
        folder.with_suffix(".tmp").replace(folder)
    return folder


def retrained_mep(root: Path, P, lp, work: Path, device: str, suffix: str = "") -> Path:
    """Train the mep UNet with settings ``lp`` (resumable) and return a model folder laid out like
    models/ldm_finetune (mep retrained; baseline and, unless the VAE changed, the classifier linked to the
    stage's). With ``vae.*`` settings changed the VAE is retrained first, and the prototype classifier with it
    (it reads that VAE's latents)."""
    if lp.regime != "scratch":
        raise SystemExit("--unet retrains the scratch regime's UNet; this profile fine-tunes a pretrained one")
    tag = T.params_hash({"ldm": lp.model_dump(mode="json")}) + suffix  # suffix: "-seed<S>" under --seed
    folder = work / f"models-{tag}"
    if (folder / "mep" / "training_prompts.json").is_file():
        return folder
    stage = root / "models" / "ldm_finetune"
    vae_dir = retrained_vae(root, P, lp.vae, device, suffix)
    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
    train = read_imageset(root / "data" / "data_prep" / "train.h5")
    table = pd.read_csv(root / "data" / "prototypes" / "prompts_train.csv")
    rows = np.flatnonzero(table.in_balanced_subset) if lp.use_balanced_subset else np.arange(len(train))
    T.check_batch_sizes(lp, n_unet=len(rows), n_vae=len(train))
    T.check_text_side(lp, table.iloc[rows])
    cache = work / f"latents-{S.model_digest(vae_dir)[:16]}.pt"  # the whole train split, once per VAE
    if not cache.is_file():
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(T.encode(vae, train.x, lp.resolution, device), cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)
    mean, std = torch.load(cache)
    prompts = table.iloc[rows][T.PROMPT_COLUMN["mep"]].tolist()
    tok, te, unet = T.build_variant("mep", lp, prompts, None, tuple(mean.shape[1:]), P.seed)
    fp = data_fingerprint(train.x)
    run = T.train_unet("mep", (mean[rows], std[rows]), prompts, tok, te, unet, lp, P.seed, device, work / "checkpoints",
                       work / f"unet-{tag}_loss.csv", fp, lp.train_text_encoder)
    pipe = models.assemble_pipeline(vae, run["model"].encoder(), tok, run["model"].unet, models.noise_scheduler())
    tmp = work / f"models-{tag}.tmp"
    pipe.save_pretrained(tmp / "mep")
    (tmp / "mep" / "training_prompts.json").write_text(json.dumps(sorted(set(prompts)), indent=0))
    if vae_dir != stage / "vae":
        k = int(np.load(root / "data" / "prototypes" / "centroids.npz")["k"])
        clf, _ = T.train_classifier((mean, std), table.prototype.to_numpy(), k, lp.classifier, P.seed, device,
                                    work / "checkpoints", work / f"classifier-{tag}_loss.csv", fp)
        clf.save_pretrained(tmp / "prototype_classifier")
    for name in ("baseline", "prototype_classifier"):
        if (stage / name).is_dir() and not (tmp / name).exists():
            (tmp / name).symlink_to((stage / name).resolve())
    tmp.replace(folder)
    return folder


REQUEST_PAIRS = ("balanced_subset", "train_split")


def request_rows(table: pd.DataFrame, pairs: str) -> pd.DataFrame:
    """The prompt table's rows whose (label, prototype) pairs, with their counts, requests are drawn over."""
    return table[table.in_balanced_subset] if pairs == "balanced_subset" else table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=None, help="a project whose stages up to dino_pretrain have run")
    ap.add_argument("--n", type=int, default=256, help="images per setting")
    ap.add_argument("--cfg", type=float, nargs="*", default=[1.0, 2.0, 3.0, 5.0, 8.0], help="cfg_mep's CFG scales")
    ap.add_argument("--cfg-baseline", type=float, nargs="*", default=[1.0, 3.0, 8.0], help="cfg_baseline's CFG scales")
    ap.add_argument("--classifier-scale", type=float, nargs="*", default=[3.0, 10.0, 30.0])
    ap.add_argument("--combined", type=scale_pair, nargs="*", default=[], metavar="CFG:SCALE",
                    help="cfg_mep_classifier's (CFG scale, classifier scale) pairs, such as 3:3")
    ap.add_argument("--unet", nargs="*", default=[], metavar="KEY=VALUE", help="retrain the mep UNet with these ldm_finetune settings")
    ap.add_argument("--allocation", choices=["uniform", "proportional"], default=None,
                    help="how prototypes are allotted to requests (default: the profile's guided_sampling.allocation)")
    ap.add_argument("--request-pairs", choices=REQUEST_PAIRS, default="balanced_subset",
                    help="the (label, prototype) pairs requests are drawn over (default: guided_sampling's, the "
                    "prompt-balanced subset's)")
    ap.add_argument("--seed", type=int, default=None, help="repeat under this seed (default: the params' seed)")
    ap.add_argument("--cnn-seeds", type=int, default=None, help="CNNs per set for auroc (default: the profile's "
                    "linear_probe.supervised.n_seeds)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="CSV (default: <root>/checkpoints/benchmarks/generator_levers.csv)")
    a = ap.parse_args()
    root = (a.root or config.project_root()).resolve()
    P = config.load(root / "params.yaml")
    suffix = "" if a.seed in (None, P.seed) else f"-seed{a.seed}"  # names of images and models made under --seed
    P = P.model_copy(update={"seed": P.seed if a.seed is None else a.seed})
    GP, SUP = P.guided_sampling, P.linear_probe.supervised
    if a.cnn_seeds is not None:
        SUP = SUP.model_copy(update={"n_seeds": a.cnn_seeds})
    if SUP.n_seeds < 1:
        raise SystemExit(f"--cnn-seeds {SUP.n_seeds}: at least 1")
    work = root / "checkpoints" / "benchmarks" / "generator_levers"
    out = a.out or work.with_suffix(".csv")
    unet_name = " ".join(a.unet) or "stage"
    allocation = a.allocation or GP.allocation
    # images asked for otherwise than by the stage live in folders of their own
    asked = "" if (allocation, a.request_pairs) == (GP.allocation, "balanced_subset") else f"{allocation}-{a.request_pairs}-"
    lp = overridden(P.ldm_finetune, a.unet)  # bad keys or values fail here, before anything runs
    done = pd.read_csv(out, keep_default_na=False, na_values=[""]) if out.is_file() else pd.DataFrame()

    def column(name, before):  # a column of the CSV, with the value rows written before it existed had
        return done[name].fillna(before) if name in done else pd.Series(before, index=done.index)

    def row_of(mode, w, s):
        if done.empty:
            return None
        hit = np.flatnonzero((done["mode"] == mode) & (done.cfg_scale == w) & (done.classifier_scale == s)
                             & (done.n == a.n) & (done.unet == unet_name) & (done.seed == P.seed)
                             & (column("cnn_seeds", 1) == SUP.n_seeds)  # earlier rows: one CNN, the stage's requests
                             & (column("allocation", "uniform") == allocation)
                             & (column("request_pairs", "balanced_subset") == a.request_pairs))
        return int(hit[0]) if len(hit) else None

    todo = [s for s in settings(a) if row_of(*s) is None]
    # rows written before the pixel reader was part of the sweep get it from their kept images
    no_c2st = [s for s in settings(a) if row_of(*s) is not None
               and ("c2st" not in done or pd.isna(done.loc[row_of(*s), "c2st"]))]
    print(f"{root}: profile {P.profile}, {GP.sampler} {GP.steps} steps, JPEG {GP.jpeg_quality}; N = {a.n} per setting; "
          f"UNet: {unet_name}; requests {allocation} over {a.request_pairs}; seed {P.seed}; {SUP.n_seeds} CNN seeds; {len(todo)} of {len(settings(a))} settings to run"
          + (f", {len(no_c2st)} to complete with the pixel C2ST" if no_c2st else ""))

    # everything the settings need, loaded (and checked) before any sampling
    model_root = retrained_mep(root, P, lp, work, a.device, suffix) if a.unet else root / "models" / "ldm_finetune"
    models_ = S.load_models(model_root, {"mep", "baseline"}, a.device)
    table = pd.read_csv(root / "data" / "prototypes" / "prompts_train.csv")
    req = S.allocate(request_rows(table, a.request_pairs), a.n, allocation, GP.balance_labels, P.seed)
    chance = S.chance_hit_rate(req.prototype, table.prototype.to_numpy())
    for mode in {s[0] for s in todo}:
        try:
            S.check_mode(models_, mode, req)
        except DataError as err:  # such as train_split pairs asked of a UNet trained on the prompt-balanced subset
            raise SystemExit(f"--request-pairs {a.request_pairs}: {err}") from None
    extractor = load_extractor(P, root)
    centroids = np.load(root / "data" / "prototypes" / "centroids.npz")["centroids"]
    feats_train = np.load(root / "data" / "prototypes" / "features_train.npy")
    Q = P.fid_umap_coverage  # fid_umap_coverage's reference draw
    ref = feats_train[reference_draw(len(feats_train), Q.n_reference, P.seed)]  # fid_umap_coverage's
    test = read_imageset(root / "data" / "data_prep" / "test.h5")
    test_x = CNN.to_tensor(test.x, SUP.image_size)
    indep = None
    if (root / "models" / "dino_pretrain" / "real" / "config.json").is_file():
        backbone = SelfTrained.load(root / "models" / "dino_pretrain" / "real")
        real_feats, _ = read_features(root / "data" / "dino_pretrain" / "features" / "real.h5")
        indep = (backbone, centroids_in(real_feats["real_train"].features, table.prototype.to_numpy(), len(centroids)))
    valid = read_imageset(root / "data" / "data_prep" / "valid.h5")
    if len(valid) < a.n:
        raise SystemExit(f"--n {a.n}: the pixel C2ST needs as many real valid patches; the valid split has {len(valid)}")
    c2st_seed = derive_seed(P.seed, "generator_levers", "c2st")  # the real side's draw and the reader's seed
    real_px = valid.x[np.sort(np.random.default_rng(c2st_seed).choice(len(valid), a.n, replace=False))]
    print(f"judges: own (prototypes DINO, K = {len(centroids)}), independent: "
          f"{'dino_pretrain real backbone' if indep else 'none (no models/dino_pretrain/real)'}; "
          f"fd_dino against {len(ref)} real train images; AUROC on {len(test)} real test images")

    def images(mode, w, s, unet):  # made (or resumed from its shards) exactly as guided_sampling makes them
        gp = GP.model_copy(update={"cfg_scale": w, "classifier_scale": s})
        uses_mep = S.MODE_SPEC[mode][0] == "mep"
        tag = "" if unet == "stage" or not uses_mep else T.params_hash({"unet": unet}) + "-"
        folder = work / f"{tag}{asked}n{a.n}-cfg{w:g}-cls{s:g}{suffix}"
        S.generate_mode(mode, req, models_, gp, folder, a.device)
        return S.merge_mode(mode, a.n, gp.shard_size, folder, folder / f"{mode}.h5", keys=S.shard_keys(mode, req, gp, models_)).x

    def save(t):
        out.parent.mkdir(parents=True, exist_ok=True)
        t.to_csv(out.with_suffix(".tmp"), index=False)
        out.with_suffix(".tmp").replace(out)

    def pixel_c2st(x) -> dict:  # fid_umap_coverage's pixel machine reader, N real valid patches against the N images
        r, _ = R.c2st_cnn(real_px, x, Q.c2st_test_fraction, c2st_seed, Q.c2st_cnn_epochs, n_bootstrap=Q.n_bootstrap,
                          device=a.device)
        return {"c2st": r["auroc"], "c2st_lo": r["ci95"][0], "c2st_hi": r["ci95"][1]}

    for mode, w, s in no_c2st:
        i = row_of(mode, w, s)
        for k, v in pixel_c2st(images(mode, w, s, unet_name)).items():
            done.loc[i, k] = v
        save(done)
        print(f"{mode} cfg {w:g} classifier {s:g}: pixel C2ST {done.loc[i, 'c2st']:.3f}", flush=True)

    for mode, w, s in todo:
        t0 = time.perf_counter()
        x = images(mode, w, s, unet_name)
        row = {"unet": unet_name, "mode": mode, "cfg_scale": w, "classifier_scale": s, "n": a.n,
               "allocation": allocation, "request_pairs": a.request_pairs, "hit_chance": chance,
               "sampling_s": round(time.perf_counter() - t0, 1)}
        row.update(pixel_c2st(x))
        f = extractor(x, device=a.device)
        row.update(zip(("hit_own", "hit_own_lo", "hit_own_hi"), rate(assign(centroids, f) == req.prototype)))
        if indep:
            row.update(zip(("hit_indep", "hit_indep_lo", "hit_indep_hi"),
                           rate(assign(indep[1], indep[0](x, device=a.device)) == req.prototype)))
        r = fd(ref, f, n_bootstrap=Q.n_bootstrap, seed=derive_seed(P.seed, "generator_levers", mode))
        row.update(fd_dino=r["value"], fd_dino_lo=r["ci95"][0], fd_dino_hi=r["ci95"][1])
        seed = derive_seed(P.seed, "supervised")
        # every CNN seed on the same N images: the CNN's part of the spread alone (the stage gives each its own draw)
        per_seed = CNN.supervised_seeds([(x, req.label)] * SUP.n_seeds, test_x, SUP, seed, work / "cnn", a.device)
        m = C.metrics_with_ci(test.y, per_seed.mean(0), P.linear_probe.n_bootstrap, seed)
        spread = C.run_spread(test.y, per_seed)
        row.update(auroc=m["auroc"]["value"], auroc_lo=m["auroc"]["ci95"][0], auroc_hi=m["auroc"]["ci95"][1],
                   auroc_seed_min=spread["min"], auroc_seed_max=spread["max"], cnn_seeds=SUP.n_seeds,
                   n_test=m["n"], seed=P.seed)
        done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
        save(done)
        print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    cols = ["hit_indep", "hit_indep_lo", "hit_indep_hi"]
    order = ["unet", "mode", "cfg_scale", "classifier_scale", "n", "allocation", "request_pairs", "hit_chance", "hit_own", "hit_own_lo", "hit_own_hi", *cols,
             "fd_dino", "fd_dino_lo", "fd_dino_hi", "auroc", "auroc_lo", "auroc_hi", "auroc_seed_min", "auroc_seed_max",
             "cnn_seeds", "c2st", "c2st_lo", "c2st_hi", "n_test", "sampling_s", "seed"]
    print(f"\n{out} (chance hit rate of these requests {chance:.3f}):\n"
          + done[done.n == a.n].reindex(columns=[c for c in order if c in done]).round(3).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
