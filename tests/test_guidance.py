import numpy as np
import pytest
import torch

from pathsynth.config import section
from pathsynth.diffusion import guidance, models
from pathsynth.diffusion import train as T
from pathsynth.diffusion.classifier import ClassifierTask, NoisyLatentClassifier
from pathsynth.training import train_loop

from test_diffusion import PROMPTS, tiny_parts


@pytest.fixture(scope="module")
def parts():
    tok, te, unet, vae = tiny_parts(seed=1)
    return tok, te.eval(), unet.eval(), vae.eval()


def test_loop_matches_the_diffusers_pipeline(parts):
    tok, te, unet, vae = parts
    sched = models.noise_scheduler()
    pipe = models.assemble_pipeline(vae, te, tok, unet, sched)
    ref = T.sample_images(pipe, PROMPTS[:2], [3, 4], 4, 3.0, "cpu")
    z = guidance.sample_latents(unet, te, tok, guidance.make_scheduler("ddim", sched.config), PROMPTS[:2], [3, 4], 4,
                                cfg_scale=3.0)
    ours = guidance.decode(vae, z)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_an_image_depends_only_on_its_seed(parts):
    tok, te, unet, _ = parts
    cfg = models.noise_scheduler().config
    for sampler in guidance.SAMPLERS:
        batch = guidance.sample_latents(unet, te, tok, guidance.make_scheduler(sampler, cfg), PROMPTS[:3], [5, 6, 7], 5, 2.0)
        alone = guidance.sample_latents(unet, te, tok, guidance.make_scheduler(sampler, cfg), PROMPTS[1:2], [6], 5, 2.0)
        torch.testing.assert_close(batch[1:2], alone, rtol=1e-4, atol=1e-5)
        again = guidance.sample_latents(unet, te, tok, guidance.make_scheduler(sampler, cfg), PROMPTS[:3], [5, 6, 7], 5, 2.0)
        torch.testing.assert_close(batch, again, rtol=0, atol=0)


def test_classifier_guidance_raises_the_hit_rate(parts, tmp_path):
    """Latents of three known 'prototypes' (well-separated centres); a noise-aware classifier trained on
    them steers samples of an untrained UNet towards the requested centre. The judge is independent
    of the classifier: the nearest centre of the final latent."""
    tok, te, unet, _ = parts
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 4, 8, 8, generator=g) * 1.5
    y = torch.arange(120) % 3
    mean = centres[y] + 0.3 * torch.randn(120, 4, 8, 8, generator=g)
    torch.manual_seed(0)
    task = ClassifierTask(NoisyLatentClassifier(num_classes=3, channels=(16, 32), time_dim=16), models.noise_scheduler())
    clf = train_loop(task, {"mean": mean, "std": torch.zeros_like(mean), "prototype": y},
                     section("ldm_finetune.vae.train", weight_decay=0.01, steps=150, batch_size=40, lr=2e-3, ema_decay=None, log_every=50,
                             checkpoint_every=1000),
                     tmp_path, "h", seed=0)["model"].model.eval()
    targets = np.arange(24) % 3
    seeds = list(range(100, 124))
    cfg = models.noise_scheduler().config

    def hit_rate(scale):
        z = guidance.sample_latents(unet, te, tok, guidance.make_scheduler("ddim", cfg), [""] * 24, seeds, 10,
                                    classifier=clf, targets=targets, classifier_scale=scale)
        nearest = ((z[:, None] - centres[None]) ** 2).flatten(2).sum(-1).argmin(1).numpy()
        return (nearest == targets).mean()

    unguided, guided = hit_rate(0.0), hit_rate(30.0)
    assert guided > unguided + 0.3 and guided > 0.8, (unguided, guided)


def test_bad_guidance_inputs(parts):
    tok, te, unet, _ = parts
    cfg = models.noise_scheduler().config
    with pytest.raises(ValueError, match="guidance scales must be >= 0"):
        guidance.sample_latents(unet, te, tok, guidance.make_scheduler("ddim", cfg), [""], [0], 2, cfg_scale=-1)
    with pytest.raises(ValueError, match="needs the prototype classifier"):
        guidance.sample_latents(unet, te, tok, guidance.make_scheduler("ddim", cfg), [""], [0], 2, classifier_scale=1.0)
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        guidance.make_scheduler("euler", cfg)


# ------------------------------------------------------------------ the guided_sampling stage's machinery
import pandas as pd  # noqa: E402

from pathsynth.config import ParamsError, validate  # noqa: E402


def GuidedSampling(**kw):
    return section("guided_sampling", **kw)
from pathsynth.data.dataset import DataError  # noqa: E402
from pathsynth.diffusion import sampling as S  # noqa: E402
from pathsynth.prototypes.prompts import prompt_table  # noqa: E402


def _table():
    t = prompt_table(np.array([0, 1, 0, 1, 0, 1]), np.array([0, 0, 1, 1, 2, 2]))
    t["in_balanced_subset"] = True
    return t


@pytest.fixture(scope="module")
def models_(parts):
    tok, te, unet, vae = parts
    t = _table()
    base = {"unet": unet, "text_encoder": te, "tokenizer": tok, "vae": vae,
            "train_scheduler_config": models.noise_scheduler().config}
    torch.manual_seed(0)
    return {"mep": {**base, "prompts": set(t.prompt_mep) | {""}, "digest": "mep-model"},
            "baseline": {**base, "prompts": set(t.prompt_baseline) | {""}, "digest": "baseline-model"},
            "classifier": NoisyLatentClassifier(num_classes=3, channels=(8, 16), time_dim=16).eval(),
            "classifier_digest": "classifier-model"}


def test_allocation_covers_prototypes_and_balances_labels():
    req = S.allocate(_table(), 12, "uniform", True, seed=1)
    assert np.bincount(req.prototype).tolist() == [4, 4, 4] and req.label.mean() == 0.5
    again = S.allocate(_table(), 12, "uniform", True, seed=1)
    np.testing.assert_array_equal(req.seed, again.seed)
    assert len(set(req.seed.tolist())) == 12
    with pytest.raises(ValueError, match="n_per_mode must be > 0"):
        S.allocate(_table(), 0, "uniform", True, 1)


def _even_table():
    """Four prototypes, each seen with both labels: an even number of prototypes is where the old
    allocation (prototype i mod K, label i mod 2) tied every label to half of the prototypes."""
    t = prompt_table(np.array([0, 1] * 4 + [0] * 4), np.array([0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3]))
    t["in_balanced_subset"] = True
    return t


def test_allocation_requests_every_label_prototype_pair_and_does_not_tie_them():
    t = _even_table()
    req = S.allocate(t, 16, "uniform", True, seed=1)
    asked = set(zip(req.label.tolist(), req.prototype.tolist()))
    assert asked == set(zip(t.label.tolist(), t.prototype.tolist())) == {(c, k) for c in (0, 1) for k in range(4)}
    assert np.bincount(req.prototype).tolist() == [4, 4, 4, 4] and req.label.mean() == 0.5
    # only pairs that exist: a prototype never seen with label 1 is never asked for with label 1
    t2 = prompt_table(np.array([0, 0, 1, 0]), np.array([0, 1, 1, 2]))
    t2["in_balanced_subset"] = True
    for alloc in ("uniform", "proportional"):
        for bal in (True, False):
            r = S.allocate(t2, 40, alloc, bal, seed=3)
            assert set(zip(r.label.tolist(), r.prototype.tolist())) <= {(0, 0), (0, 1), (1, 1), (0, 2)}
    r = S.allocate(t2, 40, "uniform", False, seed=3)
    assert np.bincount(r.prototype).tolist() == [10, 20, 10]  # pairs in turn: prototype 1 has two


def test_proportional_allocation_follows_the_pair_frequencies():
    t = prompt_table(np.array([0] * 6 + [1] * 2), np.array([0, 0, 0, 0, 0, 1, 1, 1]))
    t["in_balanced_subset"] = True
    r = S.allocate(t, 4000, "proportional", False, seed=5)
    share = {(c, k): np.mean((r.label == c) & (r.prototype == k)) for c, k in ((0, 0), (0, 1), (1, 1))}
    assert abs(share[(0, 0)] - 5 / 8) < 0.03 and abs(share[(0, 1)] - 1 / 8) < 0.03 and abs(share[(1, 1)] - 2 / 8) < 0.03
    rb = S.allocate(t, 4000, "proportional", True, seed=5)
    assert rb.label.mean() == 0.5 and (rb.prototype[rb.label == 1] == 1).all()
    assert abs(np.mean(rb.prototype[rb.label == 0] == 0) - 5 / 6) < 0.03


def test_chance_hit_rate_follows_the_allocation():
    real = np.array([0] * 6 + [1] * 3 + [2] * 1)  # q = 0.6, 0.3, 0.1
    assert S.chance_hit_rate(np.array([0, 1, 2] * 5), real) == pytest.approx(1 / 3)  # uniform over all K: 1/K
    assert S.chance_hit_rate(real, real) == pytest.approx(0.36 + 0.09 + 0.01)  # proportional: sum q^2
    assert S.chance_hit_rate(np.array([2, 2]), real) == pytest.approx(0.1)  # only a rare prototype asked for


def test_model_digest_is_by_content_not_file_times(tmp_path):
    import os
    import shutil

    a = tmp_path / "a"
    (a / "unet").mkdir(parents=True)
    (a / "unet" / "w.bin").write_bytes(b"weights")
    (a / "model_index.json").write_text("{}")
    shutil.copytree(a, tmp_path / "b")  # a fresh clone / dvc checkout: same bytes, new times
    os.utime(tmp_path / "b" / "unet" / "w.bin", (1, 1))
    assert S.model_digest(a) == S.model_digest(tmp_path / "b")
    (tmp_path / "b" / "unet" / "w.bin").write_bytes(b"weightz")
    assert S.model_digest(a) != S.model_digest(tmp_path / "b")


def test_shard_keys_depend_only_on_what_makes_the_mode_s_images(models_):
    gp = GuidedSampling(n_per_mode=8, shard_size=4)
    req = S.allocate(_table(), 8, "uniform", True, seed=2)
    keys = {m: S.shard_keys(m, req, gp, models_) for m in S.MODE_SPEC}
    # another cfg scale changes the modes with classifier-free guidance only
    cfg2 = {m: S.shard_keys(m, req, gp.model_copy(update={"cfg_scale": 5.0}), models_) for m in S.MODE_SPEC}
    assert [m for m in S.MODE_SPEC if cfg2[m] != keys[m]] == ["cfg_baseline", "cfg_mep", "cfg_mep_classifier"]
    # more images or other modes listed: the shards already made keep their keys
    more = S.allocate(_table(), 16, "uniform", True, seed=2)
    gp16 = gp.model_copy(update={"n_per_mode": 16, "modes": ["classifier"]})
    assert S.shard_keys("classifier", more, gp16, models_)[:2] == keys["classifier"]
    # another model (by content) changes the keys of the modes that use it
    other = {**models_, "baseline": {**models_["baseline"], "digest": "retrained"}}
    assert S.shard_keys("cfg_baseline", req, gp, other) != keys["cfg_baseline"]
    assert S.shard_keys("cfg_mep", req, gp, other) == keys["cfg_mep"]


def test_a_stale_shard_is_remade_and_never_merged(models_, tmp_path, monkeypatch):
    req = S.allocate(_table(), 4, "uniform", True, seed=2)
    gp = GuidedSampling(n_per_mode=4, steps=2, shard_size=2, batch_size=2, cfg_scale=2.0)
    S.generate_mode("cfg_mep", req, models_, gp, tmp_path)
    gp5 = gp.model_copy(update={"cfg_scale": 5.0})
    with pytest.raises(DataError, match="made with other models, settings or requests"):
        S.merge_mode("cfg_mep", 4, 2, tmp_path, tmp_path / "m.h5", keys=S.shard_keys("cfg_mep", req, gp5, models_))
    reused = []
    monkeypatch.setattr(S, "log_reused", lambda *a: reused.append(a))
    assert S.generate_mode("cfg_mep", req, models_, gp5, tmp_path)["images_made"] == 4  # remade, not reused
    assert S.generate_mode("cfg_mep", req, models_, gp5, tmp_path)["images_made"] == 0  # now reused
    assert reused == [("cfg_mep", tmp_path / "cfg_mep", "2 of 2 shards")]  # and said so (the stage's time is partial)
    ds = S.merge_mode("cfg_mep", 4, 2, tmp_path, tmp_path / "m.h5", keys=S.shard_keys("cfg_mep", req, gp5, models_))
    assert (ds.meta["cfg_scale"] == 5.0).all()


def test_sharded_equals_unsharded_and_resume_loses_nothing(models_, tmp_path, monkeypatch):
    req = S.allocate(_table(), 8, "uniform", True, seed=2)
    whole = GuidedSampling(n_per_mode=8, steps=3, shard_size=8, batch_size=2, cfg_scale=2.0, classifier_scale=5.0)
    sharded = whole.model_copy(update={"shard_size": 2})
    S.generate_mode("cfg_mep_classifier", req, models_, whole, tmp_path / "a")
    a = S.merge_mode("cfg_mep_classifier", 8, 8, tmp_path / "a", tmp_path / "a.h5")
    # kill after the first shard, then resume
    real = S.write_imageset
    calls = []

    def write_then_die(path, ds):
        real(path, ds)
        calls.append(path)
        if len(calls) == 1:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(S, "write_imageset", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        S.generate_mode("cfg_mep_classifier", req, models_, sharded, tmp_path / "b")
    monkeypatch.setattr(S, "write_imageset", real)
    first = tmp_path / "b" / "cfg_mep_classifier" / "shard-00000.h5"
    stamp = first.stat().st_mtime_ns
    info = S.generate_mode("cfg_mep_classifier", req, models_, sharded, tmp_path / "b")
    assert info["images_made"] == 6 and first.stat().st_mtime_ns == stamp  # finished shard not redone
    b = S.merge_mode("cfg_mep_classifier", 8, 2, tmp_path / "b", tmp_path / "b.h5")
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(b.meta["index"], np.arange(8))
    for key in ("prompt", "prototype", "seed", "guidance_mode", "cfg_scale", "classifier_scale", "sampler", "steps",
                "jpeg_quality", "model_variant"):
        assert len(b.meta[key]) == 8, key
    assert b.meta["guidance_mode"][0] == "cfg_mep_classifier" and b.meta["classifier_scale"][0] == 5.0
    np.testing.assert_array_equal(b.y, req.label)
    with pytest.raises(DataError, match="shard missing"):
        S.merge_mode("cfg_mep_classifier", 10, 2, tmp_path / "b", tmp_path / "c.h5")


def test_jpeg_roundtrip_is_recorded(models_, tmp_path):
    req = S.allocate(_table(), 2, "uniform", True, seed=3)
    gp = GuidedSampling(n_per_mode=2, steps=2, shard_size=2, batch_size=2, jpeg_quality=75)
    S.generate_mode("cfg_baseline", req, models_, gp, tmp_path)
    ds = S.merge_mode("cfg_baseline", 2, 2, tmp_path, tmp_path / "x.h5")
    assert (ds.meta["jpeg_quality"] == 75).all() and ds.meta["prompt"][0].startswith("Histology image of")


def test_guided_sampling_bad_inputs(models_, tmp_path):
    req = S.allocate(_table(), 4, "uniform", True, seed=2)
    # a model folder from another variant: the baseline model never saw morphology-enriched prompts
    wrong = {**models_, "mep": models_["baseline"]}
    with pytest.raises(DataError, match="was not in the training prompts of the model"):
        S.check_mode(wrong, "cfg_mep", req)
    with pytest.raises(DataError, match="needs the noise-aware prototype classifier"):
        S.check_mode({k: v for k, v in models_.items() if k != "classifier"}, "classifier", req)
    bad = S.Request(np.array([0]), np.array([7]), np.array([1]))  # prototype 7 does not exist
    with pytest.raises(DataError, match="morphology type seven"):
        S.check_mode(models_, "cfg_mep", bad)
    with pytest.raises(ParamsError, match="guided_sampling.cfg_scale"):
        validate({"guided_sampling": {"cfg_scale": -1}})
    with pytest.raises(ParamsError, match="guided_sampling.n_per_mode"):
        validate({"guided_sampling": {"n_per_mode": 0}})
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="cannot be written"):
        S.generate_mode("unguided", req, models_, GuidedSampling(n_per_mode=4), tmp_path / "file" / "sub")
