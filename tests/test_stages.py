"""End-to-end: the stages run through DVC + papermill on a throw-away copy of the study."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pathsynth.data.dataset import read_imageset

from conftest import SMALL

pytestmark = pytest.mark.slow


def run(cmd, cwd):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


@pytest.fixture
def dvc_study(study):
    run(["git", "init", "-q"], study.root)
    run([sys.executable, "-m", "dvc", "init", "-q"], study.root)
    return study


def test_data_prep_through_dvc_and_papermill(dvc_study):
    s = dvc_study
    s.set_params(**SMALL)
    out = run([sys.executable, "-m", "dvc", "repro", "data_prep"], s.root)
    assert "Running stage 'data_prep'" in out
    m = json.loads((s.root / "metrics" / "data_prep.json").read_text())
    assert m["seed"] == 18021999 and m["image_size"] == 32
    for split in ("train", "valid", "test"):
        ds = read_imageset(s.root / "data" / "data_prep" / f"{split}.h5")
        assert ds.x.shape[1:] == (32, 32, 3) and len(ds) == m["n"][split]
        assert m["counts"][split]["final"]["healthy"] == m["counts"][split]["final"]["cancer"] == len(ds) // 2
        assert m["counts"][split]["raw"]["healthy"] + m["counts"][split]["raw"]["cancer"] == SMALL["data"]["source"]["counts"][split]
    assert m["phantom_filter_check"]["artefacts_removed"] == m["phantom_filter_check"]["artefacts"]
    for fig in ("examples", "colour"):
        assert (s.root / "reports" / "figures" / f"data_prep_{fig}.png").stat().st_size > 5000
    executed = json.loads((s.root / "reports" / "executed" / "01_data_prep.ipynb").read_text())
    assert not any(o.get("output_type") == "error" for c in executed["cells"] for o in c.get("outputs", []))
    # a second repro does nothing
    again = run([sys.executable, "-m", "dvc", "repro", "data_prep"], s.root)
    assert "Running stage" not in again and "didn't change" in again
    # a params change is seen by DVC
    s.set_params(**{**SMALL, "data_prep": {"examples_per_class": 4}})
    assert "data_prep" in run([sys.executable, "-m", "dvc", "status"], s.root)
