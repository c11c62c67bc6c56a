"""What every training loop of the study shares: checkpoints that rotate and resume, a guard that
refuses to resume under changed params, a stop on non-finite loss, and CSV logs for `dvc plots`.

Checkpoints are folders ``checkpoint-<step>/`` holding ``state.pt`` (models, optimisers, step,
random states) and ``params.json`` with the hash of the params that produced them. They are written
to a temporary folder and renamed, so a kill mid-save never leaves a checkpoint that looks complete.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import torch


class TrainingError(RuntimeError):
    pass


def params_hash(obj) -> str:
    """Stable hash of the settings that define a run (a pydantic model or a JSON-able dict)."""
    data = obj.model_dump(mode="json") if hasattr(obj, "model_dump") else obj
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


class Checkpoints:
    def __init__(self, folder: Path, run_hash: str, keep: int = 2):
        self.folder, self.hash, self.keep = Path(folder), run_hash, keep

    def list(self) -> list[Path]:
        found = [p for p in self.folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
        return sorted(found, key=lambda p: int(p.name.split("-")[-1]))

    def latest(self) -> Path | None:
        """The latest complete checkpoint, after checking it was made with the same params."""
        ckpts = self.list()
        if not ckpts:
            return None
        last = ckpts[-1]
        meta = json.loads((last / "params.json").read_text())
        if meta.get("params_hash") != self.hash:
            raise TrainingError(
                f"{last}: made with different params (hash {meta.get('params_hash')}, now {self.hash}); "
                f"refusing to resume. Delete {self.folder} to start over with the new params.")
        return last

    def save(self, step: int, state: dict, extra: dict | None = None) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"checkpoint-{step}"
        tmp = self.folder / f".tmp-checkpoint-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(state, tmp / "state.pt")
        (tmp / "params.json").write_text(json.dumps({"params_hash": self.hash, "step": step, **(extra or {})}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in self.list()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(path: Path) -> dict:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)


def check_finite(loss: float, step: int, last_good: Path | None) -> None:
    if not math.isfinite(loss) or abs(loss) > 1e6:
        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
        raise TrainingError(f"loss became {loss} at step {step}; training stopped ({where}). "
                            "Lower the learning rate or check the data.")


class CSVLog:
    """Append-only CSV (one row per logged step); on resume, rows past the resumed step are dropped."""

    def __init__(self, path: Path, fields: list[str], resume_step: int = 0):
        self.path, self.fields = Path(path), fields
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step and self.path.is_file():
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(float(r["step"])) <= resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)

    def write(self, **row) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.fields).writerow({k: row.get(k) for k in self.fields})
