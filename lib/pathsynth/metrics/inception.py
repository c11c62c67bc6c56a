"""The standard Inception FID feature space, only from a weights file the user gives.

``inception_features`` runs torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's port of the TF
Inception v3 of the FID reference, 2048-d pool features, its own resize to 299 px) with
``feature_extractor_weights_path``: the FID weights file (torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth``) placed locally. Without the file nothing is computed and
the metrics say "not computed: no Inception weights"; nothing is downloaded and no other network stands in.
An FD in this space with those weights is the standard FID (``fid_inception``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .fidelity import MetricError

NOT_COMPUTED = "not computed: no Inception weights"


def inception_weights(path: str | Path | None, root: Path) -> Path | None:
    """The weights file, or None where the user gave none; a path given but missing is an error."""
    if not path:
        return None
    p = Path(path).expanduser()
    p = p if p.is_absolute() else root / p
    if not p.is_file():
        raise MetricError(f"Inception weights '{path}' not found ({p}); give the local FID weights file "
                          "(weights-inception-2015-12-05-6726825d.pth) or set it to null")
    return p


@torch.no_grad()
def inception_features(images: np.ndarray, weights: Path, batch_size: int = 64, device: str = "cpu",
                       progress=None) -> np.ndarray:
    """2048-d pool3 features of uint8 [N, H, W, 3] images."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                             feature_extractor_weights_path=str(weights)).to(device).eval()
    starts = range(0, len(images), batch_size)
    out = []
    for s in (progress(starts, desc="inception", unit="batch") if progress else starts):
        x = torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).permute(0, 3, 1, 2).to(device)
        out.append(net(x).double().cpu())
    return torch.cat(out).numpy()
