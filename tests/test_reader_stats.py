"""The reader study: the packet (blinded, balanced, self-contained), strict ingestion, the statistics against
independent references, and the page itself in a real headless Chromium."""
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pathsynth.data.dataset import DataError, ImageSet
from pathsynth.readerstudy import packet as PK
from pathsynth.readerstudy import reads as RD
from pathsynth.readerstudy import stats as ST

from conftest import wilson


def imageset(n, seed, size=32, label=None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n) if label is None else np.full(n, label)
    return ImageSet(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), y)


@pytest.fixture
def small_packet():
    return PK.make_packet(imageset(40, 0), {"cfg_mep": imageset(20, 1), "classifier": imageset(20, 2)}, 6, 7, "test")


# ------------------------------------------------------------------------------------ the packet
def test_packet_is_balanced_shuffled_and_blinded(small_packet, tmp_path):
    p = small_packet
    assert len(p.key) == 24 and (p.key.truth == "real").sum() == 12 and (p.key.set == "cfg_mep").sum() == 6
    assert p.key.image_id.is_unique and p.key.truth.iloc[:12].nunique() == 2  # shuffled, not blocked
    page, key = PK.write_packet(p, tmp_path)
    assert page.name == f"{p.packet_id}.html" and key.name == f"{p.packet_id}.key.csv"
    html = page.read_text()
    data = json.loads(re.search(r'<script type="application/json" id="packet-data">(.*?)</script>', html, re.S).group(1))
    assert set(data) == {"packet_id", "images"} and all(set(im) == {"id", "src"} for im in data["images"])
    assert [im["id"] for im in data["images"]] == p.key.image_id.tolist()
    # the key is nowhere in the page: no set name, no truth per image, no key file name, no source index
    for word in ("cfg_mep", "classifier", "real_test", ".key.csv"):
        assert word not in html
    assert "truth" not in json.dumps(data) and "synthetic" not in json.dumps(data) and "real" not in json.dumps(data)
    assert "http://" not in html and "https://" not in html  # nothing fetched
    # the images are the packet's pixels, losslessly
    from PIL import Image
    import base64, io

    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["images"][0]["src"].split(",", 1)[1]))))
    np.testing.assert_array_equal(first, p.images[0])
    # the same seed makes the same packet; another seed another one
    again = PK.make_packet(imageset(40, 0), {"cfg_mep": imageset(20, 1), "classifier": imageset(20, 2)}, 6, 7, "test")
    assert again.packet_id == p.packet_id and again.key.equals(p.key)
    # and in another process with another hash seed (ids must not follow a set's iteration order)
    import subprocess, sys

    code = ("import sys; sys.path.insert(0, 'tests'); from test_reader_stats import imageset; "
            "from pathsynth.readerstudy import packet as PK; "
            "p = PK.make_packet(imageset(40, 0), {'cfg_mep': imageset(20, 1), 'classifier': imageset(20, 2)}, 6, 7, 'test'); "
            "print(','.join(p.key.image_id))")
    for hash_seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": hash_seed}, cwd=Path(__file__).parents[1])
        assert out.stdout.strip() == ",".join(p.key.image_id)


def test_packet_requests_beyond_the_images_are_errors():
    with pytest.raises(DataError, match="n_per_set 30: these synthetic sets have fewer images: {'cfg_mep': 20}"):
        PK.make_packet(imageset(100, 0), {"cfg_mep": imageset(20, 1)}, 30, 0, "t")
    with pytest.raises(DataError, match="needs 24 real test images; the real test split has 10"):
        PK.make_packet(imageset(10, 0), {"a": imageset(20, 1), "b": imageset(20, 2)}, 12, 0, "t")


def test_a_200_image_packet_at_96_px_stays_under_20_mb(tmp_path):
    # noise is the worst case for PNG: real patches compress better
    p = PK.make_packet(imageset(100, 0, 96), {"a": imageset(50, 1, 96), "b": imageset(50, 2, 96)}, 50, 0, "size")
    page, _ = PK.write_packet(p, tmp_path)
    assert len(p.key) == 200 and page.stat().st_size < 20 * 2**20, page.stat().st_size


# ------------------------------------------------------------------------------------ ingestion
def reads_for(key, reader="r1", answers=None, confidence=3):
    answers = answers if answers is not None else ["synthetic" if t == "synthetic" else "real" for t in key.truth]
    return pd.DataFrame({"reader_id": reader, "packet_id": key.packet_id, "image_id": key.image_id,
                         "answer": answers, "confidence": confidence, "time_s": 1.5, "tissue": ""})


def test_reads_are_read_back(small_packet, tmp_path):
    reads_for(small_packet.key).to_csv(tmp_path / "a.csv", index=False)
    reads_for(small_packet.key, "r2").drop(columns="tissue").to_csv(tmp_path / "b.csv", index=False)  # machine format
    r = RD.read_reads(tmp_path, small_packet.key)
    assert len(r) == 48 and set(r.reader_id) == {"r1", "r2"} and r.confidence.dtype.kind == "i"
    assert RD.read_reads(tmp_path / "none", small_packet.key).empty


@pytest.mark.parametrize("change, message", [
    (lambda d: d.assign(image_id=d.image_id.where(d.index != 3, "zzzzzz")), "row 5: unknown image id 'zzzzzz'"),
    (lambda d: pd.concat([d, d.iloc[[2]]]), "rows 4 and 26: reader 'r1' answered image"),
    (lambda d: d.iloc[1:], "reader 'r1' did not answer 1 of the packet's 24 images"),
    (lambda d: d.assign(packet_id="other-1234"), "row 2: packet 'other-1234' is not this study's packet"),
    (lambda d: d.assign(answer=d.answer.where(d.index != 0, "maybe")), "row 2: answer 'maybe' is not one of"),
    (lambda d: d.assign(confidence=d.confidence.astype(str).where(d.index != 1, "high")), "row 3: confidence 'high' is not a whole number"),
    (lambda d: d.assign(confidence=d.confidence.where(d.index != 1, 7)), "row 3: confidence 7 is outside 1 to 5"),
    (lambda d: d.drop(columns="confidence"), "missing \\['confidence'\\]"),
    (lambda d: d.assign(tissue="tumour"), "row 2: tissue 'tumour' is not one of"),
])
def test_bad_reads_are_errors_naming_file_and_row(small_packet, tmp_path, change, message):
    d = change(reads_for(small_packet.key).reset_index(drop=True))
    d.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match=message) as err:
        RD.read_reads(tmp_path, small_packet.key)
    assert "bad.csv" in str(err.value)


def test_a_malformed_csv_and_a_reader_in_two_files_are_errors(small_packet, tmp_path):
    (tmp_path / "x.csv").write_text('reader_id,packet_id\n"unterminated,1\n')
    with pytest.raises(DataError, match="x.csv"):
        RD.read_reads(tmp_path, small_packet.key)
    (tmp_path / "x.csv").unlink()
    reads_for(small_packet.key).to_csv(tmp_path / "a.csv", index=False)
    reads_for(small_packet.key).to_csv(tmp_path / "b.csv", index=False)
    with pytest.raises(DataError, match="reader 'r1' has reads in several files"):
        RD.read_reads(tmp_path, small_packet.key)


# ------------------------------------------------------------------------------------ statistics
def hand_reads():
    truth = np.array(["synthetic"] * 12 + ["real"] * 12)
    rng = np.random.default_rng(0)
    out = []
    for r in range(3):
        ans = np.where(rng.random(24) < 0.6 + 0.1 * r, truth, np.where(truth == "real", "synthetic", "real"))
        out.append(pd.DataFrame({"reader_id": f"r{r}", "kind": "human", "image_id": [f"i{i}" for i in range(24)],
                                 "answer": ans, "truth": truth, "confidence": rng.integers(1, 6, 24)}))
    return pd.concat(out, ignore_index=True)


def binom_two_sided(k, n):
    """Exact two-sided binomial p at 0.5 (symmetric: twice the smaller tail)."""
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


def test_per_reader_statistics_match_independent_references():
    from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

    reads = hand_reads()
    t = ST.reader_table(reads, margin=0.2).set_index("reader_id")
    for r, g in reads.groupby("reader_id"):
        y, yhat = (g.truth == "synthetic").astype(int), (g.answer == "synthetic").astype(int)
        row = t.loc[r]
        assert row.sensitivity == pytest.approx(recall_score(y, yhat))
        assert row.specificity == pytest.approx(recall_score(1 - y, 1 - yhat))
        assert row.accuracy == pytest.approx(accuracy_score(y, yhat))
        k = int((y == yhat).sum())
        assert row.accuracy_ci95 == pytest.approx(list(wilson(k, 24)))
        assert row.p_binomial == pytest.approx(binom_two_sided(k, 24))
        # TOST by hand: the larger of the two one-sided exact p-values at 0.3 and 0.7
        upper = sum(math.comb(24, i) * 0.3**i * 0.7 ** (24 - i) for i in range(k, 25))
        lower = sum(math.comb(24, i) * 0.7**i * 0.3 ** (24 - i) for i in range(0, k + 1))
        assert row.p_tost == pytest.approx(max(upper, lower), rel=1e-6)
        score = np.where(g.answer == "synthetic", 1, -1) * g.confidence
        assert row.auroc_confidence == pytest.approx(roc_auc_score(y, score))
    # Holm across the three readers, by hand
    p = t.p_binomial.sort_values()
    holm = np.maximum.accumulate(np.minimum(1, p.to_numpy() * [3, 2, 1]))
    assert t.loc[p.index, "p_binomial_holm"].to_numpy() == pytest.approx(holm)


def test_agreement_matches_hand_formulas():
    import krippendorff  # noqa: F401  (the study's dependency; the reference below is written out)

    reads = hand_reads()
    wide = reads.pivot(index="image_id", columns="reader_id", values="answer")
    k = ST.cohen_matrix(reads)
    a, b = wide["r0"] == "synthetic", wide["r1"] == "synthetic"
    po = (a == b).mean()
    pe = a.mean() * b.mean() + (1 - a.mean()) * (1 - b.mean())
    assert k.loc["r0", "r1"] == pytest.approx((po - pe) / (1 - pe))
    f = ST.fleiss(reads, 200, 0)
    counts = np.stack([(wide == "synthetic").sum(1), (wide == "real").sum(1)], 1).astype(float)
    n = 3
    p_j = counts.sum(0) / counts.sum()
    P_i = ((counts**2).sum(1) - n) / (n * (n - 1))
    assert f["fleiss_kappa"] == pytest.approx((P_i.mean() - (p_j**2).sum()) / (1 - (p_j**2).sum()))
    assert f["fleiss_ci95"][0] <= f["fleiss_kappa"] <= f["fleiss_ci95"][1]
    # Krippendorff's alpha (nominal, no missing values) from the coincidence matrix: 1 - D_o / D_e
    N = counts.sum()
    o = np.zeros((2, 2))
    for c in counts:
        o += (np.outer(c, c) - np.diag(c)) / (n - 1)
    nc = o.sum(1)
    d_o = (o.sum() - np.trace(o)) / N
    d_e = (nc.sum() ** 2 - (nc**2).sum()) / (N * (N - 1))
    assert f["krippendorff_alpha"] == pytest.approx(1 - d_o / d_e)


# ------------------------------------------------------------------------------------ the page in a real browser
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chrome, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chrome or not driver:
        why = "no Debian chromium / chromium-driver here (apt-get install chromium chromium-driver)"
        if os.environ.get("PATHSYNTH_REQUIRE_BROWSER"):
            pytest.fail(f"the browser test must run in CI: {why}")
        pytest.skip(why)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--window-size=1000,1100"):
        opts.add_argument(a)
    return opts, Service(driver)


def test_a_reading_session_in_headless_chromium(small_packet, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    opts, service = browser()
    profile, downloads = tmp_path / "profile", tmp_path / "downloads"
    downloads.mkdir()
    opts.add_argument(f"--user-data-dir={profile}")
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    page, _ = PK.write_packet(small_packet, tmp_path / "packet")
    key = small_packet.key
    plan = {i: ("synthetic" if j % 3 else "real", 1 + j % 5) for j, i in enumerate(key.image_id)}
    d = webdriver.Chrome(options=opts, service=service)
    try:
        d.get(page.as_uri())
        d.find_element(By.ID, "reader").send_keys("dr-test", Keys.ENTER)
        body = d.find_element(By.TAG_NAME, "body")

        def current_id():
            src = d.find_element(By.ID, "image").get_attribute("src")
            return key.image_id[[im == src for im in srcs]].iloc[0]

        srcs = [PK.png_data_uri(x) for x in small_packet.images]
        for _ in range(10):  # answer 10 by keyboard: R/S then the confidence moves on
            i = current_id()
            ans, conf = plan[i]
            body.send_keys("s" if ans == "synthetic" else "r", str(conf))
        assert "patch 11 of 24" in d.find_element(By.ID, "progress").text
        d.refresh()  # a reload keeps everything
        assert "patch 11 of 24" in d.find_element(By.ID, "progress").text
        body = d.find_element(By.TAG_NAME, "body")
        body.send_keys("b")  # back one, change that answer with the buttons, and go on
        i = current_id()
        plan[i] = ("real" if plan[i][0] == "synthetic" else "synthetic", 5)
        d.find_element(By.ID, plan[i][0]).click()
        d.find_element(By.CSS_SELECTOR, '[data-conf="5"]').click()
        for _ in range(14):
            i = current_id()
            ans, conf = plan[i]
            d.find_element(By.ID, ans).click()
            body.send_keys("t")  # the optional tissue label
            body.send_keys(str(conf))
        assert d.find_element(By.ID, "done").is_displayed()
        csv_text = d.find_element(By.ID, "csv").get_attribute("value")
        d.find_element(By.ID, "export").click()
        for _ in range(50):
            files = list(downloads.glob("*.csv"))
            if files:
                break
            import time

            time.sleep(0.1)
        assert files and files[0].name == f"reads_{small_packet.packet_id}_dr-test.csv"
        assert files[0].read_text() == csv_text
        d.save_screenshot(str(tmp_path / "done.png"))
    finally:
        d.quit()
    reads_dir = tmp_path / "reads"
    reads_dir.mkdir()
    shutil.copy(files[0], reads_dir)
    reads = RD.with_truth(RD.read_reads(reads_dir, key), key)
    assert len(reads) == 24 and set(reads.reader_id) == {"dr-test"} and (reads.time_s >= 0).all()
    typed = pd.DataFrame({"image_id": list(plan), "answer": [a for a, _ in plan.values()],
                          "confidence": [c for _, c in plan.values()]})
    merged = reads.merge(typed, on="image_id", suffixes=("", "_typed"))
    assert (merged.answer == merged.answer_typed).all() and (merged.confidence == merged.confidence_typed).all()
    assert set(reads.tissue) <= {"", "cancer"} and (reads.tissue == "cancer").sum() >= 13
    # the statistics of the exported reads equal those of the answers typed
    exp = typed.merge(key[["image_id", "truth"]], on="image_id")
    got = ST.reader_table(reads.assign(kind="human"), 0.1).iloc[0]
    assert got.sensitivity == pytest.approx(((exp.truth == "synthetic") & (exp.answer == "synthetic")).sum() / 12)
    assert got.specificity == pytest.approx(((exp.truth == "real") & (exp.answer == "real")).sum() / 12)


def test_the_page_shows_native_pixels_magnified(small_packet, tmp_path):
    """The start screen, then the first image at an integer magnification of its native pixels."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    opts, service = browser()
    opts.add_argument(f"--user-data-dir={tmp_path / 'p'}")
    page, _ = PK.write_packet(small_packet, tmp_path / "packet")
    d = webdriver.Chrome(options=opts, service=service)
    try:
        d.get(page.as_uri())
        assert d.find_element(By.ID, "start").is_displayed()
        d.find_element(By.ID, "reader").send_keys("x", Keys.ENTER)
        assert d.find_element(By.ID, "image").get_attribute("naturalWidth") == "32"
        assert d.find_element(By.ID, "image").size["width"] == 384 + 2  # 12x magnification of 32 px, 1 px border
        d.save_screenshot(str(tmp_path / "page.png"))
    finally:
        d.quit()
    assert (tmp_path / "page.png").stat().st_size > 10000
