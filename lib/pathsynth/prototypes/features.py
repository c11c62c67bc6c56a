"""Feature extractors: the study's own DINO ViT, a pretrained DINO the user names for prototyping, or any
timm encoder the user names by a local weights file (linear_probe).

(a) ``self_trained`` (offline default): a DINO ViT trained by the prototypes stage on the real
    training split (``pathsynth.ssl.dino``), saved as ``config.json`` + ``model.safetensors``.
(b) ``pretrained``: a Hugging Face DINO ViT (the paper: ``facebook/dino-vitb8``, CLS token of
    ``last_hidden_state``) from a local folder, or from the hub only when the user named the id and
    set ``allow_network: true``. Pixels are given to the image processor as uint8 arrays, so its
    1/255 rescale is applied once (the reference code rescaled twice; STUDY.md B.2).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import Dino
from ..ssl.augment import normalise
from ..ssl.dino import build_vit


class ExtractorError(ValueError):
    pass


TIMM_NAMES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}


def save_extractor(backbone: torch.nn.Module, cfg: Dino, image_size: int, folder: Path, extra: dict | None = None) -> Path:
    """The backbone as ``model.safetensors`` + ``config.json``, which names the timm model and its
    arguments, so timm opens it too: ``timm.create_model(conf["timm_name"], pretrained=True,
    pretrained_cfg_overlay=dict(file=".../model.safetensors"), **conf["timm_kwargs"])``."""
    folder.mkdir(parents=True, exist_ok=True)
    conf = {"kind": "pathsynth-dino", "arch": cfg.arch, "depth": cfg.depth, "patch_size": cfg.patch_size,
            "image_size": image_size, "timm_name": TIMM_NAMES[cfg.arch],
            "timm_kwargs": {"img_size": image_size, "patch_size": cfg.patch_size, "depth": cfg.depth,
                            "num_classes": 0, "global_pool": "token", "dynamic_img_size": True}, **(extra or {})}
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(conf, indent=2))
    return folder


def _in_batches(images: np.ndarray, batch_size: int, fn, progress=None) -> np.ndarray:
    """fn over uint8 batches, with progress, stacked into one float array."""
    starts = range(0, len(images), batch_size)
    it = progress(starts, desc="features", unit="batch") if progress else starts
    return torch.cat([fn(images[s:s + batch_size]).float().cpu() for s in it]).numpy()


class SelfTrained:
    """The study's DINO backbone; features = CLS token of ImageNet-normalised [0,1] pixels."""

    def __init__(self, backbone: torch.nn.Module, description: str):
        self.backbone, self.description = backbone.eval(), description

    @classmethod
    def load(cls, folder: Path) -> "SelfTrained":
        folder = Path(folder)
        cfile = folder / "config.json"
        if not cfile.is_file():
            raise ExtractorError(f"{folder}: no config.json (not a saved pathsynth extractor)")
        conf = json.loads(cfile.read_text())
        bb = build_vit(conf["arch"], conf["depth"], conf["patch_size"], conf["image_size"])
        try:
            state = load_file(folder / "model.safetensors")
            bb.load_state_dict(state, strict=True)
        except (RuntimeError, OSError) as err:
            raise ExtractorError(f"{folder / 'model.safetensors'}: weights do not match the architecture "
                                 f"in config.json ({conf['arch']}, depth {conf['depth']}, patch {conf['patch_size']}): "
                                 f"{str(err).splitlines()[0]}") from None
        return cls(bb, f"pathsynth DINO {conf['arch']}/{conf['patch_size']} depth {conf['depth']} ({folder})")

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 256, device: str = "cpu", progress=None) -> np.ndarray:
        self.backbone.to(device)

        def cls(batch):
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            return self.backbone(normalise(x))

        return _in_batches(images, batch_size, cls, progress)


class Pretrained:
    """A Hugging Face DINO ViT (e.g. facebook/dino-vitb8); features = CLS of last_hidden_state."""

    def __init__(self, spec: str, allow_network: bool, root: Path, batch_size: int = 92):
        from transformers import AutoImageProcessor, ViTModel

        self.batch_size = batch_size  # prototypes.pretrained_batch_size
        from ..runtime import resolve_weights

        try:
            src, kwargs = resolve_weights(spec, allow_network, root, "prototypes.pretrained")
        except FileNotFoundError as err:
            raise ExtractorError(str(err)) from None
        try:
            self.processor = AutoImageProcessor.from_pretrained(src, **kwargs)
            self.model = ViTModel.from_pretrained(src, add_pooling_layer=False, **kwargs).eval()
        except (OSError, ValueError) as err:
            raise ExtractorError(f"prototypes.pretrained: cannot load '{spec}' as a ViT: {str(err).splitlines()[0]}") from None
        self.description = f"pretrained {spec}"

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int | None = None, device: str = "cpu", progress=None) -> np.ndarray:
        self.model.to(device)
        batch_size = batch_size or self.batch_size

        def cls(batch):
            # uint8 input: the processor's rescale (1/255) is then applied exactly once
            inputs = self.processor(images=list(batch), return_tensors="pt")
            return self.model(pixel_values=inputs["pixel_values"].to(device)).last_hidden_state[:, 0]

        return _in_batches(images, batch_size, cls, progress)


class TimmEncoder:
    """An encoder the user names by a local weights file: any timm model (an ImageNet model, or a pathology
    model published as timm weights). Images are resized to the model's input size and normalised with its
    own mean and std; features = its pooled output (``num_classes=0``). Nothing is downloaded: a missing
    file is an error naming the setting."""

    def __init__(self, name: str, timm_model: str, weights: str | Path, root: Path, kwargs: dict | None = None,
                 input_size: int | None = None, setting: str = "linear_probe.external"):
        import timm
        from timm.data import resolve_data_config

        path = Path(weights).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise ExtractorError(f"{setting} '{name}': weights file {path} does not exist")
        try:
            self.model = timm.create_model(timm_model, pretrained=True, num_classes=0,
                                           pretrained_cfg_overlay={"file": str(path)}, **(kwargs or {})).eval()
        except (RuntimeError, OSError, ValueError, KeyError) as err:
            raise ExtractorError(f"{setting} '{name}': cannot load {path} as timm model '{timm_model}': "
                                 f"{str(err).splitlines()[0]}") from None
        cfg = resolve_data_config({}, model=self.model)
        self.input_size = int(input_size or cfg["input_size"][-1])
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
        self.description = f"{name}: timm {timm_model} from {path} at {self.input_size} px"

    @torch.no_grad()
    def __call__(self, images: np.ndarray, batch_size: int = 64, device: str = "cpu", progress=None) -> np.ndarray:
        self.model.to(device)

        def pooled(batch):
            x = torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)
            if x.shape[-1] != self.input_size:
                x = torch.nn.functional.interpolate(x, size=(self.input_size,) * 2, mode="bilinear", antialias=True,
                                                    align_corners=False)
            return self.model(((x - self.mean) / self.std).to(device))

        return _in_batches(images, batch_size, pooled, progress)


def data_fingerprint(images: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()[:16]


def build_extractor(params, train_images: np.ndarray, root: Path, models_dir: Path, plots_dir: Path,
                    device: str, progress=None):
    """The extractor the params ask for: load the pretrained one, or train the study's DINO on the
    real training images (resuming from ``checkpoints/prototypes/dino-<hash>/`` after a kill) and
    save it to ``models_dir/extractor``. Returns (extractor, training summary or None)."""
    from ..ssl.dino import train_dino
    from ..training import params_hash

    pp = params.prototypes
    if pp.extractor == "pretrained":
        if not pp.pretrained:
            raise ExtractorError("prototypes.extractor is 'pretrained' but prototypes.pretrained is not set")
        return load_extractor(params, root), None
    run = params_hash({"dino": pp.dino.model_dump(mode="json"), "seed": params.seed,
                       "data": data_fingerprint(train_images)})
    out = train_dino(train_images, pp.dino, root / "checkpoints" / "prototypes" / f"dino-{run}", params.seed,
                     device, plots_csv=plots_dir / "dino_loss.csv", progress=progress)
    folder = save_extractor(out["backbone"], pp.dino, int(train_images.shape[1]), models_dir / "extractor")
    ext = SelfTrained(out["backbone"], f"self-trained DINO {pp.dino.arch}/{pp.dino.patch_size} depth "
                                       f"{pp.dino.depth} on the real train split ({folder.name})")
    return ext, out


def load_extractor(params, root: Path):
    """The prototypes stage's extractor for later stages: the pretrained one the params name (with
    ``prototypes.pretrained_batch_size``), or the study's DINO saved in ``models/prototypes/extractor``."""
    pp = params.prototypes
    if pp.extractor == "pretrained":
        if not pp.pretrained:
            raise ExtractorError("prototypes.extractor is 'pretrained' but prototypes.pretrained is not set")
        return Pretrained(pp.pretrained, params.allow_network, root, pp.pretrained_batch_size)
    return SelfTrained.load(root / "models" / "prototypes" / "extractor")


def check_extractor_params(params, root: Path) -> None:
    """Cheap checks before any compute: a pretrained extractor is loaded (a bad path, a hub id
    without network or weights that do not fit fail here), a self-trained one must fit the image size."""
    pp = params.prototypes
    if pp.extractor == "pretrained":
        load_extractor(params, root)
    elif params.data.image_size % pp.dino.patch_size:
        raise ExtractorError(f"data.image_size {params.data.image_size} is not a multiple of "
                             f"prototypes.dino.patch_size {pp.dino.patch_size}")
