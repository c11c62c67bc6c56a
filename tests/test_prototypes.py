import json

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, softmax

from pathsynth.config import section


def Dino(**kw):
    return section("prototypes.dino", **kw)
from pathsynth.data import phantom
from pathsynth.prototypes import cluster, features, prompts
from pathsynth.ssl import augment, dino
from pathsynth.training import Checkpoints, TrainingError

TINY_DINO = dict(arch="vit_tiny", depth=2, patch_size=8, out_dim=256, head_hidden_dim=128, head_bottleneck_dim=64,
                 batch_size=32, lr=0.004, warmup_epochs=0, local_crops_number=2, momentum_teacher=0.99, log_every=1)


@pytest.fixture(scope="module")
def phantom32():
    from pathsynth.data.prep import resize

    ds = phantom.generate(160, seed=21, artefact_rate=0.0)
    return resize(ds.x, 32), ds.meta["morphology"]


# ------------------------------------------------------------------ DINO loss: known answer
def test_dino_loss_and_centring_known_answer():
    rng = np.random.default_rng(0)
    b, k, n_crops = 3, 5, 4
    s = rng.normal(size=(n_crops * b, k)).astype(np.float32)
    t = rng.normal(size=(2 * b, k)).astype(np.float32)
    loss_fn = dino.DINOLoss(k, n_crops, warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_epochs=0, epochs=1,
                            student_temp=0.1, center_momentum=0.9)
    loss_fn.center.fill_(0.5)
    got = float(loss_fn(torch.from_numpy(s), torch.from_numpy(t), epoch=0))
    # by hand: teacher softmax((t - c) / 0.04), student log_softmax(s / 0.1), all pairs of different views
    q = softmax((t - 0.5) / 0.04, axis=1).reshape(2, b, k)
    ls = log_softmax(s / 0.1, axis=1).reshape(n_crops, b, k)
    terms = [(-q[i] * ls[v]).sum(1).mean() for i in range(2) for v in range(n_crops) if v != i]
    assert got == pytest.approx(np.mean(terms), rel=1e-5)
    # centring: EMA of the teacher batch mean
    np.testing.assert_allclose(loss_fn.center.numpy()[0], 0.9 * 0.5 + 0.1 * t.mean(0), rtol=1e-5)


def test_teacher_temperature_warmup_and_schedules():
    loss_fn = dino.DINOLoss(8, 2, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_epochs=3, epochs=5)
    np.testing.assert_allclose(loss_fn.teacher_temp_schedule, [0.04, 0.055, 0.07, 0.07, 0.07])
    lr = dino.cosine_schedule(1.0, 0.0, epochs=4, niter_per_ep=10, warmup_epochs=1)
    assert len(lr) == 40 and lr[0] == 0 and lr[9] == pytest.approx(1.0) and lr[-1] == pytest.approx(0, abs=0.02)
    assert np.all(np.diff(lr[10:]) <= 1e-12)  # cosine decay after warm-up


def test_head_last_layer_is_weight_normalised():
    head = dino.DINOHead(16, 32, 24, 8)
    w = head.last_layer.weight
    np.testing.assert_allclose(w.norm(dim=1).detach().numpy(), 1.0, rtol=1e-5)
    assert not head.last_layer.parametrizations.weight.original0.requires_grad


def test_collapse_monitor_flags_uniform_and_one_hot():
    mon = dino.CollapseMonitor(64)
    uniform = torch.full((16, 64), 1 / 64)
    with pytest.warns(UserWarning, match="COLLAPSE"):
        assert mon.check(np.log(64), dino.collapse_stats(uniform), epoch=2)
    one_hot = torch.zeros(16, 64)
    one_hot[:, 3] = 1
    assert any("one dimension" in p for p in dino.CollapseMonitor(64).check(1.0, dino.collapse_stats(one_hot), 0))
    healthy = torch.eye(64)[torch.arange(16) * 4] * 0.9 + 0.1 / 64
    assert dino.CollapseMonitor(64).check(2.0, dino.collapse_stats(healthy), 2) == []


# ------------------------------------------------------------------ augmentation
def test_multicrop_shapes_and_determinism():
    x = torch.rand(6, 3, 32, 32)
    mc = augment.MultiCrop(32, 8, n_local=3, local_fraction=0.5)
    v1 = mc(x, torch.Generator().manual_seed(1))
    v2 = mc(x, torch.Generator().manual_seed(1))
    assert [tuple(v.shape) for v in v1] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * 3
    for a, b in zip(v1, v2):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(v1[0], mc(x, torch.Generator().manual_seed(2))[0])


def test_hed_jitter_is_identity_without_jitter_and_stays_in_range():
    x = torch.rand(4, 3, 8, 8) * 0.8 + 0.1
    same = augment.hed_jitter(x, torch.Generator().manual_seed(0), sigma=0.0, bias=0.0)
    torch.testing.assert_close(same, x, atol=1e-4, rtol=1e-4)
    j = augment.hed_jitter(x, torch.Generator().manual_seed(0), sigma=0.3, bias=0.3, p=1.0)
    assert j.min() >= 0 and j.max() <= 1 and not torch.allclose(j, x)


def test_rot90_and_blur_keep_content():
    x = torch.rand(8, 3, 16, 16)
    r = augment.flips_and_rot90(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(r.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)))  # a permutation of pixels
    flat = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(augment.gaussian_blur(flat, torch.Generator().manual_seed(0), p=1.0), flat)


# ------------------------------------------------------------------ DINO training
def test_dino_learns_and_does_not_collapse(tmp_path, phantom32):
    """The per-epoch DINO loss first rises while the centre builds up and flattens the teacher
    (the known early phase of DINO), so 'the loss falls' is measured where it is meaningful: on fixed
    views against the final teacher, the trained student must fit the teacher better than the same
    student at initialisation; and over the run no collapse is flagged."""
    import copy

    x, _ = phantom32
    cfg = Dino(**TINY_DINO, epochs=3)
    out = dino.train_dino(x, cfg, tmp_path / "ck", seed=3, plots_csv=tmp_path / "loss.csv")
    assert out["collapse"] == []
    torch.manual_seed(3)  # train_dino builds the student first after seeding: the same initial weights
    init = dino.MultiCropWrapper(dino.build_vit(cfg.arch, cfg.depth, cfg.patch_size, 32),
                                 dino.DINOHead(192, cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim)).eval()
    batch = torch.from_numpy(x[:64]).permute(0, 3, 1, 2).float() / 255
    views = out["crops"](batch, torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_out = out["teacher"](views[:2])
        after = float(copy.deepcopy(out["loss_fn"])(out["student"](views), t_out, epoch=2))
        before = float(copy.deepcopy(out["loss_fn"])(init(views), t_out, epoch=2))
    assert after < before - 0.1, (before, after)
    assert (tmp_path / "loss.csv").read_text().count("\n") > 10


def test_dino_resume_after_kill_mid_epoch_matches_uninterrupted(tmp_path, phantom32, monkeypatch):
    """DINO on the shared loop, hybrid data (MixedStream), a per-epoch evaluation: killed after the
    checkpoint at step 4 (of 5 per epoch), resumed, it ends bit-exact with an uninterrupted run, with
    the whole log and every evaluation."""
    x, _ = phantom32
    second = x[:, ::-1].copy()  # a stand-in 'synthetic' set: the images flipped
    cfg = Dino(**TINY_DINO, epochs=2, checkpoint_every=2)

    def knn_probe(task):  # any deterministic function of the teacher
        return {"teacher_norm": float(sum(p.double().norm() for p in task.teacher.backbone.parameters()))}

    kw = dict(seed=5, second=second, ratio=0.5, evaluate=knn_probe)
    full = dino.train_dino(x, cfg, tmp_path / "full", plots_csv=tmp_path / "full.csv", **kw)
    real_save = Checkpoints.save

    def save_then_die(self, step, state, extra=None):
        real_save(self, step, state, extra)
        if step == 4:
            raise KeyboardInterrupt("killed after the checkpoint at step 4, mid-epoch")

    monkeypatch.setattr(Checkpoints, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        dino.train_dino(x, cfg, tmp_path / "killed", plots_csv=tmp_path / "killed.csv", **kw)
    monkeypatch.setattr(Checkpoints, "save", real_save)
    resumed = dino.train_dino(x, cfg, tmp_path / "killed", plots_csv=tmp_path / "killed.csv", **kw)
    assert resumed["steps"] == full["steps"] == 10
    def learnt(rows):  # everything but the timing
        return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]

    assert learnt(resumed["history"]) == learnt(full["history"]) and len(full["history"]) == 10
    assert [e["step"] for e in resumed["evals"]] == [0, 5, 10] and resumed["evals"] == full["evals"]
    import pandas as pd
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "killed.csv").drop(columns="images_per_s"),
                                  pd.read_csv(tmp_path / "full.csv").drop(columns="images_per_s"))
    for k, v in full["backbone"].state_dict().items():
        torch.testing.assert_close(resumed["backbone"].state_dict()[k], v, rtol=0, atol=0)


def test_dino_teacher_is_eval_ema_of_student(phantom32):
    cfg = Dino(**TINY_DINO, epochs=1, checkpoint_every=10)
    task = dino.DinoTask(cfg, 32, steps_per_epoch=4)
    task.train()
    assert task.student.training and not task.teacher.training
    assert all(not p.requires_grad for p in task.teacher.parameters())
    assert task.teacher.backbone.blocks[-1].drop_path1.__class__.__name__ == "Identity"
    t0 = [p.clone() for p in task.teacher.parameters()]
    with torch.no_grad():
        for p in task.student.parameters():
            p.add_(1.0)
    task.after_step(0)
    m = task.mom_s[0]
    for a, b, s in zip(task.teacher.parameters(), t0, task.student.parameters()):
        torch.testing.assert_close(a, m * b + (1 - m) * s)


def test_checkpoints_refuse_other_params(tmp_path):
    Checkpoints(tmp_path, "aaaa").save(0, {"w": 1})
    with pytest.raises(TrainingError, match="different params"):
        Checkpoints(tmp_path, "bbbb").latest()
    c = Checkpoints(tmp_path, "aaaa", keep=2)
    for s in (1, 2, 3):
        c.save(s, {"w": s})
    assert [p.name for p in c.list()] == ["checkpoint-2", "checkpoint-3"]


def test_dino_bad_input_is_an_error_before_compute(tmp_path, phantom32):
    x = phantom32[0]
    cfg = Dino(**TINY_DINO)
    with pytest.raises(ValueError, match="batch_size 512 .* larger than the 160"):
        dino.train_dino(x, Dino(**{**TINY_DINO, "batch_size": 512}), tmp_path, seed=0)
    with pytest.raises(ValueError, match="1 image"):
        dino.train_dino(x[:1], cfg, tmp_path, seed=0)
    with pytest.raises(ValueError, match="0 image"):
        dino.train_dino(x[:0], cfg, tmp_path, seed=0)
    with pytest.raises(ValueError, match="same size"):
        dino.train_dino(x, cfg, tmp_path, seed=0, second=x[:, :16, :16].copy(), ratio=0.5)
    with pytest.raises(ValueError, match="ratio must be in"):
        dino.train_dino(x, cfg, tmp_path, seed=0, second=x, ratio=1.5)
    assert not any(tmp_path.iterdir())  # nothing written


# ------------------------------------------------------------------ clustering
def test_kmeans_deterministic_and_assign_matches(phantom32):
    f = np.random.default_rng(0).normal(size=(200, 16)) + np.repeat(np.eye(16)[:4] * 6, 50, 0)
    a, b = cluster.fit_kmeans(f, 4, 5, seed=7), cluster.fit_kmeans(f, 4, 5, seed=7)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(cluster.assign(a.cluster_centers_, f), a.labels_)


def test_k_sweep_finds_the_true_k():
    from sklearn.datasets import make_blobs

    f, _ = make_blobs(400, n_features=8, centers=5, cluster_std=0.5, random_state=0)
    sweep = cluster.k_sweep(f, [2, 3, 4, 5, 6, 8], n_init=4, seed=0)
    assert cluster.choose_k(sweep, "silhouette") == 5
    assert cluster.choose_k(sweep, "davies_bouldin") == 5
    assert set(sweep.columns) >= {"k", "silhouette", "davies_bouldin", "s_dbw"}


def test_clustering_bad_inputs():
    f = np.random.default_rng(0).normal(size=(10, 4))
    with pytest.raises(cluster.ClusteringError, match="K = 33 is larger than the number of images \\(10\\)"):
        cluster.fit_kmeans(f, 33, 2, 0)
    with pytest.raises(cluster.ClusteringError, match="identical"):
        cluster.fit_kmeans(np.ones((50, 4)), 3, 2, 0)


# ------------------------------------------------------------------ prompts
def test_prompt_strings_are_exact():
    assert prompts.baseline_prompt(1) == "Histology image of cancer tissue"
    assert prompts.baseline_prompt(0) == "Histology image of healthy tissue"
    assert prompts.mep_prompt(1, 21) == "Histology image of cancer tissue, morphology type twenty-one"
    assert prompts.mep_prompt(0, 0) == "Histology image of healthy tissue, morphology type zero"
    assert prompts.mep_prompt(0, 32) == "Histology image of healthy tissue, morphology type thirty-two"
    t = prompts.prompt_table(np.array([0, 1, 1]), np.array([3, 3, 12]))
    assert t.prompt_mep.tolist()[2] == "Histology image of cancer tissue, morphology type twelve"


def test_prompt_balanced_subset():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 3000)
    protos = rng.choice(12, 3000, p=np.linspace(2, 0.5, 12) / np.linspace(2, 0.5, 12).sum())
    t = prompts.prompt_table(labels, protos)
    rows, info = prompts.prompt_balanced_subset(t, 4, seed=1)
    sub = t.iloc[rows]
    per = sub.groupby(["label", "prompt_mep"]).size()
    assert per.nunique() == 1 and per.iloc[0] == info["images_per_prompt"]
    assert sub.label.value_counts().nunique() == 1
    assert info["prompts_per_class"] >= 4 and len(rows) == len(set(rows))
    # the optimum: no other n gives a larger balanced set
    counts = {c: t[t.label == c].prompt_mep.value_counts() for c in (0, 1)}
    best = max(2 * n * min(counts[0].iloc[n - 1], counts[1].iloc[n - 1]) for n in range(4, 13))
    assert info["n_images"] == best
    rows2, _ = prompts.prompt_balanced_subset(t, 4, seed=1)
    np.testing.assert_array_equal(rows, rows2)
    with pytest.raises(ValueError, match="only 12 prompts per class occur"):
        prompts.prompt_balanced_subset(t, 13, seed=1)


# ------------------------------------------------------------------ extractors
def test_saved_extractor_roundtrip_and_mismatch(tmp_path):
    cfg = Dino(**TINY_DINO, epochs=5)
    bb = dino.build_vit(cfg.arch, cfg.depth, cfg.patch_size, 32)
    folder = features.save_extractor(bb, cfg, 32, tmp_path / "ext")
    ext = features.SelfTrained.load(folder)
    x = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(ext(x), features.SelfTrained(bb, "x")(x), rtol=1e-5, atol=1e-6)
    conf = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**conf, "depth": 3}))
    with pytest.raises(features.ExtractorError, match="weights do not match the architecture"):
        features.SelfTrained.load(folder)


def test_pretrained_hub_id_without_network_is_an_error(tmp_path):
    with pytest.raises(features.ExtractorError, match="needs allow_network: true"):
        features.Pretrained("facebook/dino-vitb8", allow_network=False, root=tmp_path)
    with pytest.raises(features.ExtractorError, match="does not exist"):
        features.Pretrained("./models/nothing-here", allow_network=False, root=tmp_path)


def test_pretrained_local_vit_scales_pixels_once(tmp_path):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    conf = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     image_size=32, patch_size=8)
    ViTModel(conf, add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    proc = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406],
                             image_std=[0.229, 0.224, 0.225])
    proc.save_pretrained(tmp_path / "vit")
    ext = features.Pretrained(str(tmp_path / "vit"), allow_network=False, root=tmp_path)
    white = np.full((2, 32, 32, 3), 255, np.uint8)
    px = ext.processor(images=list(white), return_tensors="pt")["pixel_values"]
    np.testing.assert_allclose(px[0, :, 0, 0].numpy(), (1 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]), rtol=1e-5)
    assert ext(white).shape == (2, 32)
    # prototypes.pretrained_batch_size is the batch the extractor runs with
    from pathsynth.config import validate
    params = validate({"prototypes": {"extractor": "pretrained", "pretrained": str(tmp_path / "vit"),
                                      "pretrained_batch_size": 3}})
    ext = features.load_extractor(params, tmp_path)
    seen = []
    ext.model.register_forward_hook(lambda m, i, o: seen.append(len(o.last_hidden_state)))
    assert ext(np.zeros((7, 32, 32, 3), np.uint8)).shape == (7, 32) and seen == [3, 3, 1]
    # a folder that is not a ViT is a clear error
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{}")
    with pytest.raises(features.ExtractorError, match="cannot load"):
        features.Pretrained(str(tmp_path / "junk"), allow_network=False, root=tmp_path)


def test_dino_teacher_is_deterministic_and_the_student_is_not():
    """The teacher has no stochastic depth and runs in eval mode (DINO reference); the student keeps
    drop path 0.1, which is what makes two of its passes differ (so the check can see the difference)."""
    from pathsynth.config import section


def Dino(**kw):
    return section("prototypes.dino", **kw)

    cfg = Dino(depth=4, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)
    torch.manual_seed(0)
    student, teacher = dino.build_student_teacher(cfg, 32)
    x = torch.randn(4, 3, 32, 32)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert torch.equal(teacher(x), teacher(x))
    student.train()
    assert not torch.equal(student(x), student(x))
    student.eval()
    torch.testing.assert_close(student(x), teacher(x))  # same weights at the start


def test_recovery_matches_sklearn_and_its_ci_covers_it():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, 400)
    pred = np.where(rng.random(400) < 0.7, true, rng.integers(0, 4, 400))  # 70% kept
    r = cluster.recovery(true, pred, n_bootstrap=200, seed=1)
    assert r["ari"] == pytest.approx(adjusted_rand_score(true, pred)) and r["nmi"] == pytest.approx(normalized_mutual_info_score(true, pred))
    assert r["ari_ci95"][0] < r["ari"] < r["ari_ci95"][1] and r["ari_ci95"][1] - r["ari_ci95"][0] < 0.2
    perfect = cluster.recovery(true, (true + 1) % 4, 50, 1)  # a relabelling is a perfect recovery
    assert perfect["ari"] == 1.0 and perfect["ari_ci95"] == [1.0, 1.0]
    with pytest.raises(cluster.ClusteringError, match="equally long"):
        cluster.recovery(true, pred[:10], 50, 1)


def test_silhouette_uses_a_seeded_subsample_of_the_size_asked():
    x = np.random.default_rng(0).normal(size=(300, 5))
    lab = (x[:, 0] > 0).astype(int)
    a, b = cluster.silhouette(x, lab, 100, seed=3), cluster.silhouette(x, lab, 100, seed=3)
    assert a == b and a["n"] == 100 and 0 < a["value"] < 1
    assert cluster.silhouette(x, lab, 1000, seed=3)["n"] == 300
