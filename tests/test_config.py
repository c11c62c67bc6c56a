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


def test_values_have_one_source_profiles_defaults_yaml():
    """The schema holds types and bounds only: every field is required, so every value comes from
    profiles/defaults.yaml (merged under any params file). Two sources that disagree cannot come back.
    Exempt: the entries of user-written lists (an external encoder), which defaults.yaml cannot hold; their
    optional fields have their one default in the schema."""
    import inspect

    list_entries = {"ExternalEncoder"}

    models = [c for _, c in inspect.getmembers(config, inspect.isclass)
              if issubclass(c, config.Strict) and c is not config.Strict]
    assert len(models) >= 12
    with_values = [f"{m.__name__}.{n}" for m in models for n, f in m.model_fields.items()
                   if not f.is_required() and m.__name__ not in list_entries]
    assert with_values == []
    d = config.defaults()
    raw = config._read_yaml(config.DEFAULTS)
    assert d.prototypes.k == raw["prototypes"]["k"] and d.prototypes.dino.momentum_teacher == raw["prototypes"]["dino"]["momentum_teacher"]
    # a params file may leave settings out: they come from defaults.yaml
    p = config.validate({"prototypes": {"k": 5}})
    assert p.prototypes.k == 5 and p.prototypes.dino == d.prototypes.dino
    assert config.section("ldm_finetune.train", steps=7) == d.ldm_finetune.train.model_copy(update={"steps": 7})


def test_params_rewritten_by_dvc_exp_run_still_validate():
    """`dvc exp run -S key=value` rewrites params.yaml: nulls become empty values and the quoted 'no' of
    mixed_precision becomes a bare no, which PyYAML reads as false. Both must mean what they meant."""
    text = "ldm_finetune:\n  train:\n    mixed_precision: no\n  pretrained:\nprototypes:\n  dino:\n    mixed_precision: no\n"
    p = config.validate(yaml.safe_load(text))
    assert p.ldm_finetune.train.mixed_precision == "no" and p.prototypes.dino.mixed_precision == "no"
    assert p.ldm_finetune.pretrained is None
    with pytest.raises(config.ParamsError, match="mixed_precision"):
        config.validate({"ldm_finetune": {"train": {"mixed_precision": True}}})
