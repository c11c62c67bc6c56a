"""Slide-level evaluation by attention-based multiple-instance learning (ABMIL; Ilse, Tomczak & Welling 2018,
gated attention), as the prototype-guided paper evaluates its encoders on slides.

A bag is every patch of one slide (the official PCam ``_meta.csv`` names each patch's whole-slide image,
``wsi``); a slide is tumour if any of its patches is. Patch features are standardised on the training
patches; the model is trained on the training slides with a fixed budget and judged on test slides that
share no slide id with them (checked: PCam's splits are by slide). Written out because no maintained
package among the study's dependencies ships ABMIL; it is ~30 lines of torch.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .fidelity import MetricError


class ABMIL(nn.Module):
    def __init__(self, dim: int, hidden: int = 64, attention: int = 32, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Sequential(nn.Linear(hidden, attention), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(hidden, attention), nn.Sigmoid())
        self.attention_w = nn.Linear(attention, 1)
        self.head = nn.Linear(hidden, 1)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bag [n_patches, dim] -> (slide logit, attention weights [n_patches])."""
        h = self.embed(bag)
        a = torch.softmax(self.attention_w(self.attention_v(h) * self.attention_u(h)).squeeze(1), dim=0)
        return self.head(a @ h).squeeze(0), a


def slide_bags(features: np.ndarray, labels: np.ndarray, slides: np.ndarray) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """(bags of patch features, slide labels = any tumour patch, slide ids), slides in sorted order."""
    slides = np.asarray(slides).astype(str)
    if len(slides) != len(features) or len(labels) != len(features):
        raise MetricError(f"slide bags: {len(features)} features, {len(labels)} labels, {len(slides)} slide ids")
    ids = np.unique(slides)
    bags = [features[slides == s] for s in ids]
    return bags, np.array([int(labels[slides == s].max()) for s in ids]), ids


def slide_level(train: tuple, test: tuple, epochs: int = 40, lr: float = 5e-4, seed: int = 0) -> dict:
    """Train ABMIL on ``train`` = (features, labels, slide ids) and score the slides of ``test``.
    Returns slide ids, labels and P(tumour) of the test slides (AUROC and its CI are the caller's)."""
    tr_bags, tr_y, tr_ids = slide_bags(*train)
    te_bags, te_y, te_ids = slide_bags(*test)
    shared = sorted(set(tr_ids) & set(te_ids))
    if shared:
        raise MetricError(f"slide-level split: {len(shared)} slide(s) are in both train and test (e.g. {shared[:3]}); "
                          "a patient-level split needs disjoint slides")
    for name, y in (("train", tr_y), ("test", te_y)):
        if len(np.unique(y)) < 2:
            raise MetricError(f"slide-level {name} split: all {len(y)} slides have label {int(y[0])}; AUROC needs both")
    mu = train[0].mean(0)
    sd = train[0].std(0) + 1e-6
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ABMIL(train[0].shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    t_bags = [torch.as_tensor((b - mu) / sd, dtype=torch.float32) for b in tr_bags]
    pos = float(tr_y.mean())
    weight = torch.tensor([0.5 / (1 - pos), 0.5 / pos])  # balance the classes of slides
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(t_bags), generator=g).tolist():
            logit, _ = model(t_bags[i])
            y = torch.tensor(float(tr_y[i]))
            loss = weight[int(tr_y[i])] * nn.functional.binary_cross_entropy_with_logits(logit, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        p = np.array([torch.sigmoid(model(torch.as_tensor((b - mu) / sd, dtype=torch.float32))[0]).item() for b in te_bags])
    return {"slides": te_ids, "labels": te_y, "probability": p, "n_train_slides": len(tr_ids),
            "n_test_slides": len(te_ids), "epochs": epochs, "patches_per_test_slide": [len(b) for b in te_bags]}
