"""params.yaml + profiles -> validated settings.

One loader for every stage. The schema below describes every setting (types and bounds, no values); a
key that is not in it (a typo, a stale key) is an error that names the key before any compute starts.

Values have one source: ``profiles/defaults.yaml`` holds every setting (the values of the ``tiny``
profile) and is merged under whatever is validated, so a params file may leave settings out. Code and
tests that need one section build it with ``section("ldm_finetune.train", steps=5)``.

Profiles: ``profiles/<name>.yaml``
holds only what that profile changes. ``python -m pathsynth.config use NAME``
(``make profile PROFILE=NAME``) writes the merged result to ``params.yaml``, which is what DVC tracks,
so switching profiles is one command and DVC sees every changed value.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Annotated, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator


class ParamsError(ValueError):
    """A params file is missing, unreadable or does not match the schema."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# `dvc exp run -S` rewrites params.yaml with a YAML 1.2 writer that leaves `no` unquoted, which YAML 1.1
# readers (PyYAML) read back as false: false means "no" here, and nothing else is accepted
Precision = Annotated[Literal["no", "fp16", "bf16"], BeforeValidator(lambda v: "no" if v is False else v)]


# --------------------------------------------------------------------------------------- data
SOURCE_KINDS = ("phantom", "npz", "pcam_h5")


class Source(Strict):
    """Where the train/valid images come from."""

    kind: Literal["phantom", "npz", "pcam_h5"]
    path: Optional[str]  # npz: the .npz file; pcam_h5: the folder with the official files
    download: bool  # pcam_h5 only: fetch missing files from the official record (needs allow_network)
    counts: dict[str, Optional[int]]
    seed_offset: int  # phantom only: a different offset renders an independent cohort

    @model_validator(mode="after")
    def _check(self):
        if self.kind in ("npz", "pcam_h5") and not self.path:
            raise ValueError(f"source kind '{self.kind}' needs 'path'")
        if self.download and self.kind != "pcam_h5":
            raise ValueError("'download' is only for kind 'pcam_h5'")
        for split, n in self.counts.items():
            if split not in ("train", "valid", "test"):
                raise ValueError(f"counts: unknown split '{split}' (train, valid, test)")
            if n is not None and n < 0:
                raise ValueError(f"counts.{split} must be >= 0, got {n}")
        return self


class TestSource(Strict):
    """Where the test images come from, chosen independently of the train/valid source.

    same:    the train/valid source's own test split (phantom, official PCam);
    holdout: a stratified fraction of the train split, set aside before anything else sees it;
    phantom / npz / pcam_h5: an external cohort or file; ``split`` picks which of its splits.
    """

    kind: Literal["same", "holdout", "phantom", "npz", "pcam_h5"]
    path: Optional[str]
    split: str
    holdout_fraction: float = Field(gt=0.0, lt=1.0)
    download: bool
    counts: dict[str, Optional[int]]
    seed_offset: int

    @model_validator(mode="after")
    def _check(self):
        if self.kind in ("npz", "pcam_h5") and not self.path:
            raise ValueError(f"test kind '{self.kind}' needs 'path'")
        if self.split not in ("train", "valid", "test"):
            raise ValueError(f"test.split must be train, valid or test, got '{self.split}'")
        return self

    def as_source(self) -> Source:
        return Source(kind=self.kind, path=self.path, download=self.download, counts=self.counts,
                      seed_offset=self.seed_offset)


class Data(Strict):
    image_size: int = Field(ge=8, le=1024)  # every stage sees patches at this size
    source: Source
    test: TestSource


class FilterParams(Strict):
    """Outlier filter of the reference code (STUDY.md B.1), thresholds on 0-255 PIL HSV/grey."""

    enabled: bool
    min_mean_v: float
    min_mean_s: float
    min_std_v: float
    min_std_s: float
    min_std_h: float
    min_laplacian_var: float
    min_contours: int
    contour_threshold: int


class DataPrep(Strict):
    filter: FilterParams
    balance_classes: bool  # subsample each split to equal class counts
    max_per_class: dict[str, Optional[int]]
    examples_per_class: int = Field(ge=1, le=64)  # figure grid


# --------------------------------------------------------------------------------------- DINO
class Dino(Strict):
    """The study's DINO (used by the prototypes stage and the dino_pretrain stage)."""

    arch: str  # vit_tiny | vit_small | vit_base (timm VisionTransformer widths)
    depth: int = Field(ge=1, le=24)
    patch_size: int = Field(ge=2, le=32)
    out_dim: int = Field(ge=16)
    head_hidden_dim: int
    head_bottleneck_dim: int
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=2)
    lr: float  # at batch 256, scaled linearly as in DINO
    min_lr: float
    warmup_epochs: int
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    teacher_temp: float
    warmup_teacher_temp: float
    warmup_teacher_temp_epochs: int
    student_temp: float
    center_momentum: float
    clip_grad: float
    freeze_last_layer_epochs: int
    global_crop_scale: tuple[float, float]
    local_crop_scale: tuple[float, float]
    local_crops_number: int = Field(ge=0)
    local_crop_fraction: float = Field(gt=0, le=1)  # local crop side = fraction * image side
    mixed_precision: Precision
    log_every: int = Field(ge=1)
    checkpoint_every: int = Field(ge=1)  # steps: a kill loses at most this many


class Prototypes(Strict):
    extractor: Literal["self_trained", "pretrained"]
    pretrained: Optional[str]  # local folder/file or a hub id the user names (needs allow_network)
    pretrained_batch_size: int
    k: Optional[int]  # null = choose by the sweep
    k_sweep: list[int]
    sweep_criterion: Literal["silhouette", "davies_bouldin", "s_dbw"]
    n_init: int = Field(ge=1)  # k-means restarts for the prototypes (the reference code: 10)
    k_sweep_n_init: int = Field(ge=1)  # k-means restarts per K in the sweep (cheaper: the sweep only ranks K)
    k_sweep_max_points: int = Field(ge=10)  # the sweep scores a seeded subsample of this many training features
    silhouette_max_points: int = Field(ge=10)
    n_bootstrap: int = Field(ge=10)  # bootstrap resamples for the phantom's ARI CI
    dino: Dino
    montage_per_prototype: int = Field(ge=1)
    umap_max_points: int
    # prompt-balanced subset for the diffusion training set (reference code balancing.py)
    balance_min_prompts_per_class: int
    balance_max_images: Optional[int]  # null = as many as the balance allows


# --------------------------------------------------------------------------------------- LDM
class Loop(Strict):
    """Settings of the study's training loop (pathsynth.training.train_loop)."""

    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)  # per process
    lr: float = Field(gt=0)
    lr_schedule: Literal["constant", "cosine", "linear"]
    warmup_steps: int = Field(ge=0)
    grad_accum: int = Field(ge=1)
    clip_grad: Optional[float]
    weight_decay: float
    ema_decay: Optional[float]  # null = no EMA; with warm-up (diffusers EMAModel)
    mixed_precision: Precision
    use_8bit_adam: bool  # bitsandbytes, GPU only
    gradient_checkpointing: bool
    compile: bool  # torch.compile the model's compute modules in place (GPU profiles)
    channels_last: bool  # NHWC memory layout for convolutions (faster on tensor cores)
    measure_flops: bool  # on a GPU: count the step's model FLOPs once and report MFU
    checkpoint_every: int = Field(ge=1)
    keep_checkpoints: int = Field(ge=1)
    sample_every: int = Field(ge=0)  # 0 = only at the end
    log_every: int = Field(ge=1)


class VAEParams(Strict):
    block_out_channels: list[int]
    layers_per_block: int
    latent_channels: int
    kl_weight: float
    crop_size: Optional[int] = Field(ge=8)  # train on random crops of this side (whole patches are encoded); null = whole
    # Stable Diffusion's autoencoder loss beside L1 + KL (issue 14's VAE lever); 0 = off:
    disc_weight: float = Field(ge=0)  # PatchGAN hinge loss x taming's adaptive weight (SD: 0.5)
    disc_start: int = Field(ge=0)  # steps of reconstruction only before the discriminator's terms count
    perceptual_weight: float = Field(ge=0)  # distance in the prototypes stage's DINO features (SD: LPIPS, 1.0)
    train: Loop


class UNetParams(Strict):
    block_out_channels: list[int]
    layers_per_block: int
    attention_head_dim: int
    down_block_types: list[str]
    up_block_types: list[str]


class TextEncoderParams(Strict):
    hidden_size: int
    num_layers: int
    num_heads: int
    max_length: int


class ClassifierParams(Strict):
    channels: list[int]
    noise_bins: int = Field(ge=2)
    train: Loop


class LDMFinetune(Strict):
    regime: Literal["scratch", "finetune"]
    pretrained: Optional[str]  # finetune: a local Stable Diffusion folder, or a hub id with allow_network
    resolution: Optional[int]  # finetune: patches are resized to this (paper: 96 -> 512); null = data.image_size
    variants: list[Literal["baseline", "mep"]]
    use_balanced_subset: bool  # train the UNet on the prompt-balanced subset (reference code)
    cond_dropout: float = Field(ge=0, lt=1)  # empty prompt this often, for classifier-free guidance
    snr_gamma: Optional[float] = Field(gt=0)  # Min-SNR loss weighting (diffusers example: 5.0); null = plain MSE
    train_text_encoder: bool  # scratch only: the in-code CLIP text encoder is trained with the UNet
    vae: VAEParams
    unet: UNetParams
    text_encoder: TextEncoderParams
    train: Loop
    classifier: ClassifierParams
    sample_steps: int
    sample_guidance: float
    n_sample_seeds: int
    n_eval_images: int = Field(ge=1)  # valid patches for the VAE's PSNR/SSIM (at most the valid split)

    @model_validator(mode="after")
    def _check(self):
        if self.regime == "finetune" and not self.pretrained:
            raise ValueError("regime 'finetune' needs 'pretrained' (a Stable Diffusion folder or hub id)")
        if not self.variants:
            raise ValueError("'variants' must name at least one of baseline, mep")
        return self


# --------------------------------------------------------------------------------------- sampling
MODES = ("unguided", "cfg_baseline", "cfg_mep", "classifier", "cfg_mep_classifier")


class PretrainSets(Strict):
    """Synthetic sets made for dino_pretrain, apart from the evaluation sets (own counts and seeds)."""

    modes: list[Literal["unguided", "cfg_baseline", "cfg_mep", "classifier", "cfg_mep_classifier"]]
    n_per_mode: int = Field(ge=1)


class GuidedSampling(Strict):
    """Synthetic datasets, one per guidance mode (STUDY.md B.4, A.4).

    unguided: the mep model with the empty prompt; cfg_baseline / cfg_mep: classifier-free guidance on the
    baseline / morphology-enriched prompts (Osorio et al.); classifier: prototype classifier guidance on
    the unconditional model (our reading of Redekop et al.); cfg_mep_classifier: both."""

    modes: list[Literal["unguided", "cfg_baseline", "cfg_mep", "classifier", "cfg_mep_classifier"]]
    n_per_mode: int = Field(ge=1)
    sampler: Literal["ddim", "dpmsolver++"]
    steps: int = Field(ge=1)
    cfg_scale: float = Field(ge=0)  # the paper: 7.5 at SD scale
    classifier_scale: float = Field(ge=0)
    allocation: Literal["uniform", "proportional"]  # over prototypes
    balance_labels: bool
    shard_size: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    jpeg_quality: Optional[int] = Field(ge=1, le=100)  # e.g. 75: the encoding of pcam_ai4all (4:2:0)
    pretrain: PretrainSets


# --------------------------------------------------------------------------------------- DINO pretraining
Mode = Literal["unguided", "cfg_baseline", "cfg_mep", "classifier", "cfg_mep_classifier"]


class DinoPretrain(Strict):
    """DINO pretraining regimes at one budget of images seen (Redekop et al.; STUDY.md A.5, A.6): real only,
    synthetic only per mode, hybrid, a real-data ladder with and without synthetic data, random init."""

    synthetic_modes: list[Mode]  # one synthetic-only regime each, from guided_sampling.pretrain
    hybrid_mode: Mode  # the synthetic set mixed into the hybrid regimes
    hybrid_ratio: float = Field(ge=0.0, le=1.0)  # share of synthetic images in each hybrid batch
    ladder: list[float]  # fractions of the real train split below 1, each alone and with synthetic data
    dino: Dino  # the recipe of every regime (its epochs are of epoch_images images)
    epoch_images: Optional[int] = Field(ge=1)  # images per epoch of the recipe; null = the whole real train split
    knn_k: int = Field(ge=1)  # the DINO reference's eval_knn: 20
    knn_temperature: float = Field(gt=0)  # 0.07
    knn_max_train: Optional[int] = Field(ge=1)  # k-NN memory bank: a seeded subsample of real train; null = all
    n_bootstrap: int = Field(ge=10)  # paired bootstrap CI of k-NN accuracy differences (regime vs floor, vs real)
    umap_max_points: int = Field(ge=10)

    @model_validator(mode="after")
    def _check(self):
        for f in self.ladder:
            if not 0.0 < f < 1.0:
                raise ValueError(f"ladder: fraction {f} must be in (0, 1) (the whole split is the 'real' regime)")
        return self


# --------------------------------------------------------------------------------------- fidelity
class FidUmapCoverage(Strict):
    """Fidelity, diversity, coverage, memorisation and machine readers of every synthetic evaluation set."""

    n_reference: int = Field(ge=10)  # real train images (a seeded subsample) every set is compared with
    n_per_set: Optional[int] = Field(ge=10)  # images per set, the same for all (null: the smallest set / real valid)
    n_bootstrap: int = Field(ge=10)  # FD and FD-ratio bootstrap resamples, AUROC bootstrap
    kid_subsets: int = Field(ge=1)
    kid_subset_size: int = Field(ge=2)
    prdc_k: int = Field(ge=1)  # Naeem et al.: 5
    copy_quantile: float = Field(gt=0, lt=1)  # copy threshold: this quantile of real test-to-train distances
    c2st_test_fraction: float = Field(gt=0, lt=1)
    c2st_cnn_epochs: int = Field(ge=1)
    c2st_reader_seeds: int = Field(ge=1)  # each machine reader retrained under this many seeds (split, initialisation)
    inception_weights: Optional[str]  # local FID weights file (torch-fidelity's pt_inception-2015-12-05); null: no FID
    umap_max_points: int = Field(ge=10)
    n_closest_pairs: int = Field(ge=1)


# --------------------------------------------------------------------------------------- linear probes
class ExternalEncoder(Strict):
    """An encoder the user names by a local weights file: a timm model (ImageNet or a pathology model)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")  # its row in every table
    timm_model: str  # e.g. resnet50.a1_in1k, vit_large_patch16_224 (UNI)
    weights: str  # local file (safetensors or a torch state dict), relative to the study root or absolute
    kwargs: dict = {}  # extra timm.create_model arguments (e.g. UNI: init_values 1e-5, dynamic_img_size true)
    input_size: Optional[int] = Field(default=None, ge=8)  # null: the model's own input size


class Supervised(Strict):
    """The image-derived-prompt paper's supervised experiment: one small CNN recipe for every training set."""

    image_size: int = Field(ge=8)  # the classifier's input (area-downsampled from the study's images)
    steps: int = Field(ge=1)  # the same budget for every training set
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0)
    n_seeds: int = Field(ge=1)  # CNNs per training set (init, batch order, flips); the test score is their mean
    n_synthetic: Optional[int] = Field(ge=2)  # images per synthetic set (null: the smallest evaluation set)
    real_sizes: list[int]  # the real-only (and real + synthetic) ladder, besides the synthetic N and the whole split
    mixed_mode: Mode  # the synthetic set added to real data in the mixed runs


class LinearProbe(Strict):
    """Downstream evaluation on the real test split (eva protocol; STUDY.md A.6, B.6, B.9)."""

    backbones: Optional[list[str]]  # dino_pretrain regimes to probe (null: every regime it makes)
    external: list[ExternalEncoder]
    c_grid: list[float]  # logistic regression: inverse L2 strengths tried, chosen by real valid AUROC
    n_seeds: int = Field(ge=1)
    knn_k: int = Field(ge=1)
    knn_temperature: float = Field(gt=0)
    n_bootstrap: int = Field(ge=10)
    noninferiority_margin: float = Field(ge=0, lt=0.5)  # AUROC: "comparable" = lower CI of the difference above -margin
    supervised: Supervised
    mil_epochs: int = Field(ge=1)

    @model_validator(mode="after")
    def _check(self):
        if not self.c_grid or min(self.c_grid) <= 0:
            raise ValueError(f"c_grid: {self.c_grid} must be a non-empty list of positive numbers")
        names = [e.name for e in self.external]
        if len(set(names)) != len(names):
            raise ValueError(f"external: names must differ, got {names}")
        return self


# --------------------------------------------------------------------------------------- reader study
class ReaderStats(Strict):
    """A blinded reader-study packet, and the statistics of human and machine readers (STUDY.md B.8)."""

    sets: list[Mode]  # synthetic sets in the packet
    n_per_set: int = Field(ge=1)  # images of each set; as many real test images as synthetic ones in all
    display_px: int = Field(ge=32)  # on-screen size of a patch (an integer magnification of its native pixels)
    reads_dir: str  # the folder of exported reads CSVs, relative to the study root
    equivalence_margin: float = Field(gt=0, lt=0.5)  # TOST: accuracy within 0.5 +- margin counts as chance
    n_bootstrap: int = Field(ge=10)
    n_extreme: int = Field(ge=1)  # images shown as most often called real / synthetic


class Params(Strict):
    profile: str
    seed: int
    device: Literal["auto", "cpu", "cuda"]
    allow_network: bool  # nothing reaches the network unless this is true
    data: Data
    data_prep: DataPrep
    prototypes: Prototypes
    ldm_finetune: LDMFinetune
    guided_sampling: GuidedSampling
    dino_pretrain: DinoPretrain
    fid_umap_coverage: FidUmapCoverage
    linear_probe: LinearProbe
    reader_stats: ReaderStats

    @model_validator(mode="after")
    def _cross_check(self):
        made = self.guided_sampling.pretrain.modes
        for m in [*self.dino_pretrain.synthetic_modes, self.dino_pretrain.hybrid_mode]:
            if m not in made:
                raise ValueError(f"dino_pretrain names synthetic mode '{m}', which guided_sampling does not make "
                                 f"(guided_sampling.pretrain.modes: {list(made)})")
        own = [e.name for e in self.linear_probe.external
               if e.name in ("prototypes_dino", "random_init", "real", "hybrid") or e.name.startswith(("synthetic_", "real_", "hybrid_"))]
        if own:
            raise ValueError(f"linear_probe.external: names {own} are taken by the study's own backbones")
        absent = [m for m in self.reader_stats.sets if m not in self.guided_sampling.modes]
        if absent:
            raise ValueError(f"reader_stats.sets names {absent}, which guided_sampling does not make "
                             f"(guided_sampling.modes: {list(self.guided_sampling.modes)})")
        if self.linear_probe.supervised.mixed_mode not in self.guided_sampling.modes:
            raise ValueError(f"linear_probe.supervised.mixed_mode '{self.linear_probe.supervised.mixed_mode}' is not "
                             f"one of guided_sampling.modes {list(self.guided_sampling.modes)}")
        return self


# --------------------------------------------------------------------------------------- loading
def project_root(start: Path | None = None) -> Path:
    """The study's root: the folder with dvc.yaml and profiles/ (notebooks run from notebooks/ in
    JupyterLab and from the root under DVC)."""
    here = Path(start or Path.cwd()).resolve()
    for p in (here, *here.parents):
        if (p / "dvc.yaml").is_file() and (p / "profiles" / "defaults.yaml").is_file():
            return p
    raise ParamsError(f"no study root (dvc.yaml and profiles/defaults.yaml) in {here} or any parent folder")


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{loc}' (misspelled or not a setting of this study)")
        else:
            lines.append(f"'{loc}': {e['msg']} (got {e.get('input')!r})")
    return f"{origin}: " + "; ".join(lines)


# the one source of every setting's value: this copy of the study's profiles/defaults.yaml
DEFAULTS = Path(__file__).resolve().parents[2] / "profiles" / "defaults.yaml"


def default_values(defaults: Path | None = None) -> dict:
    return _read_yaml(Path(defaults or DEFAULTS))


def validate(raw: dict, origin: str = "params", defaults: Path | None = None) -> Params:
    """``raw`` merged over profiles/defaults.yaml, checked against the schema."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{origin}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(deep_merge(default_values(defaults), raw))
    except ValidationError as err:
        raise ParamsError(_format_errors(err, origin)) from None


def defaults() -> Params:
    """Every setting at its profiles/defaults.yaml value."""
    return validate({}, str(DEFAULTS))


def section(path: str, **overrides):
    """One validated section of the settings at its defaults.yaml values, with overrides (nested dicts
    merge): ``section("ldm_finetune.train", steps=5)`` is the UNet's training loop with 5 steps."""
    keys = path.split(".")
    raw: dict = overrides
    for k in reversed(keys):
        raw = {k: raw}
    out = validate(raw, f"section {path}")
    for k in keys:
        out = getattr(out, k)
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ParamsError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return raw


def load(path: str | Path | None = None) -> Params:
    path = Path(path) if path else project_root() / "params.yaml"
    own = path.parent / "profiles" / "defaults.yaml"  # the defaults of the study the params file belongs to
    return validate(_read_yaml(path), str(path), own if own.is_file() else None)


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def profile_params(name: str, root: Path | None = None) -> dict:
    root = root or project_root()
    pdir = root / "profiles"
    names = sorted(p.stem for p in pdir.glob("*.yaml") if p.stem != "defaults")
    if name not in names:
        raise ParamsError(f"unknown profile '{name}'; profiles are: {', '.join(names)}")
    merged = deep_merge(_read_yaml(pdir / "defaults.yaml"), _read_yaml(pdir / f"{name}.yaml"))
    merged["profile"] = name
    validate(merged, f"profiles/{name}.yaml", pdir / "defaults.yaml")  # fail before writing anything
    return merged


def use_profile(name: str, root: Path | None = None) -> Path:
    root = root or project_root()
    merged = profile_params(name, root)
    header = (f"# Generated from profiles/defaults.yaml + profiles/{name}.yaml by\n"
              f"#   make profile PROFILE={name}\n"
              "# Edit freely (or `dvc exp run -S key=value`); regenerate to go back to the profile.\n")
    out = root / "params.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(header + yaml.safe_dump(merged, sort_keys=False))
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "use":
        try:
            out = use_profile(argv[1])
        except ParamsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {out} for profile '{argv[1]}'")
        return 0
    if len(argv) == 1 and argv[0] == "check":
        try:
            p = load()
        except ParamsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"params.yaml is valid (profile '{p.profile}')")
        return 0
    print("usage: python -m pathsynth.config use PROFILE | check", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
