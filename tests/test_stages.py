"""End-to-end: the stages run through DVC + papermill on a throw-away copy of the study."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pathsynth.data.dataset import read_imageset

from conftest import SMALL, wilson
from pathsynth.diffusion import sampling as S

pytestmark = pytest.mark.slow


def run(cmd, cwd):
    # the study copy lives outside the checkout, so bin/stage is told the interpreter (PATHSYNTH_PYTHON);
    # from the checkout itself it finds .venv on its own (tests/test_dvc_stages.py, and CI's make repro)
    env = {**os.environ, "PATHSYNTH_PYTHON": sys.executable,
           "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1", "MPLBACKEND": "Agg"}
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"{cmd} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


@pytest.fixture
def dvc_study(study):
    run(["git", "init", "-q"], study.root)
    run([sys.executable, "-m", "dvc", "init", "-q"], study.root)
    import shutil

    from conftest import ROOT

    shutil.copytree(ROOT / ".dvc" / "plots", study.root / ".dvc" / "plots")  # the offline `dvc plots show` page
    shutil.copy(ROOT / ".dvc" / "config", study.root / ".dvc" / "config")
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


SMALL_PROTO = {**SMALL, "prototypes": {
    "k": 5, "k_sweep": [3, 5, 8], "umap_max_points": 300, "balance_min_prompts_per_class": 2, "n_init": 4,
    "dino": {"depth": 2, "epochs": 3, "out_dim": 256, "head_hidden_dim": 128, "head_bottleneck_dim": 64,
             "batch_size": 32, "local_crops_number": 2, "lr": 0.002}}}


SMALL_LDM = {**SMALL_PROTO, "ldm_finetune": {
    "vae": {"train": {"steps": 20, "batch_size": 16, "checkpoint_every": 10, "log_every": 5}},
    "train": {"steps": 20, "batch_size": 16, "checkpoint_every": 10, "sample_every": 10, "log_every": 5, "warmup_steps": 0},
    "classifier": {"noise_bins": 4, "train": {"steps": 20, "batch_size": 16, "checkpoint_every": 10, "log_every": 5}},
    "n_sample_seeds": 2, "sample_steps": 4}}


SMALL_ALL = {**SMALL_LDM,
             "guided_sampling": {"n_per_mode": 8, "steps": 3, "shard_size": 4, "batch_size": 4, "pretrain": {"n_per_mode": 24}},
             "dino_pretrain": {"ladder": [0.25], "umap_max_points": 40, "epoch_images": None, "dino": {
                 "depth": 1, "epochs": 2, "out_dim": 128, "head_hidden_dim": 64, "head_bottleneck_dim": 32,
                 "batch_size": 16, "log_every": 2, "checkpoint_every": 4}},
             "fid_umap_coverage": {"n_bootstrap": 20, "kid_subsets": 5, "kid_subset_size": 6, "c2st_cnn_epochs": 2,
                                   "c2st_reader_seeds": 2, "umap_max_points": 60, "n_closest_pairs": 4},
             "linear_probe": {"n_bootstrap": 50, "n_seeds": 2, "c_grid": [0.1, 1.0],
                              "supervised": {"steps": 10, "batch_size": 8, "real_sizes": [4, 16], "n_seeds": 2}},
             "reader_stats": {"n_per_set": 4, "n_bootstrap": 50, "n_extreme": 3}}


def test_study_through_dvc_and_papermill(dvc_study):
    """data_prep -> prototypes -> ldm_finetune -> guided_sampling -> dino_pretrain -> fid_umap_coverage -> linear_probe -> reader_stats on small
    settings, then a no-op repro."""
    from pathsynth.prototypes.features import SelfTrained
    from pathsynth.prototypes.prompts import mep_prompt

    s = dvc_study
    s.set_params(**SMALL_ALL)
    run([sys.executable, "-m", "dvc", "repro", "guided_sampling"], s.root)
    m = json.loads((s.root / "metrics" / "prototypes.json").read_text())
    assert m["k"] == 5 and m["extractor_kind"] == "self_trained" and m["seed"] == 18021999
    assert m["n_prompts_mep"] <= 10 and m["n_prompts_baseline"] == 2
    assert m["dino"]["collapse_warnings"] == []
    # The phantom has 5 true morphology types. Chance level of the ARI is 0 and its bootstrap spread at
    # N ~ 150 is a few hundredths; a 3-epoch, depth-2 DINO reaches ~0.3 here (the tiny profile ~0.37),
    # so 0.15 is far above chance while leaving room for seed-to-seed variation.
    rec = m["phantom_recovery"]
    assert rec["ari"] > 0.15 and rec["ari_ci95"][0] > 0.05 and rec["nmi"] > 0.2, rec
    import pandas as pd

    t = pd.read_csv(s.root / "data" / "prototypes" / "prompts_train.csv")
    assert len(t) == m["n"]["train"] and t.in_balanced_subset.sum() == m["balanced_subset"]["n_images"]
    row = t.iloc[0]
    assert row.prompt_mep == mep_prompt(row.label, row.prototype)
    ext = SelfTrained.load(s.root / "models" / "prototypes" / "extractor")
    feats = np.load(s.root / "data" / "prototypes" / "features_valid.npy")
    valid = read_imageset(s.root / "data" / "data_prep" / "valid.h5")
    np.testing.assert_allclose(ext(valid.x[:8]), feats[:8], rtol=1e-4, atol=1e-5)
    for fig in ("montage", "umap", "k_sweep", "sizes", "dino_loss"):
        assert (s.root / "reports" / "figures" / f"prototypes_{fig}.png").stat().st_size > 5000
    # ldm_finetune: both variants load with plain diffusers and generate; the classifier loads and is reported
    from diffusers import StableDiffusionPipeline

    from pathsynth.diffusion.classifier import NoisyLatentClassifier

    lm = json.loads((s.root / "metrics" / "ldm_finetune.json").read_text())
    assert set(lm["unet"]) == {"baseline", "mep"} and lm["unet"]["mep"]["steps"] == 20
    assert lm["vae"]["reconstruction_valid"]["n"] == m["n"]["valid"] and lm["vae"]["reconstruction_valid"]["psnr"] > 10
    assert len(lm["classifier"]["accuracy_by_t"]) == 4 and lm["classifier"]["k"] == 5
    pipe = StableDiffusionPipeline.from_pretrained(s.root / "models" / "ldm_finetune" / "mep")
    img = pipe(prompt=[t.prompt_mep.iloc[0]], num_inference_steps=2, guidance_scale=2.0, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 32, 32, 3) and np.isfinite(img).all()
    assert NoisyLatentClassifier.from_pretrained(s.root / "models" / "ldm_finetune" / "prototype_classifier").config.num_classes == 5
    assert sorted(p.name for p in (s.root / "models" / "ldm_finetune" / "samples" / "mep").iterdir()) == [
        "step-000010.png", "step-000020.png"]
    for fig in ("vae", "classifier", "loss", "samples"):
        assert (s.root / "reports" / "figures" / f"ldm_finetune_{fig}.png").stat().st_size > 5000
    # guided_sampling: one image set per mode, complete metadata, hit rates with CIs
    gm = json.loads((s.root / "metrics" / "guided_sampling.json").read_text())
    modes = ["unguided", "cfg_baseline", "cfg_mep", "classifier", "cfg_mep_classifier"]
    assert sorted(gm["prototype_hit_rate"]) == sorted(modes) and gm["n_per_mode"] == 8
    for mode in modes:
        ds = read_imageset(s.root / "data" / "guided_sampling" / f"{mode}.h5")
        assert ds.x.shape == (8, 32, 32, 3) and (ds.meta["guidance_mode"] == mode).all()
        r = gm["prototype_hit_rate"][mode]
        assert r["n"] == 8 and r["ci95"] == pytest.approx(list(wilson(round(r["rate"] * 8), 8)))
        hits = np.isclose(r["rate"] * 8, round(r["rate"] * 8))
        assert hits  # a rate of whole images out of 8
        mr = gm["morphology_hit_rate"][mode]  # the phantom's ground-truth judge
        assert mr["n"] == 8 and mr["ci95"] == pytest.approx(list(wilson(round(mr["rate"] * 8), 8)))
    # chance comes from the allocation made and the real prototype frequencies
    asked = read_imageset(s.root / "data" / "guided_sampling" / "classifier.h5").meta["prototype"]
    assert gm["chance"] == pytest.approx(S.chance_hit_rate(asked, t.prototype.to_numpy()))
    for fig in ("modes", "prompts", "prototypes", "hit_rate"):
        assert (s.root / "reports" / "figures" / f"guided_sampling_{fig}.png").stat().st_size > 3000
    # the pretraining sets: own seeds, none shared with the evaluation sets
    pre = read_imageset(s.root / "data" / "guided_sampling" / "pretrain" / "classifier.h5")
    assert len(pre) == 24 and not set(pre.meta["seed"]) & set(asked_seeds := read_imageset(
        s.root / "data" / "guided_sampling" / "classifier.h5").meta["seed"]) and len(asked_seeds) == 8
    # dino_pretrain: every regime, one budget, features for every split and set, timm-openable backbones
    run([sys.executable, "-m", "dvc", "repro", "dino_pretrain"], s.root)
    dm = json.loads((s.root / "metrics" / "dino_pretrain.json").read_text())
    regimes = ["random_init", "real", "synthetic_classifier", "synthetic_cfg_mep", "hybrid", "real_25pct", "hybrid_25pct"]
    assert list(dm["regimes"]) == regimes
    n_train = m["n"]["train"]
    budget = 2 * (n_train // 16) * 16
    for name in regimes[1:]:
        r = dm["regimes"][name]
        assert r["images_seen"] == budget and r["knn"]["n"] == m["n"]["valid"], name
        assert [c["images_seen"] for c in r["knn_curve"]] == [0, budget // 2, budget]
        assert 0 <= r["knn"]["ci95"][0] <= r["knn"]["accuracy"] <= r["knn"]["ci95"][1] <= 1
    assert dm["regimes"]["real"]["distinct_images"] == {"real": n_train, "synthetic": 0}
    assert dm["regimes"]["synthetic_classifier"]["distinct_images"] == {"real": 0, "synthetic": 24}
    assert dm["regimes"]["hybrid_25pct"]["distinct_images"]["real"] < n_train // 3
    from pathsynth.data.features import read_features

    for name in regimes:
        sets, attrs = read_features(s.root / "data" / "dino_pretrain" / "features" / f"{name}.h5")
        assert set(sets) == {"real_train", "real_valid", "real_test", *(f"synthetic_{m_}" for m_ in modes)}
        assert len(sets["real_test"]) == m["n"]["test"] and attrs["regime"] == name
    f_real = read_features(s.root / "data" / "dino_pretrain" / "features" / "real.h5")[0]["real_valid"].features
    back = SelfTrained.load(s.root / "models" / "dino_pretrain" / "real")(valid.x)
    np.testing.assert_allclose(back, f_real, rtol=1e-4, atol=1e-5)
    for fig in ("knn", "ladder", "umap"):
        assert (s.root / "reports" / "figures" / f"dino_pretrain_{fig}.png").stat().st_size > 5000
    # fid_umap_coverage: every set in two named spaces at one N with CIs, the ratio, audit, readers
    run([sys.executable, "-m", "dvc", "repro", "fid_umap_coverage"], s.root)
    fm = json.loads((s.root / "metrics" / "fid_umap_coverage.json").read_text())
    assert fm["n_per_set"] == 8 and fm["fid_inception"] == "not computed: no Inception weights"
    for space in ("fd_dino", "fd_dino_real"):
        assert set(fm[space]) == {"real_valid", *modes}
        for r in fm[space].values():
            assert 0 <= r["fd"]["ci95"][0] <= r["fd"]["ci95"][1] and 0 <= r["coverage"] <= 1
    assert set(fm["fd_ratio_cfg_mep_over_cfg_baseline"]) == {"dino", "dino_real"}
    assert set(fm["hit_rate_independent"]) == set(modes) and set(fm["memorisation"]) == set(modes)
    from pathsynth.metrics.readers import READS_COLUMNS

    for mode in modes:
        for reader in ("c2st_linear_dino_real", "c2st_cnn_pixels"):
            reads = pd.read_csv(s.root / "data" / "fid_umap_coverage" / "machine_reads" / f"{reader}_{mode}.csv")
            assert list(reads.columns) == READS_COLUMNS and len(reads) == 8  # half of 8 + 8 held out
        for reader in fm["machine_readers"][mode].values():  # every reader retrained under 2 seeds, the first one's kept
            rs = reader["reader_seeds"]
            assert rs["n"] == 2 and len(set(rs["seeds"])) == 2 and rs["auroc"][0] == reader["auroc"]
            assert 0 <= rs["min"] <= rs["median"] <= rs["max"] <= 1
    c2st = pd.read_csv(s.root / "plots" / "fid_umap_coverage" / "c2st.csv")
    assert len(c2st) == len(modes) * 2 * 2 and set(c2st.reader_seed) == {0, 1}
    for fig in ("fd", "coverage_by_prototype", "umap", "memorisation", "c2st"):
        assert (s.root / "reports" / "figures" / f"fid_umap_coverage_{fig}.png").stat().st_size > 5000
    # linear_probe: every backbone probed with CIs and paired tests; the supervised runs; no slide ids here
    run([sys.executable, "-m", "dvc", "repro", "linear_probe"], s.root)
    lm = json.loads((s.root / "metrics" / "linear_probe.json").read_text())
    assert list(lm["backbones"]) == [*regimes, "prototypes_dino"]
    n_test = m["n"]["test"]
    for name, b in lm["backbones"].items():
        for probe in ("linear", "knn"):
            for metric in ("auroc", "balanced_accuracy", "f1"):
                r = b[probe][metric]
                assert 0 <= r["ci95"][0] <= r["value"] <= r["ci95"][1] <= 1, (name, probe, metric)
            assert b[probe]["n"] == n_test
        assert b["linear"]["n_seeds"] == 2 and b["linear"]["C"] in (0.1, 1.0)
    assert {(c["a"], c["b"]) for c in lm["paired"]} >= {("synthetic_classifier", "real"), ("hybrid_25pct", "real_25pct")}
    assert all(c["reading"] in ("better", "comparable", "not shown", "worse") and c["auroc_p_holm"] >= c["auroc_p"]
               for c in lm["paired"])
    runs = lm["supervised"]["runs"]
    n_syn = lm["supervised"]["n_synthetic"]
    # two disjoint draws of the 8 images of each set, one CNN each: 4 per draw
    assert n_syn == 4 and {f"synthetic:{m_}" for m_ in modes} | {"real:4", "real:16", "real+cfg_mep:16"} <= set(runs)
    assert runs["real+cfg_mep:16"]["n_real"] == 16 and runs["real+cfg_mep:16"]["n_synthetic"] == 4
    assert all(r["draws"]["n"] == 2 and r["draws"]["min"] <= r["draws"]["mean"] <= r["draws"]["max"] for r in runs.values())
    assert all(runs[f"synthetic:{m_}"]["draws"]["disjoint"] for m_ in modes) and runs["real:4"]["draws"]["disjoint"]
    whole = max(int(k.split(":")[1]) for k in runs if k.startswith("real:"))
    assert not runs[f"real:{whole}"]["draws"]["disjoint"]  # the whole split: every draw is all of it
    assert len(set(lm["supervised"]["recipe"]["seeds"])) == 2
    assert lm["slide_level"] == {"computed": False, "reason": "not computed: no slide ids (the data carry no meta/wsi)"}
    scores = pd.read_csv(s.root / "data" / "linear_probe" / "test_scores.csv")
    assert len(scores) == n_test and "linear:real" in scores and "cnn:synthetic:cfg_mep" in scores
    for name, r in runs.items():  # the metrics' AUROC is that of the kept score (the draws' mean probability), which
        # the CSV keeps to the last digit (6 digits tied near-equal scores of these 10-step CNNs, and the report refused)
        assert r["auroc"]["value"] == pytest.approx(roc_auc_score(scores.label, scores[f"cnn:{name}"]), abs=1e-9)
    for fig in ("forest", "roc", "efficiency"):
        assert (s.root / "reports" / "figures" / f"linear_probe_{fig}.png").stat().st_size > 5000
    # reader_stats: the packet, and the machine readers analysed like humans; then a human reads CSV is picked up
    run([sys.executable, "-m", "dvc", "repro", "reader_stats"], s.root)
    rm = json.loads((s.root / "metrics" / "reader_stats.json").read_text())
    assert rm["packet"]["n_images"] == 16 and rm["packet"]["n_synthetic"] == 8 and rm["reads"]["human_readers"] == 0
    assert rm["reads"]["machine_readers"] == 2 * len(modes) and rm["medians"]["human"]["n_readers"] == 0
    assert all(r["kind"] == "machine" and r["n"] == 8 for r in rm["readers"].values())
    key = pd.read_csv(s.root / rm["packet"]["key"], dtype={"image_id": str})
    page = (s.root / rm["packet"]["page"]).read_text()
    assert not any(w in page for w in ("cfg_mep", "classifier", "real_test", "key.csv"))
    for fig in ("kappa", "readers", "extremes"):
        assert (s.root / "reports" / "figures" / f"reader_stats_{fig}.png").stat().st_size > 3000
    reads = pd.DataFrame({"reader_id": "dr-a", "packet_id": key.packet_id, "image_id": key.image_id,
                          "answer": key.truth, "confidence": 4, "time_s": 2.0, "tissue": ""})
    reads.to_csv(s.root / "data" / "reader_stats" / "reads" / "dr-a.csv", index=False)
    assert "Running stage 'reader_stats'" in run([sys.executable, "-m", "dvc", "repro", "reader_stats"], s.root)
    rm = json.loads((s.root / "metrics" / "reader_stats.json").read_text())
    assert rm["reads"]["human_readers"] == 1 and rm["readers"]["dr-a"]["accuracy"] == 1.0
    assert rm["medians"]["human"] == {"n_readers": 1, "sensitivity": 1.0, "specificity": 1.0}
    (s.root / "data" / "reader_stats" / "reads" / "dr-a.csv").unlink()
    out = run([sys.executable, "-m", "dvc", "repro"], s.root)  # back to the machine readers alone; then the report
    assert "Running stage 'report'" in out
    assert "Running stage" not in run([sys.executable, "-m", "dvc", "repro"], s.root)
    # report: every claim row filled or saying why not, the HTML offline, every figure it names present
    from pathsynth.report.claims import NOT_SUPPORTED, NOT_TESTABLE, SUPPORTED
    from pathsynth.report.render import check_offline

    rep = json.loads((s.root / "metrics" / "report.json").read_text())
    assert len(rep["claims"]) >= 8 and sum(rep["readings"].values()) == len(rep["claims"])
    for c in rep["claims"]:
        assert c["reading"] in (SUPPORTED, NOT_SUPPORTED, NOT_TESTABLE) and c["why"], c
        assert c["this_run"] not in ("", "-") or c["reading"] == NOT_TESTABLE, c
    md = (s.root / "reports" / "REPORT.md").read_text()
    assert "Claims of the two papers" in md and "Provenance" in md and rep["test_cohort"] in md
    for link in re.findall(r"\]\(((?:figures|executed)/[^)]+)\)", md):
        assert (s.root / "reports" / link).is_file(), link
    assert len(re.findall(r"\]\(figures/", md)) >= 20
    html = (s.root / "reports" / "REPORT.html").read_text()
    check_offline(html)
    assert html.count("data:image/png;base64,") >= 20
    # `dvc plots show`: every curve and every figure on one page that needs no network
    run([sys.executable, "-m", "dvc", "plots", "show", "-o", "plots_page"], s.root)
    page = (s.root / "plots_page" / "index.html").read_text()
    assert not re.search(r"<(?:script|link)[^>]+(?:src|href)=\"(?:https?:)?//", page) and "window.__vegaEmbed" in page
    assert page.count("vegaEmbed('#") >= 15 and page.count("<img") >= 20
    times = pd.read_csv(s.root / "reports" / "timings.csv")
    assert (times.wall_s > 0).all() and (times.peak_rss_mb > 100).all(), times  # recorded by pathsynth.run, not typed
    # benchmarks/generator_levers.py on this project: a sampling setting on the stage's models and one on a retrained
    # mep UNet (issue 14's training-time levers), every yardstick with its CI; a second call finds both rows done
    bench = [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "generator_levers.py"), "--root", str(s.root),
             "--n", "8", "--cfg", "3", "--cfg-baseline", "--classifier-scale"]
    run(bench, s.root)
    run(bench + ["--unet", "train.steps=4"], s.root)
    assert "0 of 1 settings to run" in run(bench + ["--unet", "train.steps=4"], s.root)
    lev = pd.read_csv(s.root / "checkpoints" / "benchmarks" / "generator_levers.csv")
    assert list(lev.unet) == ["stage", "train.steps=4"] and set(lev["mode"]) == {"cfg_mep"} and (lev.n == 8).all()
    # the retrained UNet exists and made other images than the stage's (a lever that was ignored would repeat the row)
    assert len(list((s.root / "checkpoints" / "benchmarks" / "generator_levers").glob("models-*/mep"))) == 1
    assert lev.fd_dino.nunique() == 2
    for col in ("hit_own", "hit_indep"):  # Wilson intervals hold their rate
        assert (lev[f"{col}_lo"] <= lev[col]).all() and (lev[col] <= lev[f"{col}_hi"]).all(), lev[[col, f"{col}_lo", f"{col}_hi"]]
    assert (lev.fd_dino > 0).all() and (lev.fd_dino_lo <= lev.fd_dino_hi).all() and lev.auroc.between(0, 1).all()
    assert ((lev.c2st_lo <= lev.c2st) & (lev.c2st <= lev.c2st_hi)).all() and lev.c2st.between(0, 1).all()
    # a row written before the pixel reader existed gets it from its kept images on the next call
    lev.drop(columns=["c2st", "c2st_lo", "c2st_hi"]).to_csv(s.root / "checkpoints" / "benchmarks" / "generator_levers.csv", index=False)
    assert "1 to complete with the pixel C2ST" in run(bench, s.root)
    again = pd.read_csv(s.root / "checkpoints" / "benchmarks" / "generator_levers.csv")
    assert again.c2st.iloc[0] == lev.c2st.iloc[0] and again.c2st.iloc[1:].isna().all()
    # --seed repeats a setting under another seed: other requests and images in a row of their own, resumable
    assert "seed 7; 2 CNN seeds; 1 of 1 settings to run" in run(bench + ["--seed", "7"], s.root)
    assert "0 of 1 settings to run" in run(bench + ["--seed", "7"], s.root)
    seeded = pd.read_csv(s.root / "checkpoints" / "benchmarks" / "generator_levers.csv")
    assert list(seeded.seed) == [*again.seed, 7] and again.seed.iloc[0] != 7 and list(seeded.unet)[-1] == "stage"
    assert seeded.fd_dino.iloc[-1] != seeded.fd_dino.iloc[0]
    assert len(list((s.root / "checkpoints" / "benchmarks" / "generator_levers").glob("n8-cfg3-cls0-seed7"))) == 1
    # --cnn-seeds: the same images judged by another number of CNNs is a row of its own; the first seed is shared
    assert "3 CNN seeds; 1 of 1 settings to run" in run(bench + ["--cnn-seeds", "3"], s.root)
    cs = pd.read_csv(s.root / "checkpoints" / "benchmarks" / "generator_levers.csv")
    assert list(cs.cnn_seeds.iloc[-2:]) == [2, 3] and cs.fd_dino.iloc[-1] == cs.fd_dino.iloc[0]
    assert (cs.auroc_seed_min.iloc[-2:] <= cs.auroc_seed_max.iloc[-2:]).all()
    # --combined: cfg_mep_classifier at a (CFG, classifier scale) pair
    combined = bench[:-4] + ["--cfg", "--cfg-baseline", "--classifier-scale", "--combined", "3:2"]
    assert "1 of 1 settings to run" in run(combined, s.root)
    row = pd.read_csv(s.root / "checkpoints" / "benchmarks" / "generator_levers.csv").iloc[-1]
    assert (row["mode"], row.cfg_scale, row.classifier_scale) == ("cfg_mep_classifier", 3, 2) and 0 <= row.auroc <= 1
    # --allocation: the same setting asked for otherwise is a row of its own, with its own images and chance rate
    assert "requests proportional over balanced_subset" in run(bench + ["--allocation", "proportional"], s.root)
    alloc = pd.read_csv(s.root / "checkpoints" / "benchmarks" / "generator_levers.csv")
    assert list(alloc.allocation.fillna("uniform").iloc[[0, -1]]) == ["uniform", "proportional"]
    assert alloc.fd_dino.iloc[-1] != alloc.fd_dino.iloc[0] and 0 < alloc.hit_chance.iloc[-1] < 1
    assert len(list((s.root / "checkpoints" / "benchmarks" / "generator_levers").glob("proportional-balanced_subset-n8-*"))) == 1
    # a UNet trained on the prompt-balanced subset has not seen every pair of the train split: a clear stop
    r = subprocess.run(bench + ["--request-pairs", "train_split"], cwd=s.root, capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}, timeout=600)
    assert r.returncode != 0 and "--request-pairs train_split: guided_sampling: prompt '" in r.stderr, r.stderr[-2000:]
    # the VAE lever: benchmarks/vae_levers.py (the ceiling: reconstructions against real patches) with Stable
    # Diffusion's whole autoencoder loss, then generator_levers.py on that VAE, which reuses it and retrains the
    # prototype classifier on its latents
    vae_set = ["disc_weight=0.5", "perceptual_weight=1.0", "train.steps=2"]
    vbench = [sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "vae_levers.py"), "--root", str(s.root),
              "--n", "8", "--vae", *vae_set]
    run(vbench, s.root)
    vl = pd.read_csv(s.root / "checkpoints" / "benchmarks" / "vae_levers.csv")
    assert list(vl.vae) == ["real (no VAE)", "stage", " ".join(vae_set)] and vl.c2st.between(0, 1).all()
    assert (vl.c2st_lo <= vl.c2st).all() and (vl.c2st <= vl.c2st_hi).all() and vl.psnr.iloc[1:].gt(5).all()
    assert vl.train_s.iloc[2] > 0 and vl.fd_dino.iloc[1:].nunique() == 2
    # --jpeg: the same VAEs judged under another encoding are rows of their own, with the encoding alone as a control
    run(vbench + ["--jpeg", "75"], s.root)
    vl = pd.read_csv(s.root / "checkpoints" / "benchmarks" / "vae_levers.csv")
    assert list(vl.vae.iloc[3:]) == ["real (no VAE), JPEG q75", "stage (JPEG q75)", " ".join(vae_set) + " (JPEG q75)"]
    assert list(vl.jpeg_quality) == [0, 0, 0, 75, 75, 75] and vl.fd_dino.iloc[1] != vl.fd_dino.iloc[4]
    r = subprocess.run(vbench + ["--jpeg", "101"], cwd=s.root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"})
    assert r.returncode != 0 and "--jpeg 101: a JPEG quality is 1 to 100" in r.stderr
    out = run(bench + ["--unet", *(f"vae.{v}" for v in vae_set), "train.steps=4"], s.root)
    vae_dirs = list((s.root / "checkpoints" / "benchmarks" / "vae_levers").glob("vae-*/training.json"))
    assert len(vae_dirs) == 1, vae_dirs  # trained once, by either script
    retrained = [d for d in (s.root / "checkpoints" / "benchmarks" / "generator_levers").glob("models-*")
                 if (d / "prototype_classifier").is_dir() and not (d / "prototype_classifier").is_symlink()]
    assert len(retrained) == 1, out[-2000:]
    # bad input, each a clear error before any compute: a backbone dino_pretrain did not make, missing weights
    for bad, says in (({"backbones": ["real", "synthetic_unguided"]}, "names 'synthetic_unguided', which dino_pretrain does not make"),
                      ({"external": [{"name": "uni", "timm_model": "resnet10t", "weights": "weights/none.safetensors"}]},
                       "weights file")):
        s.set_params(**{**SMALL_ALL, "linear_probe": {**SMALL_ALL["linear_probe"], **bad}})
        r = subprocess.run([str(s.root / "bin" / "stage"), "linear_probe"], cwd=s.root, capture_output=True, text=True,
                           env={**os.environ, "PATHSYNTH_PYTHON": sys.executable}, timeout=300)
        assert r.returncode != 0 and says in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    s.set_params(**SMALL_ALL)
    # several processes split the shards (torchrun on CPU here, `accelerate launch` on GPUs) and make the
    # images the single-process stage made
    import shutil

    shutil.rmtree(s.root / "checkpoints" / "guided_sampling")
    out = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "pathsynth.diffusion.sampling"], s.root)
    assert "process 1/2 guided_sampling/cfg_mep: 4 images made" in out and "process 0/2 guided_sampling/cfg_mep: 4 images made" in out
    run_dir = s.root / "checkpoints" / "guided_sampling"
    for mode in modes:
        split = S.merge_mode(mode, 8, 4, run_dir, s.root / f"{mode}-2proc.h5")
        single = read_imageset(s.root / "data" / "guided_sampling" / f"{mode}.h5")
        np.testing.assert_array_equal(split.meta["seed"], single.meta["seed"])
        # torchrun runs one thread per process: float sums may round differently, by a grey level at most
        assert np.abs(split.x.astype(int) - single.x).max() <= 2, mode
