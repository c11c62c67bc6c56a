import pytest
import yaml

from pathsynth import config


def test_defaults_validate_and_profiles_merge(study):
    for name in ("tiny", "pcam-subset", "paper"):
        p = config.validate(config.profile_params(name, study.root))
        assert p.profile == name
    p = config.validate(config.profile_params("pcam-subset", study.root))
    assert p.data.source.kind == "npz" and p.data.test.kind == "holdout" and p.data.image_size == 64
    # a profile only overrides what it names
    assert p.data_prep.filter.min_mean_v == 70


@pytest.mark.parametrize("raw, key", [
    ({"sed": 1}, "sed"),
    ({"data": {"image_sise": 32}}, "data.image_sise"),
    ({"data_prep": {"filter": {"min_mean_vv": 3}}}, "data_prep.filter.min_mean_vv"),
    ({"prototypes": {"dino": {"epoch": 3}}}, "prototypes.dino.epoch"),
])
def test_unknown_key_is_named(raw, key):
    with pytest.raises(config.ParamsError, match=rf"unknown key '{key}'"):
        config.validate(raw)


def test_bad_values_are_named():
    with pytest.raises(config.ParamsError, match="data.source.kind"):
        config.validate({"data": {"source": {"kind": "tiff"}}})
    with pytest.raises(config.ParamsError, match="needs 'path'"):
        config.validate({"data": {"source": {"kind": "npz"}}})
    with pytest.raises(config.ParamsError, match="data.image_size"):
        config.validate({"data": {"image_size": 2}})


def test_use_profile_writes_params_and_rejects_unknown(study):
    out = config.use_profile("pcam-subset", study.root)
    assert yaml.safe_load(out.read_text())["data"]["source"]["kind"] == "npz"
    assert config.load(out).profile == "pcam-subset"
    with pytest.raises(config.ParamsError, match="unknown profile 'huge'"):
        config.use_profile("huge", study.root)
    (study.root / "profiles" / "typo.yaml").write_text("data: {imagesize: 3}\n")
    with pytest.raises(config.ParamsError, match="data.imagesize"):
        config.use_profile("typo", study.root)
    assert config.load(out).profile == "pcam-subset"  # the failed switch left params.yaml alone


def test_unreadable_params_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("data: [unclosed\n")
    with pytest.raises(config.ParamsError, match="not valid YAML"):
        config.load(p)
    with pytest.raises(config.ParamsError, match="file not found"):
        config.load(tmp_path / "nope.yaml")
