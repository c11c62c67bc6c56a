"""The dino_pretrain stage: the study's DINO recipe on real, synthetic and hybrid data at one budget.

Regimes (Redekop et al.; STUDY.md A.5, A.6), every one with the same recipe and the same number of
images seen (``dino.epochs`` epochs of ``epoch_images`` images, default the size of the real train split):

- ``random_init``: the backbone at initialisation, never trained (the floor);
- ``real``: the real train split;
- ``synthetic_<mode>``: one synthetic pretraining set of guided_sampling (``guided_sampling.pretrain``);
- ``hybrid``: real plus the ``hybrid_mode`` set, a share ``hybrid_ratio`` of each batch synthetic;
- the ladder: ``real_<p>pct`` and ``hybrid_<p>pct`` for each fraction p of the real train split (a
  stratified, seeded subset), asking how much real data synthetic data stands in for.

Per regime: the teacher backbone (``models/dino_pretrain/<regime>/``, openable by timm), its CLS features of
the real splits and of every synthetic evaluation set (``data/dino_pretrain/features/<regime>.h5``), and a
weighted k-NN accuracy on the real valid split against the real train split at every epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.dataset import DataError, ImageSet, LABEL_NAMES, read_imageset


@dataclass(frozen=True)
class Regime:
    name: str
    kind: str  # random_init | real | synthetic | hybrid
    real_fraction: float  # of the real train split (0: none)
    synthetic_mode: str | None
    ratio: float  # share of synthetic images per batch

    @property
    def rung(self) -> str:
        return f"{round(100 * self.real_fraction)}%"


def regimes(dp) -> list[Regime]:
    """Every regime the params ask for, the floor first."""
    out = [Regime("random_init", "random_init", 0.0, None, 0.0), Regime("real", "real", 1.0, None, 0.0)]
    out += [Regime(f"synthetic_{m}", "synthetic", 0.0, m, 1.0) for m in dp.synthetic_modes]
    out.append(Regime("hybrid", "hybrid", 1.0, dp.hybrid_mode, dp.hybrid_ratio))
    for f in sorted(dp.ladder):
        pct = f"{100 * f:g}".replace(".", "_")
        out.append(Regime(f"real_{pct}pct", "real", f, None, 0.0))
        out.append(Regime(f"hybrid_{pct}pct", "hybrid", f, dp.hybrid_mode, dp.hybrid_ratio))
    return out


def ladder_subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified, seeded ``fraction`` of the indices of ``y`` (sorted); every class keeps at least one image
    or it is an error naming the fraction and the class."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        n = int(round(fraction * len(members)))
        if n < 1:
            raise DataError(f"dino_pretrain.ladder: fraction {fraction} leaves class {c} "
                            f"({LABEL_NAMES.get(int(c), c)}, {len(members)} images) empty")
        keep.append(rng.choice(members, n, replace=False))
    return np.sort(np.concatenate(keep))


def pretrain_set_path(root: Path, mode: str) -> Path:
    return root / "data" / "guided_sampling" / "pretrain" / f"{mode}.h5"


def load_synthetic(root: Path, modes: list[str], image_size: int) -> dict[str, ImageSet]:
    """guided_sampling's pretraining sets of ``modes``; a missing set or another image size is an error."""
    out = {}
    for m in modes:
        path = pretrain_set_path(root, m)
        if not path.is_file():
            raise DataError(f"{path}: dino_pretrain needs the synthetic pretraining set of mode '{m}', which "
                            "guided_sampling did not make (add it to guided_sampling.pretrain.modes and rerun)")
        ds = read_imageset(path)
        if ds.image_size != image_size:
            raise DataError(f"{path}: synthetic images are {ds.image_size} px, the real ones {image_size} px")
        out[m] = ds
    return out


def check_regime_data(name: str, real: np.ndarray, synthetic: np.ndarray, batch: int) -> None:
    n = len(real) + len(synthetic)
    if n < 2:
        raise DataError(f"regime '{name}': {n} training image(s); DINO needs at least 2")
    if batch > n:
        raise DataError(f"regime '{name}': {n} training images, fewer than one batch "
                        f"(dino_pretrain.dino.batch_size {batch})")


class KnnProbe:
    """The evaluation run at every epoch: weighted k-NN (``metrics.knn``) of the teacher's CLS features,
    real valid against real train (the memory bank, subsampled to ``max_train`` with a seed)."""

    def __init__(self, train: ImageSet, valid: ImageSet, k: int, temperature: float, device: str,
                 max_train: int | None = None, seed: int = 0):
        idx = np.arange(len(train))
        if max_train and max_train < len(train):
            idx = np.sort(np.random.default_rng(seed).choice(len(train), max_train, replace=False))
        self.bank = idx  # rows of the real train split in the memory bank
        self.train_x, self.train_y = train.x[idx], train.y[idx]
        self.valid_x, self.valid_y = valid.x, valid.y
        self.k, self.temperature, self.device = min(k, len(idx)), temperature, device

    def features(self, backbone, images):
        from ..prototypes.features import SelfTrained

        return SelfTrained(backbone, "")(images, device=self.device)

    def __call__(self, task) -> dict:
        """The evaluation of a DinoTask (its teacher backbone), as training.train_loop calls it."""
        return self.of_backbone(task.teacher.backbone)

    def correct(self, train_features: np.ndarray, valid_features: np.ndarray) -> np.ndarray:
        """Per valid image, whether the k-NN vote is right, from features of the whole real train split and
        of the valid split (as ``export`` writes them): the memory bank and vote of the evaluations."""
        from ..metrics.knn import knn_correct

        return knn_correct(train_features[self.bank], self.train_y, valid_features, self.valid_y, self.k, self.temperature)

    def of_backbone(self, bb) -> dict:
        from ..metrics.knn import knn_accuracy

        was = bb.training
        r = knn_accuracy(self.features(bb, self.train_x), self.train_y, self.features(bb, self.valid_x),
                         self.valid_y, self.k, self.temperature)
        bb.train(was)
        return {"knn_accuracy": r["accuracy"], "knn_ci95": r["ci95"], "knn_n": r["n"]}


def reference_of(regime: Regime, names: set[str]) -> str | None:
    """The real regime a synthetic or hybrid regime is judged against: ``real`` for the synthetic-only ones
    (the paper's claim: competitive with encoders trained on far more real data) and for ``hybrid``, the same
    ladder rung without synthetic data for ``hybrid_<p>pct``."""
    if regime.kind == "synthetic" or regime.name == "hybrid":
        return "real" if "real" in names else None
    if regime.kind == "hybrid":
        rung = regime.name.replace("hybrid_", "real_", 1)
        return rung if rung in names else None
    return None


def paired_knn_tests(correct: dict[str, np.ndarray], regimes: list[Regime], n_bootstrap: int, seed: int) -> dict:
    """Paired comparisons of the final k-NN decisions on the same real valid images (``metrics.knn.paired_accuracy``),
    two families, each Holm-corrected: every trained regime against the random-init floor (does pretraining
    learn?), and every synthetic or hybrid regime against its real reference (``reference_of``). Returns
    ``{regime: {"vs_floor": ..., "vs_real": ...}}`` with ``reading`` "above", "below" or "not distinguishable"
    (Holm p < 0.05 decides)."""
    from ..metrics.classification import holm
    from ..metrics.knn import paired_accuracy

    names = {r.name for r in regimes}
    if "random_init" not in correct:
        raise DataError("paired k-NN tests need the random_init regime (the floor)")
    families = {"vs_floor": [(r.name, "random_init") for r in regimes if r.kind != "random_init"],
                "vs_real": [(r.name, ref) for r in regimes if (ref := reference_of(r, names))]}
    out: dict[str, dict] = {r.name: {} for r in regimes}
    for family, pairs in families.items():
        tests = [paired_accuracy(correct[a], correct[b], n_bootstrap, seed) for a, b in pairs]
        for (a, b), t, p in zip(pairs, tests, holm([t["p_mcnemar"] for t in tests]) if tests else []):
            reading = "not distinguishable" if p >= 0.05 else ("above" if t["diff"] > 0 else "below")
            out[a][family] = {"against": b, **t, "p_holm": float(p), "reading": reading}
    return out


def random_backbone(cfg, image_size: int, seed: int):
    """The floor: the teacher backbone exactly as a DINO run of this seed starts (never trained)."""
    from .dino import DinoTask

    torch.manual_seed(seed)
    return DinoTask(cfg, image_size, steps_per_epoch=1).teacher.backbone.eval()


def run_regime(regime: Regime, real: ImageSet, synthetic: dict[str, ImageSet], dp, seed: int, root: Path,
               device: str, probe: KnnProbe, plots_dir: Path, progress=None) -> dict:
    """Train (or resume, or find finished) one regime; returns its backbone, evaluations and record.
    Every regime starts from the same initial weights and takes the same number of steps: an epoch is
    ``epoch_images`` images (default: one pass over the whole real train split), whatever the regime trains on."""
    import time

    from ..prototypes.features import data_fingerprint
    from ..training import params_hash
    from .dino import train_dino, world_size

    size = real.image_size
    steps_per_epoch = (dp.epoch_images or len(real)) // (dp.dino.batch_size * world_size())
    if regime.kind == "random_init":
        t0 = time.perf_counter()
        bb = random_backbone(dp.dino, size, seed)
        ev = {"step": 0, "images_seen": 0, **probe.of_backbone(bb)}
        return {"backbone": bb, "evals": [ev], "history": [], "images_seen": 0, "distinct": {"real": 0, "synthetic": 0},
                "steps": 0, "train_seconds": 0.0, "wall_seconds": time.perf_counter() - t0, "collapse": []}
    real_idx = (np.arange(len(real)) if regime.real_fraction >= 1 else np.arange(0) if regime.real_fraction == 0
                else ladder_subset(real.y, regime.real_fraction, seed))
    first = real.x[real_idx] if regime.real_fraction > 0 else synthetic[regime.synthetic_mode].x
    second = synthetic[regime.synthetic_mode].x if regime.kind == "hybrid" else None
    ratio = regime.ratio if regime.kind == "hybrid" else 0.0
    check_regime_data(regime.name, first, second if second is not None else first[:0], dp.dino.batch_size)
    run = params_hash({"dino": dp.dino.model_dump(mode="json"), "seed": seed, "regime": regime.name, "ratio": ratio,
                       "first": data_fingerprint(first), "second": data_fingerprint(second) if second is not None else None,
                       "steps_per_epoch": steps_per_epoch, "world": world_size()})
    t0 = time.perf_counter()
    out = train_dino(first, dp.dino, root / "checkpoints" / "dino_pretrain" / f"{regime.name}-{run}", seed, device,
                     plots_csv=plots_dir / f"loss_{regime.name}.csv", progress=progress, second=second, ratio=ratio,
                     steps_per_epoch=steps_per_epoch, evaluate=probe, run_hash=run, name=regime.name)
    synthetic_n = len(second) if second is not None else (len(first) if regime.kind == "synthetic" else 0)
    return {"backbone": out["backbone"], "evals": out["evals"], "history": out["history"],
            "images_seen": out["images_seen"], "steps": out["steps"], "collapse": out["collapse"],
            "distinct": {"real": int(len(real_idx)) if regime.real_fraction > 0 else 0, "synthetic": int(synthetic_n)},
            "train_seconds": out["train_seconds"], "wall_seconds": time.perf_counter() - t0}


def export(regime: Regime, backbone, dp, image_size: int, sets: dict[str, ImageSet], root: Path, device: str,
           progress=None) -> dict[str, np.ndarray]:
    """Save the regime's teacher backbone (timm-openable) and its CLS features of every named image set."""
    from ..data.features import FeatureSet, write_features
    from ..prototypes.features import SelfTrained, save_extractor

    save_extractor(backbone, dp.dino, image_size, root / "models" / "dino_pretrain" / regime.name,
                   extra={"regime": regime.name, "trained_on": regime.kind, "real_fraction": regime.real_fraction,
                          "synthetic_mode": regime.synthetic_mode, "ratio": regime.ratio})
    ext = SelfTrained(backbone, regime.name)
    feats = {name: ext(ds.x, device=device) for name, ds in sets.items()}
    write_features(root / "data" / "dino_pretrain" / "features" / f"{regime.name}.h5",
                   {name: FeatureSet(f, sets[name].y) for name, f in feats.items()},
                   {"backbone": f"models/dino_pretrain/{regime.name}", "regime": regime.name,
                    "feature_space": f"dino_pretrain:{regime.name} (teacher CLS token)"})
    return feats
