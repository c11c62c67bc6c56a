"""The study report (notebook 09): claims read right from the metrics, a missing metric fails loudly, the HTML is
offline and self-contained, the comparison with a committed run, provenance and timing records.
The report stage itself runs end to end in tests/test_stages.py."""
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from pathsynth.report import claims as C
from pathsynth.report import compare as CP
from pathsynth.report import provenance as PV
from pathsynth.report import render as R

from conftest import make_study


def metrics(**stages) -> C.Metrics:
    """A Metrics object from dicts (every stage present, empty unless given)."""
    return C.Metrics("/nonexistent", {s: stages.get(s, {}) for s in C.STAGES})


def fd_metrics(ci_dino, ci_real, inception="not computed: no Inception weights"):
    r = lambda c: {"value": float(np.mean(c)), "ci95": c, "n_real": 100, "n_a": 50, "n_b": 50,  # noqa: E731
                   "n_bootstrap": 200, "seed": 1}
    return metrics(fid_umap_coverage={
        "fd_ratio_cfg_mep_over_cfg_baseline": {"dino": r(ci_dino), "dino_real": r(ci_real)},
        "spaces": {"dino": "fd_dino: study DINO", "dino_real": "fd_dino_real: real-trained DINO"},
        "paper_fid_ratio": {"value": 0.504}, "fid_inception": inception})


@pytest.mark.parametrize("cis, reading, says", [
    (([0.3, 0.8], [0.4, 0.9]), C.SUPPORTED, "lower Fréchet distance"),
    (([0.3, 0.8], [0.6, 1.3]), C.NOT_SUPPORTED, "includes 1"),
    (([1.2, 1.8], [0.6, 1.3]), C.NOT_SUPPORTED, "the opposite"),
])
def test_fd_claim_reads_the_ratio_ci_in_every_space(cis, reading, says):
    c = C.fd_claim(fd_metrics(*cis))
    assert c.reading == reading and says in c.why
    assert f"fd_dino: {np.mean(cis[0]):.2f} [{cis[0][0]:.3f}, {cis[0][1]:.3f}]" in c.this_run
    assert "N = 50 per set, 100 real" in c.this_run
    assert "no Inception weights" in c.why and c.paper_value.startswith("FID 178.8 → 90.2")


def test_a_missing_metric_fails_loudly_naming_the_file_and_key():
    m = metrics(fid_umap_coverage={"spaces": {}})
    with pytest.raises(C.ReportError, match=r"metrics/fid_umap_coverage.json has no key 'fd_ratio_cfg_mep_over_cfg_baseline'"):
        C.fd_claim(m)
    with pytest.raises(C.ReportError, match=r"'supervised.runs'"):
        C.synthetic_only_claim(metrics(linear_probe={"supervised": {"recipe": {}}}), "cohort")
    with pytest.raises(C.ReportError, match=r"metrics/reader_stats.json is missing"):
        C.Metrics("/nonexistent", {s: {} for s in C.STAGES if s != "reader_stats"})


def _run(auc, ci):
    return {"auroc": {"value": auc, "ci95": ci}, "n_synthetic": 64, "n_real": 0,
            "ci": "stratified percentile bootstrap, 1000 resamples, seed 1",
            "draws": {"n": 1, "min": auc, "max": auc, "disjoint": True}}


@pytest.mark.parametrize("ci, reading", [([0.75, 0.85], C.SUPPORTED), ([0.81, 0.9], C.SUPPORTED),
                                         ([0.6, 0.8], C.NOT_SUPPORTED)])
def test_synthetic_only_claim_against_0805(ci, reading):
    m = metrics(linear_probe={"supervised": {
        "recipe": {"architecture": "SmallCNN", "steps": 10, "image_size": 32},
        "runs": {"synthetic:cfg_mep": _run(np.mean(ci), ci), "synthetic:classifier": _run(0.9, [0.85, 0.95])}}})
    c = C.synthetic_only_claim(m, "test split (N = 10)")
    assert c.reading == reading and "best synthetic set classifier 0.900" in c.why and "N = 64 synthetic" in c.this_run
    assert "draw" not in c.this_run + c.space  # one draw (n_seeds 1): no spread to show
    del m.data["linear_probe"]["supervised"]["runs"]["synthetic:cfg_mep"]["draws"]  # metrics from before the draws
    with pytest.raises(C.ReportError, match=r"no key 'supervised.runs.synthetic:cfg_mep.draws'"):
        C.synthetic_only_claim(m, "test split (N = 10)")


def test_synthetic_only_claim_shows_the_spread_between_draws():
    run = {**_run(0.7, [0.68, 0.72]), "draws": {"n": 3, "min": 0.55, "max": 0.73, "disjoint": True}}
    m = metrics(linear_probe={"supervised": {"recipe": {"architecture": "SmallCNN", "steps": 10, "image_size": 32},
                                             "runs": {"synthetic:cfg_mep": run}}})
    c = C.synthetic_only_claim(m, "test split (N = 10)")
    assert "N = 64 synthetic training images per draw, 3 draws" in c.this_run
    assert "one draw of 64 alone 0.550 to 0.730" in c.this_run and "mean score of 3 CNNs, one per disjoint draw" in c.space


def _pair(a, b, reading, auc_a=0.8, auc_b=0.8):
    return {"a": a, "b": b, "auroc_a": auc_a, "auroc_b": auc_b, "auroc_diff": auc_a - auc_b, "auroc_ci95": [-0.01, 0.01],
            "auroc_p_holm": 0.5, "reading": reading}


def test_ssl_claims_are_not_testable_when_a_random_backbone_matches_real():
    lp = lambda floor: {"protocol": {"noninferiority_margin": 0.02}, "paired": [  # noqa: E731
        _pair("random_init", "real", floor, 0.6 if floor == "worse" else 0.8),
        _pair("synthetic_classifier", "real", "comparable"), _pair("hybrid", "real", "worse")]}
    rows = C.ssl_claims(metrics(linear_probe=lp("comparable")), "cohort")
    assert [r.reading for r in rows] == [C.NOT_TESTABLE] * 2 and "cannot tell encoders apart" in rows[0].why
    rows = C.ssl_claims(metrics(linear_probe=lp("worse")), "cohort")
    assert [r.reading for r in rows] == [C.SUPPORTED, C.NOT_SUPPORTED]
    with pytest.raises(C.ReportError, match="no paired synthetic or hybrid"):
        C.ssl_claims(metrics(linear_probe={"protocol": {"noninferiority_margin": 0.02}, "paired": []}), "cohort")


def test_reader_claims_without_and_with_human_reads():
    base = {"packet": {"id": "p", "n_images": 100, "n_synthetic": 50, "page": "page.html"},
            "tests": {"binomial": "b", "equivalence": "e", "correction": "Holm", "ci": "Wilson"}}
    none = {**base, "reads": {"folder": "data/reader_stats/reads", "human_readers": 0}, "readers": {},
            "medians": {"human": {"n_readers": 0}, "machine": {"n_readers": 2, "sensitivity": 0.9, "specificity": 0.6}}}
    rows = C.reader_claims(metrics(reader_stats=none))
    assert [r.reading for r in rows] == [C.NOT_TESTABLE] * 2 and "no human reads" in rows[0].why
    assert "median sensitivity 0.90" in rows[0].this_run  # the machine readers are still shown
    h = lambda p: {"kind": "human", "accuracy": 0.7, "p_binomial_holm": p, "p_tost_holm": 0.5}  # noqa: E731
    some = {**none, "reads": {"folder": "r", "human_readers": 2}, "readers": {"a": h(0.01), "b": h(0.3)},
            "medians": {**none["medians"], "human": {"n_readers": 2, "sensitivity": 0.6, "specificity": 0.55}},
            "agreement": {"human": {"computed": True, "fleiss_kappa": 0.2, "fleiss_ci95": [0.1, 0.3],
                                    "krippendorff_alpha": 0.21, "n_readers": 2, "n_images": 100}}}
    rows = C.reader_claims(metrics(reader_stats=some))
    assert rows[0].reading == C.NOT_SUPPORTED and "1 of 2 readers" in rows[0].why
    assert "Fleiss kappa 0.20 [0.100, 0.300]" in rows[1].this_run


def test_guidance_claims_against_unguided(tmp_path):
    from statsmodels.stats.proportion import confint_proportions_2indep

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 50)
    guided, unguided = y + rng.normal(0, 0.6, 100), y + rng.normal(0, 3, 100)
    (tmp_path / "data" / "linear_probe").mkdir(parents=True)
    pd.DataFrame({"label": y, "cnn:synthetic:classifier": guided, "cnn:synthetic:unguided": unguided}).to_csv(
        tmp_path / "data" / "linear_probe" / "test_scores.csv", index=False)
    from sklearn.metrics import roc_auc_score

    runs = {f"synthetic:{k}": {"auroc": {"value": roc_auc_score(y, s)}} for k, s in (("classifier", guided), ("unguided", unguided))}
    m = metrics(fid_umap_coverage={"hit_rate_independent": {"classifier": {"rate": 0.6, "ci95": [0.5, 0.7], "n": 100},
                                                            "unguided": {"rate": 0.2, "ci95": [0.1, 0.3], "n": 100}}},
                linear_probe={"supervised": {"runs": runs}})
    hit, auc = C.guidance_claims(m, tmp_path, "cohort")
    lo, hi = confint_proportions_2indep(60, 100, 20, 100, method="newcomb")
    assert hit.reading == C.SUPPORTED and f"[{lo:.2f}, {hi:.2f}]" in hit.this_run
    assert auc.reading == C.SUPPORTED and "DeLong" in auc.test
    runs["synthetic:unguided"]["auroc"]["value"] = 0.51  # metrics from another run than the scores: an error
    with pytest.raises(C.ReportError, match="different runs"):
        C.guidance_claims(m, tmp_path, "cohort")


def test_html_is_offline_and_embeds_every_figure(tmp_path):
    from PIL import Image

    (tmp_path / "figures").mkdir()
    Image.new("RGB", (4, 4), "red").save(tmp_path / "figures" / "a_b.png")
    md = "# t\n\n| a | b |\n| --- | --- |\n| x \\| y | 2 |\n\n![a](figures/a_b.png)\n\n[nb](executed/01_a.ipynb)"
    html = R.to_html(md, tmp_path, "t")
    assert "data:image/png;base64," in html and 'src="figures/' not in html and "<table>" in html
    R.check_offline(html)
    for bad in ("see https://example.org/x", '<script src="//cdn.example.com/vega.js">'):
        with pytest.raises(R.ExternalURLError):
            R.to_html(md + "\n\n" + bad, tmp_path, "t")
    with pytest.raises(FileNotFoundError, match="figures/missing.png"):
        R.to_html("![m](figures/missing.png)", tmp_path, "t")
    assert R.md_table(pd.DataFrame({"a": ["x|y"], "b": [None]})).splitlines()[2] == "| x\\|y | - |"


def test_params_diff_and_timings_from_executed_notebooks(tmp_path):
    import nbformat

    s = make_study(tmp_path / "study")
    assert PV.params_diff(s.root).empty
    s.set_params(guided_sampling={"cfg_scale": 9.5})
    d = PV.params_diff(s.root)
    assert d.setting.tolist() == ["guided_sampling.cfg_scale"] and d["this run"].tolist() == [9.5]
    # pathsynth.run's record: the wall time and the peak memory of the (exited) child that ran the notebook
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[nbformat.v4.new_output(
        "stream", name="stdout", text="pathsynth stage 'data_prep'  " + json.dumps({"device": "cpu", "cpu": "X", "torch_threads": 1}) + "\n")])])
    path = s.root / "reports" / "executed" / "01_data_prep.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    subprocess.run([sys.executable, "-c", "x = bytearray(200 * 2**20)"], check=True)  # a child of ~200 MB
    from pathsynth.run import record_resources

    record_resources(path, 12.34)
    t = PV.timings(s.root)
    row = t.set_index("stage").loc["data_prep"]
    assert row.wall_s == 12.3 and row.peak_rss_mb > 190 and row.device == "cpu" and row.torch_threads == 1
    assert not row.resumed
    assert t.set_index("stage").loc["prototypes"].isna().wall_s  # not run: no record, no invented number
    # a training loop that resumed from an earlier execution's checkpoint marks the stage's time as partial
    for line, resumed in [("12:00:01 INFO unet[mep]: resumed from /c/checkpoint-800 (step 800/1000)", True),
                          ("12:00:01 INFO vae: resumed from /c/checkpoint-0 (step 0/900)", False),
                          ("12:00:01 INFO unet[mep] step 10/1000 loss=0.3", False),
                          ("12:00:01 INFO supervised CNN: resumed from /c/ab.npy (finished earlier: its test scores)", True),
                          ("12:00:01 INFO cfg_mep: resumed from /d/cfg_mep (finished earlier: 2 of 3 shards)", True)]:
        nb.cells[0].outputs.append(nbformat.v4.new_output("stream", name="stdout", text=line + "\n"))
        nbformat.write(nb, path)
        assert PV.stage_record(path)["resumed"] is resumed, line
        nb.cells[0].outputs.pop()


def test_compare_with_a_committed_run(tmp_path):
    def write(folder, fd, reading, ci=(0.5, 2.0)):
        (folder / "metrics").mkdir(parents=True)
        (folder / "metrics" / "fid_umap_coverage.json").write_text(json.dumps(
            {"fd": {"value": fd, "ci95": list(ci)}, "n": 10, "seconds": 3.0, "train_seconds": 2.0, "ok": True,
             "runs": [{"auroc": 0.7}], "reader_seeds": {"n_synthetic": 4}, "min_mean_s": 0.1}))
        (folder / "metrics" / "report.json").write_text(json.dumps({"claims": [{"claim": "c", "reading": reading}]}))

    write(tmp_path / "results", 1.0, C.SUPPORTED)
    write(tmp_path / "same", 1.0, C.SUPPORTED)
    write(tmp_path / "other", 1.5, C.NOT_SUPPORTED)
    write(tmp_path / "ci", 1.0, C.SUPPORTED, ci=(0.5, 2.5))
    assert CP.numbers(tmp_path / "results") == {"fid_umap_coverage:fd.value": 1.0, "fid_umap_coverage:fd.ci95[0]": 0.5,
                                                "fid_umap_coverage:fd.ci95[1]": 2.0, "fid_umap_coverage:n": 10.0,
                                                "fid_umap_coverage:runs[0].auroc": 0.7,
                                                "fid_umap_coverage:reader_seeds.n_synthetic": 4.0,
                                                "fid_umap_coverage:min_mean_s": 0.1}
    num, read = CP.compare(tmp_path / "same", tmp_path / "results")
    assert num.empty and read.empty
    num, _ = CP.compare(tmp_path / "ci", tmp_path / "results")  # a CI alone that moved is a difference
    assert num.metric.tolist() == ["fid_umap_coverage:fd.ci95[1]"]
    num, read = CP.compare(tmp_path / "other", tmp_path / "results")
    assert num.metric.tolist() == ["fid_umap_coverage:fd.value"] and num.relative.iloc[0] == pytest.approx(0.5)
    assert read.values.tolist() == [["c", C.SUPPORTED, C.NOT_SUPPORTED]]
    r = subprocess.run([sys.executable, "-m", "pathsynth.report.compare", str(tmp_path / "results")], cwd=tmp_path / "other",
                       capture_output=True, text=True)
    assert r.returncode == 1 and "1 claim readings differ" in r.stdout
    r = subprocess.run([sys.executable, "-m", "pathsynth.report.compare", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert r.returncode == 2 and "nowhere/metrics not found" in r.stderr


def test_lock_digest_ignores_the_report_entry(tmp_path):
    lock = {"schema": "2.0", "stages": {"a": {"cmd": "x"}, "report": {"cmd": "y"}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    d = PV.lock_digest(tmp_path)
    lock["stages"]["report"]["cmd"] = "z"
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert PV.lock_digest(tmp_path) == d
    lock["stages"]["a"]["cmd"] = "w"
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert PV.lock_digest(tmp_path) != d


def test_readme_timing_table_is_generated_from_the_committed_runs(tmp_path):
    from conftest import ROOT

    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text())
    assert not PV.update_readme(readme, ROOT / "results"), (
        "README.md's timing table is stale: run `.venv/bin/python -m pathsynth.report.provenance readme`")
    # and the table is made from the records: a run's timings.csv becomes a column
    (tmp_path / "results" / "x").mkdir(parents=True)
    pd.DataFrame({"stage": ["data_prep", "prototypes"], "wall_s": [60.0, None], "peak_rss_mb": [2048.0, None],
                  "device": ["cpu", None], "cpu": ["X", None], "torch_threads": [2, None]}).to_csv(
        tmp_path / "results" / "x" / "timings.csv", index=False)
    table = PV.timing_table(tmp_path / "results")
    assert "| data_prep | 1.0 min, 2.0 GB |" in table and "| prototypes | not run |" in table
    assert "| whole study | **1.0 min** (stages run so far) |" in table and "| device | cpu, X, 2 threads |" in table
    t = pd.read_csv(tmp_path / "results" / "x" / "timings.csv")
    t["resumed"] = [True, None]
    t.to_csv(tmp_path / "results" / "x" / "timings.csv", index=False)
    table = PV.timing_table(tmp_path / "results")
    assert "| data_prep | 1.0 min, 2.0 GB (resumed) |" in table and "(the last execution of resumed stages only)" in table


def test_save_keeps_a_finished_run_and_refuses_an_unfinished_one(tmp_path):
    run, dest = tmp_path / "run", tmp_path / "results" / "tiny"
    (run / "metrics").mkdir(parents=True)
    (run / "metrics" / "data_prep.json").write_text("{}")
    with pytest.raises(SystemExit, match="no finished run"):
        CP.save(run, dest)
    (run / "reports" / "figures").mkdir(parents=True)
    (run / "metrics" / "report.json").write_text("{}")
    for f in ("dvc.lock", "params.yaml", "reports/REPORT.md", "reports/timings.csv",
              *(f"reports/figures/{k}.png" for k in CP.KEY_FIGURES)):
        (run / f).write_text("x")
    written = CP.save(run, dest)
    names = sorted(str(p.relative_to(dest)) for p in written)
    assert "metrics/report.json" in names and "REPORT.md" in names and "dvc.lock" in names
    assert "figures/fid_umap_coverage_c2st.png" in names and len(names) == 6 + len(CP.KEY_FIGURES)


def test_offline_plots_page_renders_vega_in_headless_chromium(tmp_path):
    """`dvc plots show` fills .dvc/plots/offline.html (DVC's own template loads Vega from a CDN: blank offline).
    Filled here the way DVC fills it (dvc_render), then opened from disk in Chromium with no network."""
    import re

    from dvc_render import VegaRenderer, render_html
    from selenium import webdriver
    from selenium.webdriver.support.ui import WebDriverWait

    from conftest import ROOT
    from test_reader_stats import browser

    template = ROOT / ".dvc" / "plots" / "offline.html"
    assert "html_template = plots/offline.html" in (ROOT / ".dvc" / "config").read_text()
    curves = [VegaRenderer([{"step": i, "loss": 1 / (i + 1), "rev": "workspace"} for i in range(5)], f"loss{j}.csv",
                           x="step", y="loss") for j in range(2)]
    out = render_html(curves, tmp_path / "index.html", html_template=template)
    page = out.read_text()
    assert not re.search(r"<(?:script|link)[^>]+(?:src|href)=\"(?:https?:)?//", page)
    opts, service = browser()
    d = webdriver.Chrome(options=opts, service=service)
    try:
        d.get(out.as_uri())
        n = WebDriverWait(d, 20).until(lambda d: d.execute_script(
            "return document.querySelectorAll('svg.marks, canvas.marks').length") >= 2 and d.execute_script(
            "return document.querySelectorAll('svg.marks, canvas.marks').length"))
        assert n == 2
    finally:
        d.quit()


def test_extras_carry_n_and_a_ci():
    from statsmodels.stats.proportion import proportion_confint

    m = metrics(
        fid_umap_coverage={"memorisation": {"cfg_mep": {"pixel": {"n_under": 3, "n_synthetic": 100, "n_real": 50,
                                                                  "quantile": 0.01, "fraction_under": 0.03}}},
                           "machine_readers": {}, "hit_rate_independent": {}},
        guided_sampling={"chance": 0.1}, prototypes={"phantom_recovery": None},
        dino_pretrain={"regimes": {}}, linear_probe={"supervised": {"runs": {}}})
    e = C.extras(m)
    lo, hi = proportion_confint(3, 100, method="wilson")
    assert e["this run"].iloc[0].startswith(f"0.030 [{lo:.3f}, {hi:.3f}]: 3 of 100")
    assert "not applicable" in e["this run"].iloc[1]


def test_git_sha_is_dirty_for_code_changes_only(tmp_path):
    """A repro rewrites dvc.lock, params.yaml and git-tracked metrics as it runs; only a change to the code marks the
    recorded commit "-dirty"."""
    from pathsynth.runtime import git_sha

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "lib").mkdir(), (tmp_path / "metrics").mkdir()
    for f in ("lib/code.py", "params.yaml", "dvc.lock", "metrics/m.json"):
        (tmp_path / f).write_text("0\n")
    git("init", "-q"), git("add", "."), git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    clean = git_sha(tmp_path)
    assert clean and not clean.endswith("-dirty") and clean != "unknown"
    for f in ("params.yaml", "dvc.lock", "metrics/m.json"):
        (tmp_path / f).write_text("1\n")
    assert git_sha(tmp_path) == clean
    (tmp_path / "lib/code.py").write_text("1\n")
    assert git_sha(tmp_path) == clean + "-dirty"
