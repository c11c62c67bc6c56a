"""The generator's sampling-time levers, swept on one trained run (issue 14): classifier-free guidance scale
per prompt kind and the prototype classifier's scale, judged by the study's own yardsticks.

    .venv/bin/python benchmarks/generator_levers.py --n 256                       # in a project after `dvc repro dino_pretrain`
    .venv/bin/python benchmarks/generator_levers.py --root /path/to/run --cfg 1 3 8 --classifier-scale 0 10 30

Every setting makes N images of one mode exactly as guided_sampling does (``sampling.generate_mode`` with the
profile's sampler, steps and JPEG quality; only the scale changes; the same per-image seeds and requests as the
first N images of guided_sampling's evaluation sets, so the profile's own setting repeats the stage's images) and
measures them with:

- ``hit_own``: requested prototype == nearest prototype centroid in the prototypes stage's DINO space (guided_sampling's
  own judge), Wilson 95% CI;
- ``hit_indep``: the same in the dino_pretrain ``real`` backbone's space (fid_umap_coverage's independent judge: a DINO
  trained apart from the generator), Wilson 95% CI; where that backbone exists (a later call fills it in for
  settings run before it existed, from their kept images);
- ``fd_dino``: Fréchet distance in the prototypes stage's DINO space against real train features (N_ref = 4,000
  or the split), 95% bootstrap CI; it is not an Inception FID;
- ``auroc``: the synthetic-only experiment: linear_probe's small CNN recipe (``linear_probe.supervised``) trained on the
  N synthetic images with their requested labels, judged on the real test split, stratified bootstrap 95% CI.

Each finished setting is appended to the CSV (``--out``), and images are kept as guided_sampling's resumable
shards under ``checkpoints/benchmarks/generator_levers/``: a killed sweep resumes where it stopped.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
from statsmodels.stats.proportion import proportion_confint

from pathsynth import config
from pathsynth.data.dataset import read_imageset
from pathsynth.data.features import read_features
from pathsynth.diffusion import sampling as S
from pathsynth.metrics import classification as C, cnn as CNN
from pathsynth.metrics.fidelity import fd
from pathsynth.prototypes.cluster import assign, centroids_in
from pathsynth.prototypes.features import SelfTrained, load_extractor
from pathsynth.runtime import derive_seed


def wilson(hits: np.ndarray) -> tuple[float, float, float]:
    k, n = int(hits.sum()), len(hits)
    lo, hi = proportion_confint(k, n, alpha=0.05, method="wilson")
    return k / n, lo, hi


def settings(a) -> list[tuple[str, float, float]]:
    """(mode, cfg scale, classifier scale); a mode without CFG or without the classifier ignores that scale."""
    out = [("cfg_mep", w, 0.0) for w in a.cfg] + [("cfg_baseline", w, 0.0) for w in a.cfg_baseline or a.cfg]
    out += [("classifier", 1.0, s) for s in a.classifier_scale]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=None, help="a project whose stages up to dino_pretrain have run")
    ap.add_argument("--n", type=int, default=256, help="images per setting")
    ap.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0, 8.0])
    ap.add_argument("--cfg-baseline", type=float, nargs="*", default=[1.0, 3.0, 8.0])
    ap.add_argument("--classifier-scale", type=float, nargs="+", default=[3.0, 10.0, 30.0])
    ap.add_argument("--out", type=Path, default=None, help="CSV (default: <root>/checkpoints/benchmarks/generator_levers.csv)")
    a = ap.parse_args()
    root = (a.root or config.project_root()).resolve()
    P = config.load(root / "params.yaml")
    GP, SUP = P.guided_sampling, P.linear_probe.supervised
    work = root / "checkpoints" / "benchmarks" / "generator_levers"
    out = a.out or work.with_suffix(".csv")
    done = pd.read_csv(out) if out.is_file() else pd.DataFrame()
    todo = [s for s in settings(a) if done.empty or not ((done["mode"] == s[0]) & (done.cfg_scale == s[1])
                                                        & (done.classifier_scale == s[2]) & (done.n == a.n)).any()]
    print(f"{root}: profile {P.profile}, {GP.sampler} {GP.steps} steps, JPEG {GP.jpeg_quality}; N = {a.n} per setting; "
          f"{len(todo)} of {len(settings(a))} settings to run")

    # everything the settings need, loaded (and checked) before any sampling
    models_ = S.load_models(root / "models" / "ldm_finetune", {"mep", "baseline"}, "cpu")
    table = pd.read_csv(root / "data" / "prototypes" / "prompts_train.csv")
    req = S.allocate(table[table.in_balanced_subset], a.n, GP.allocation, GP.balance_labels, P.seed)
    for mode in {s[0] for s in todo}:
        S.check_mode(models_, mode, req)
    extractor = load_extractor(P, root)
    centroids = np.load(root / "data" / "prototypes" / "centroids.npz")["centroids"]
    feats_train = np.load(root / "data" / "prototypes" / "features_train.npy")
    ref = feats_train[np.sort(np.random.default_rng(0).choice(len(feats_train), min(4000, len(feats_train)), replace=False))]
    test = read_imageset(root / "data" / "data_prep" / "test.h5")
    test_x = CNN.to_tensor(test.x, SUP.image_size)
    indep = None
    if (root / "models" / "dino_pretrain" / "real" / "config.json").is_file():
        backbone = SelfTrained.load(root / "models" / "dino_pretrain" / "real")
        real_feats, _ = read_features(root / "data" / "dino_pretrain" / "features" / "real.h5")
        K = len(centroids)
        indep = (backbone, centroids_in(real_feats["real_train"].features, table.prototype.to_numpy(), K))
    print(f"judges: own (prototypes DINO, K = {len(centroids)}), independent: "
          f"{'dino_pretrain real backbone' if indep else 'none (no models/dino_pretrain/real)'}; "
          f"fd_dino against {len(ref)} real train images; AUROC on {len(test)} real test images")

    def images(mode, w, s):  # made (or resumed from its shards) exactly as guided_sampling makes them
        gp = GP.model_copy(update={"cfg_scale": w, "classifier_scale": s})
        folder = work / f"n{a.n}-cfg{w:g}-cls{s:g}"
        S.generate_mode(mode, req, models_, gp, folder)
        return S.merge_mode(mode, a.n, gp.shard_size, folder, folder / f"{mode}.h5", keys=S.shard_keys(mode, req, gp, models_)).x

    def save(table):
        out.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(out.with_suffix(".tmp"), index=False)
        out.with_suffix(".tmp").replace(out)

    for mode, w, s in todo:
        t0 = time.perf_counter()
        x = images(mode, w, s)
        seconds = time.perf_counter() - t0
        row = {"mode": mode, "cfg_scale": w, "classifier_scale": s, "n": a.n, "sampling_s": round(seconds, 1)}
        f = extractor(x)
        row.update(zip(("hit_own", "hit_own_lo", "hit_own_hi"), wilson(assign(centroids, f) == req.prototype)))
        if indep:
            row.update(zip(("hit_indep", "hit_indep_lo", "hit_indep_hi"),
                           wilson(assign(indep[1], indep[0](x)) == req.prototype)))
        r = fd(ref, f, n_bootstrap=200, seed=derive_seed(P.seed, "generator_levers", mode))
        row.update(fd_dino=r["value"], fd_dino_lo=r["ci95"][0], fd_dino_hi=r["ci95"][1])
        seed = derive_seed(P.seed, "supervised")
        net = CNN.train_cnn(CNN.to_tensor(x, SUP.image_size), req.label, np.arange(a.n), SUP.steps, SUP.batch_size,
                            seed, lr=SUP.lr, cosine=True)
        m = C.metrics_with_ci(test.y, CNN.predict(net, test_x), 1000, seed)
        row.update(auroc=m["auroc"]["value"], auroc_lo=m["auroc"]["ci95"][0], auroc_hi=m["auroc"]["ci95"][1],
                   n_test=m["n"], seed=P.seed)
        done = pd.concat([done, pd.DataFrame([row])], ignore_index=True)
        save(done)
        print(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    cols = ["hit_indep", "hit_indep_lo", "hit_indep_hi"]
    if indep and not done.empty:  # settings run before the backbone existed: judged now, from their kept images
        done = done.reindex(columns=list(done.columns) + [c for c in cols if c not in done])
        for i in np.flatnonzero(done.hit_indep.isna().to_numpy() & (done.n == a.n).to_numpy()):
            r = done.iloc[i]
            done.loc[i, cols] = wilson(
                assign(indep[1], indep[0](images(r["mode"], r.cfg_scale, r.classifier_scale))) == req.prototype)
        save(done)
    order = ["mode", "cfg_scale", "classifier_scale", "n", "hit_own", "hit_own_lo", "hit_own_hi", *cols, "fd_dino",
             "fd_dino_lo", "fd_dino_hi", "auroc", "auroc_lo", "auroc_hi", "n_test", "sampling_s", "seed"]
    print(f"\n{out} (chance hit rate {S.chance_hit_rate(req.prototype, table.prototype.to_numpy()):.3f}):\n"
          + done[done.n == a.n].reindex(columns=[c for c in order if c in done]).round(3).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
