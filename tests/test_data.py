import gzip
import io

import h5py
import numpy as np
import pytest
from PIL import Image

from pathsynth import config, runtime
from pathsynth.config import section


def FilterParams(**kw):
    return section("data_prep.filter", **kw)
from pathsynth.data import npz, pcam, phantom
from pathsynth.data.dataset import DataError, ImageSet, read_imageset, write_imageset
from pathsynth.data.filters import filter_features, image_features
from pathsynth.data.prep import prepare, resize, write_splits

from conftest import SMALL, shared_npz, write_fake_pcam


def _decoded_npz(tmp_path, ds, split):
    p = npz.write_npz(tmp_path / "subset.npz", ds.x, ds.y, split)
    return p, npz.read_npz(p)


# ------------------------------------------------------------------ loaders agree across sources
def test_loader_equivalence_npz_and_pcam_h5(tmp_path, phantom_small):
    ds = phantom_small
    split = np.array(["train"] * 32 + ["valid"] * 16)
    p, from_npz = _decoded_npz(tmp_path, ds, split)
    # the same decoded pixels, stored as official PCam HDF5 files
    folder = tmp_path / "pcam"
    tr = from_npz["train"]
    write_fake_pcam(folder, tr.x, tr.y, splits=("train",))
    from_h5 = pcam.read_split(folder, "train", tmp_path / "cache")
    np.testing.assert_array_equal(from_h5.x, tr.x)
    np.testing.assert_array_equal(from_h5.y, tr.y)
    np.testing.assert_array_equal(tr.y, ds.y[:32])
    # the JPEG round trip is close to the original (quality 75), not identical
    assert np.abs(tr.x.astype(int) - ds.x[:32]).mean() < 12
    # .h5.gz is read the same way (decompressed once into the cache)
    gzf = tmp_path / "pcam_gz"
    gzf.mkdir()
    for kind in ("x", "y"):
        src = folder / f"camelyonpatch_level_2_split_train_{kind}.h5"
        with open(src, "rb") as a, gzip.open(gzf / (src.name + ".gz"), "wb") as b:
            b.write(a.read())
    np.testing.assert_array_equal(pcam.read_split(gzf, "train", tmp_path / "cache2").x, tr.x)


def test_imageset_roundtrip_with_string_meta(tmp_path, phantom_small):
    ds = phantom_small
    ds2 = ImageSet(ds.x, ds.y, {**ds.meta, "prompt": np.array([f"p{i}" for i in range(len(ds))])}, {"k": [1, 2]})
    back = read_imageset(write_imageset(tmp_path / "a.h5", ds2))
    np.testing.assert_array_equal(back.x, ds.x)
    assert back.meta["prompt"][3] == "p3" and back.attrs["k"] == [1, 2]
    np.testing.assert_array_equal(back.meta["morphology"], ds.meta["morphology"])
    assert not (tmp_path / "a.h5.tmp").exists()


# ------------------------------------------------------------------ filter
def test_filter_thresholds_and_reasons():
    flat_grey = np.full((96, 96, 3), 128, np.uint8)
    dark = (np.random.default_rng(0).integers(0, 60, (96, 96, 3))).astype(np.uint8)
    glass = np.full((96, 96, 3), 240, np.uint8)
    rep = filter_features(np.stack([flat_grey, dark, glass]), FilterParams())
    assert rep.reason.tolist() == ["unstained (mean S)", "too dark (mean V)", "unstained (mean S)"]
    # a rule at exactly its threshold keeps the image (the reference code removes x < threshold)
    tissue = phantom.generate(6, seed=1, artefact_rate=0.0).x
    f = image_features(tissue[0])
    at = FilterParams(min_laplacian_var=f["laplacian_var"])
    above = FilterParams(min_laplacian_var=f["laplacian_var"] + 1e-6)
    assert filter_features(tissue[:1], at).keep.iloc[0]
    assert filter_features(tissue[:1], above).reason.iloc[0] == "blurry (Laplacian variance)"
    assert filter_features(np.stack([flat_grey]), FilterParams(enabled=False)).keep.all()


def test_filter_removes_phantom_artefacts_and_keeps_tissue():
    ds = phantom.generate(160, seed=11, artefact_rate=0.25)
    rep = filter_features(ds.x, FilterParams())
    art = ds.meta["artefact"] != "none"
    assert art.sum() > 20
    assert not rep.keep[art].any()  # every empty-glass and out-of-focus patch removed
    assert rep.keep[~art].mean() > 0.9


# ------------------------------------------------------------------ phantom ground truth
def test_phantom_labels_follow_the_centre_rule_and_store_morphology():
    ds = phantom.generate(240, seed=5, artefact_rate=0.0)
    m = ds.meta
    assert set(np.unique(m["morphology"])) == set(range(len(phantom.MORPHOLOGY)))
    np.testing.assert_array_equal(ds.y, (m["centre_tumour_fraction"] > 0).astype(int))
    # the label is about the centre, not about tumour anywhere: both kinds of disagreement occur
    assert ((ds.y == 0) & (m["tumour_fraction"] > 0)).any()  # tumour only at the periphery
    assert ((ds.y == 1) & (m["morphology"] != phantom.TUMOUR)).any()  # a nest in another tissue
    assert 0.35 < ds.y.mean() < 0.65
    # tumour patches look like PCam tumour: darker (more hematoxylin) than lymph-node background
    v = ds.x.reshape(len(ds), -1).mean(1)
    assert v[m["morphology"] == phantom.TUMOUR].mean() < v[m["morphology"] == 2].mean()


def test_phantom_is_deterministic():
    a, b = phantom.generate(8, seed=3), phantom.generate(8, seed=3)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, phantom.generate(8, seed=4).x)


def test_resize_is_antialiased():
    stripes = np.zeros((1, 96, 96, 3), np.uint8)
    stripes[:, :, ::2] = 255  # 1-px stripes alias badly without a low-pass filter
    small = resize(stripes, 32)
    assert small.shape == (1, 32, 32, 3)
    assert abs(small.mean() - 127.5) < 3 and small.std() < 20  # without antialiasing: 0/255 stripes, std ~127


# ------------------------------------------------------------------ prepare(): determinism and splits
def test_prepare_is_deterministic_and_balanced(study):
    p = study.set_params(**SMALL)
    r1, r2 = prepare(p, study.root), prepare(p, study.root)
    for s in ("train", "valid", "test"):
        np.testing.assert_array_equal(r1.splits[s].x, r2.splits[s].x)
        c = r1.splits[s].class_counts()
        assert c[0] == c[1] > 0
        assert r1.splits[s].image_size == 32
    p2 = study.set_params(seed=1, **SMALL)
    assert not np.array_equal(prepare(p2, study.root).splits["train"].x[:4], r1.splits["train"].x[:4])


def test_prepare_npz_with_holdout_test(study, tmp_path):
    ds = phantom.generate(120, seed=2, artefact_rate=0.0)
    split = np.array(["train"] * 90 + ["valid"] * 30)
    path = npz.write_npz(tmp_path / "s.npz", ds.x, ds.y, split)
    p = study.set_params(data={"source": {"kind": "npz", "path": str(path)},
                               "test": {"kind": "holdout", "holdout_fraction": 0.2}})
    r = prepare(p, study.root)
    tr, te = r.splits["train"].meta["source_index"], r.splits["test"].meta["source_index"]
    assert len(np.intersect1d(tr, te)) == 0 and len(te) > 0
    assert (r.raw_counts.loc["train"].sum() + r.raw_counts.loc["test"].sum()) == 90


def test_external_test_cohort_from_pcam_h5(study, tmp_path):
    ds = phantom.generate(40, seed=9, artefact_rate=0.0)
    folder = write_fake_pcam(tmp_path / "ext", ds.x, ds.y, splits=("valid",))
    p = study.set_params(data={"source": {"counts": {"train": 120, "valid": 40}},
                               "test": {"kind": "pcam_h5", "path": str(folder), "split": "valid"}})
    r = prepare(p, study.root)
    assert r.splits["test"].attrs["source"].startswith("pcam_h5:")


# ------------------------------------------------------------------ bad input
def _pcam_params(study, folder):
    return study.set_params(data={"source": {"kind": "pcam_h5", "path": str(folder),
                                             "counts": {"train": None, "valid": None, "test": None}}})


def assert_nothing_written(root):
    """No output under data/, finished or partial: only the study's own (git-tracked) reads folder is there."""
    files = [p.relative_to(root) for p in (root / "data").rglob("*") if p.is_file()]
    assert [str(f) for f in files] == ["data/reader_stats/reads/README.md"], files


def test_pcam_missing_file(study, tmp_path, phantom_small):
    folder = write_fake_pcam(tmp_path / "p", phantom_small.x, phantom_small.y, splits=("train", "valid"))
    with pytest.raises(DataError, match="missing camelyonpatch_level_2_split_test_x.h5"):
        prepare(_pcam_params(study, folder), study.root)
    assert_nothing_written(study.root)


def test_pcam_wrong_key_shape_dtype_labels(study, tmp_path, phantom_small):
    ds = phantom_small
    folder = write_fake_pcam(tmp_path / "p", ds.x, ds.y)
    f = folder / "camelyonpatch_level_2_split_valid_x.h5"
    with h5py.File(f, "w") as h:
        h.create_dataset("images", data=ds.x)
    with pytest.raises(DataError, match=r"split_valid_x.h5: missing key 'x'"):
        prepare(_pcam_params(study, folder), study.root)
    with h5py.File(f, "w") as h:
        h.create_dataset("x", data=ds.x[:, :64])
    with pytest.raises(DataError, match=r"split_valid_x.h5: key 'x' must be uint8 \[N,96,96,3\]"):
        prepare(_pcam_params(study, folder), study.root)
    with h5py.File(f, "w") as h:
        h.create_dataset("x", data=ds.x.astype(np.float32))
    with pytest.raises(DataError, match="must be uint8"):
        prepare(_pcam_params(study, folder), study.root)
    write_fake_pcam(folder, ds.x, np.full(len(ds), 3))
    with pytest.raises(DataError, match=r"split_train_y.h5: key 'y' has labels out of range.*3"):
        prepare(_pcam_params(study, folder), study.root)


def test_pcam_corrupt_and_truncated(study, tmp_path, phantom_small):
    folder = write_fake_pcam(tmp_path / "p", phantom_small.x, phantom_small.y)
    f = folder / "camelyonpatch_level_2_split_train_x.h5"
    f.write_bytes(f.read_bytes()[:2000])
    with pytest.raises(DataError, match="split_train_x.h5: not a readable HDF5 file"):
        prepare(_pcam_params(study, folder), study.root)
    f.unlink()
    (folder / (f.name + ".gz")).write_bytes(gzip.compress(np.random.default_rng(0).bytes(5000))[:100])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        prepare(_pcam_params(study, folder), study.root)


def test_pcam_download_needs_network_permission(study, tmp_path):
    p = study.set_params(data={"source": {"kind": "pcam_h5", "path": str(tmp_path / "dl"), "download": True}})
    with pytest.raises(runtime.NetworkDisabled, match="allow_network: false"):
        prepare(p, study.root)


def test_npz_bad_inputs(study, tmp_path, phantom_small):
    ds = phantom_small
    good = npz.write_npz(tmp_path / "good.npz", ds.x, ds.y, ["train"] * 24 + ["valid"] * 24)

    def params_for(path):
        return study.set_params(data={"source": {"kind": "npz", "path": str(path)}, "test": {"kind": "holdout"}})

    with pytest.raises(DataError, match="missing.npz: NPZ file not found"):
        prepare(params_for(tmp_path / "missing.npz"), study.root)
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(DataError, match="trunc.npz: (not a readable|truncated)"):
        prepare(params_for(trunc), study.root)
    z = dict(np.load(good))
    np.savez(tmp_path / "nolabels.npz", **{k: v for k, v in z.items() if k != "labels"})
    with pytest.raises(DataError, match=r"missing key\(s\) \['labels'\]"):
        prepare(params_for(tmp_path / "nolabels.npz"), study.root)
    np.savez(tmp_path / "badlabel.npz", **{**z, "labels": np.full(48, 2, np.uint8)})
    with pytest.raises(DataError, match="key 'labels' has values out of range.*2"):
        prepare(params_for(tmp_path / "badlabel.npz"), study.root)
    np.savez(tmp_path / "novalid.npz", **{**z, "split": np.array(["train"] * 48)})
    with pytest.raises(DataError, match="split 'valid' is empty"):
        prepare(params_for(tmp_path / "novalid.npz"), study.root)
    onecls = npz.write_npz(tmp_path / "onecls.npz", ds.x, np.zeros(48), ["train"] * 24 + ["valid"] * 24)
    with pytest.raises(DataError, match="split 'train' has a single class"):
        prepare(params_for(onecls), study.root)
    jpeg = z["jpeg"].copy()
    o = z["offsets"]
    jpeg[o[5] + 20:o[6]] = 0  # wipe image 5 after its header
    np.savez(tmp_path / "badjpeg.npz", **{**z, "jpeg": jpeg})
    with pytest.raises(DataError, match=r"image 5 \(img0000005.jpg\) is not a readable JPEG"):
        prepare(params_for(tmp_path / "badjpeg.npz"), study.root)
    assert_nothing_written(study.root)


def test_phantom_empty_split_is_an_error(study):
    p = study.set_params(data={"source": {"counts": {"train": 100, "valid": 0, "test": 10}}})
    with pytest.raises(DataError, match="counts.valid must be > 0"):
        prepare(p, study.root)


def test_write_splits_swaps_in_complete_folder(study, tmp_path):
    r = prepare(study.set_params(**SMALL), study.root)
    out = tmp_path / "data_prep"
    out.mkdir()
    (out / "stale.h5").write_text("old")
    write_splits(r, out)
    assert sorted(p.name for p in out.iterdir()) == ["filter_report.csv", "test.h5", "train.h5", "valid.h5"]
    assert len(read_imageset(out / "train.h5")) == len(r.splits["train"])


# ------------------------------------------------------------------ the shared real data
def test_shared_pcam_ai4all_counts():
    idx = npz.read_index(shared_npz())
    assert (idx["split"] == "train").sum() == 19171 and (idx["split"] == "valid").sum() == 849
    valid = npz.read_npz(shared_npz(), splits=("valid",))["valid"]
    assert valid.x.shape == (849, 96, 96, 3) and valid.class_counts() == {0: 471, 1: 378}


def test_offline_guard_blocks_sockets():
    import socket

    runtime.enable_offline_guard()
    try:
        with pytest.raises(runtime.NetworkDisabled, match="blocked"):
            socket.create_connection(("192.0.2.1", 80), timeout=0.1)
    finally:
        runtime.disable_offline_guard()
