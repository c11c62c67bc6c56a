import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pathsynth.config import section

from conftest import wilson
from pathsynth.data.dataset import DataError, ImageSet
from pathsynth.diffusion import models, train as T
from pathsynth.diffusion.classifier import ClassifierTask, NoisyLatentClassifier, accuracy_by_noise
from pathsynth.prototypes.prompts import baseline_prompt, mep_prompt
from pathsynth.training import Task, TrainingError, params_hash, train_loop

PROMPTS = [mep_prompt(y, c) for y in (0, 1) for c in range(3)] + [baseline_prompt(0), baseline_prompt(1)]
LP = section("ldm_finetune", text_encoder={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_length": 16},
             unet={"block_out_channels": [16, 32], "attention_head_dim": 4})


def loop(**kw):
    base = dict(steps=6, batch_size=8, lr=1e-3, ema_decay=None, log_every=1, checkpoint_every=2)
    return section("ldm_finetune.vae.train", **{"weight_decay": 0.01, **base, **kw})


def tiny_parts(seed=0):
    torch.manual_seed(seed)
    tok = models.build_tokenizer(PROMPTS + [""], 16)
    te = models.build_text_encoder(LP.text_encoder, tok)
    unet = models.build_unet(LP.unet, 8, 4, te.config.hidden_size)
    vae = models.build_vae(LP.vae)
    return tok, te, unet, vae


def latents(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.full((n, 4, 8, 8), 0.05)


def test_tokenizer_is_the_same_in_every_build():
    """The BPE trainer of `tokenizers` broke ties in hash-map order: two builds in one process gave other
    token ids. The vocabulary is now written out in a fixed order."""
    a, b = models.build_tokenizer(PROMPTS + [""], 16), models.build_tokenizer(list(reversed(PROMPTS)) + [""], 16)
    assert a.get_vocab() == b.get_vocab()
    assert models.tokenize(a, PROMPTS).tolist() == models.tokenize(b, PROMPTS).tolist()
    code = ("from pathsynth.diffusion import models; from test_diffusion import PROMPTS; "
            "print(models.tokenize(models.build_tokenizer(PROMPTS + [''], 16), PROMPTS).tolist())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent,
                           timeout=300)
    assert other.stdout.strip() == str(models.tokenize(a, PROMPTS).tolist()), other.stderr[-2000:]


def test_tokenizer_words_are_single_tokens():
    tok = models.build_tokenizer(PROMPTS + [""], 16)
    toks = tok.tokenize(mep_prompt(1, 2))
    assert toks == ["histology</w>", "image</w>", "of</w>", "cancer</w>", "tissue</w>", ",</w>", "morphology</w>",
                    "type</w>", "two</w>"]
    ids = models.tokenize(tok, ["", PROMPTS[0]])
    assert ids.shape == (2, 16) and ids[0, 0] == tok.bos_token_id and ids[0, 1] == tok.eos_token_id
    with pytest.raises(models.ModelError, match="max_length 4 is too short"):
        models.build_tokenizer(PROMPTS, 4)
    # the paper's K = 33: "thirty-one" splits into pieces (its merges lose to other words' in BPE rank order), so its
    # prompt is 17 tokens, more than 16: why pcam-subset and gpu set max_length 24
    long = [mep_prompt(1, c) for c in range(33)]
    with pytest.raises(models.ModelError, match="max_length 16 is too short"):
        models.build_tokenizer(long + [""], 16)
    tok = models.build_tokenizer(long + [""], 24)
    assert max(len(tok(p).input_ids) for p in long) == 17


def test_text_side_is_checked_before_any_training():
    """A max_length too short for one variant's prompts is an error before the first model trains."""
    import pandas as pd

    table = pd.DataFrame({"prompt_baseline": [baseline_prompt(1)] * 2, "prompt_mep": [mep_prompt(1, 31), mep_prompt(0, 2)]})
    T.check_text_side(LP.model_copy(update={"text_encoder": LP.text_encoder.model_copy(update={"max_length": 24})}), table)
    short = LP.model_copy(update={"text_encoder": LP.text_encoder.model_copy(update={"max_length": 8})})
    with pytest.raises(models.ModelError, match="max_length 8 is too short for 'Histology image of cancer tissue, morphology type "):
        T.check_text_side(short, table)
    T.check_text_side(short.model_copy(update={"variants": ["baseline"]}), table)  # baseline prompts fit in 8


def test_unet_loss_falls_on_a_fixed_batch(tmp_path):
    tok, te, unet, _ = tiny_parts()
    prompts = PROMPTS * 1
    ids = models.tokenize(tok, prompts)
    task = T.LDMTask(unet, te, True, models.noise_scheduler(), 0.0, models.tokenize(tok, [""])[0])
    mean, std = latents(len(prompts))
    out = train_loop(task, {"mean": mean, "std": std, "ids": ids}, loop(steps=40, batch_size=len(prompts), lr=3e-3),
                     tmp_path, "h", seed=0)
    first, last = out["history"][0]["loss"], np.mean([h["loss"] for h in out["history"][-5:]])
    assert last < 0.7 * first, (first, last)


def test_min_snr_weighting_follows_the_paper_formula():
    """Min-SNR-gamma (Hang et al. 2023), epsilon prediction: weight = min(SNR, gamma) / SNR with
    SNR = alpha_bar / (1 - alpha_bar), alpha_bar from SD's scaled-linear betas computed here by hand."""
    sched = models.noise_scheduler()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alpha_bar = torch.cumprod(1 - betas, 0)
    t = torch.tensor([0, 10, 100, 500, 999])
    snr = alpha_bar[t] / (1 - alpha_bar[t])
    expect = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr
    assert torch.allclose(T.min_snr_weights(sched, t, 5.0).double(), expect, rtol=1e-4)
    # in the task: a huge gamma is plain MSE; a small one lowers the loss (low-noise samples weigh less)
    tok, te, unet, _ = tiny_parts()
    batch = {"mean": latents(8)[0], "std": torch.zeros(8, 4, 8, 8), "ids": models.tokenize(tok, PROMPTS[:8])}
    empty = models.tokenize(tok, [""])[0]
    with torch.no_grad():
        loss = {gamma: float(T.LDMTask(unet, te, True, sched, 0.0, empty, snr_gamma=gamma)(
            batch, torch.Generator().manual_seed(3))) for gamma in (None, 1e9, 0.01)}
    assert loss[1e9] == pytest.approx(loss[None], rel=1e-5)
    assert loss[0.01] < loss[None]


def test_vae_random_crops_are_subimages_and_bad_sizes_are_errors(tmp_path):
    x = torch.arange(3 * 16 * 16 * 3, dtype=torch.int32).reshape(3, 16, 16, 3)
    g = torch.Generator().manual_seed(0)
    crops = T.random_crops(x, 8, g)
    assert crops.shape == (3, 8, 8, 3)
    for i in range(3):
        r, c = np.argwhere((x[i] == crops[i, 0, 0]).all(-1).numpy())[0]
        assert torch.equal(crops[i], x[i, r:r + 8, c:c + 8])
    cfg = LP.vae.model_copy(update={"crop_size": 10, "train": loop(steps=1)})
    with pytest.raises(ValueError, match="crop_size 10 must be .* multiple of the VAE's downsampling factor 4"):
        T.train_vae(np.zeros((8, 16, 16, 3), np.uint8), cfg, 0, "cpu", tmp_path, tmp_path / "l.csv", "fp")
    cfg = LP.vae.model_copy(update={"crop_size": 8, "train": loop(steps=2, batch_size=4)})
    vae, out = T.train_vae(np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8), cfg, 0, "cpu",
                           tmp_path, tmp_path / "l.csv", "fp")
    assert out["steps"] == 2 and vae.config.scaling_factor > 0


def _small_vit():
    from pathsynth.ssl.dino import build_vit

    torch.manual_seed(0)
    return build_vit("vit_tiny", 2, 4, 16).eval()


def test_dino_perceptual_distance_is_zero_only_for_equal_images_and_symmetric():
    vit = _small_vit()
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1, torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        same, ab, ba = T.dino_perceptual(vit, a, a), T.dino_perceptual(vit, a, b), T.dino_perceptual(vit, b, a)
    assert same.shape == (3,) and torch.allclose(same, torch.zeros(3), atol=1e-10)
    assert (ab > 1e-4).all() and torch.allclose(ab, ba)
    # by hand: each block's patch tokens through timm's own layers, unit-normalised, mean squared difference
    with torch.no_grad():
        from pathsynth.ssl.augment import normalise

        def tokens(x):
            t = vit.patch_embed(normalise((x + 1) / 2))
            t = vit._pos_embed(t)
            t = vit.norm_pre(t)
            out = []
            for blk in vit.blocks:
                t = blk(t)
                out.append(t[:, vit.num_prefix_tokens:])
            return out
        expect = sum(((u / u.norm(dim=-1, keepdim=True)) - (v / v.norm(dim=-1, keepdim=True))).pow(2).mean(dim=(1, 2))
                     for u, v in zip(tokens(a), tokens(b)))
    assert torch.allclose(ab, expect, rtol=1e-4)


def _vae_task(state, **weights):
    t = T.VAETask(models.build_vae(LP.vae), 1e-6, None, **weights)
    t.load_state_dict(state, strict=False)
    return t


def _reconstruct(t, x, seed):
    """VAETask.forward's draws, by hand: flips, then the posterior sample."""
    g = torch.Generator().manual_seed(seed)
    xx = x.float().div(127.5).sub(1).permute(0, 3, 1, 2)
    flip = torch.rand(len(xx), generator=g) < 0.5
    xx = torch.where(flip[:, None, None, None], xx.flip(-1), xx)
    post = t.vae.encode(xx).latent_dist
    return xx, post, t.vae.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=g)).sample


def test_vae_adversarial_terms_do_not_move_the_other_player():
    """One backward pass trains both players: the generator's term must not reach the discriminator's weights and
    the discriminator's loss must not reach the VAE's. Checked against each player's loss written out alone."""
    torch.manual_seed(0)
    state = T.VAETask(models.build_vae(LP.vae), 1e-6, None, disc_weight=0.5).state_dict()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (4, 16, 16, 3), dtype=np.uint8))
    both = _vae_task(state, disc_weight=0.5)
    both({"x": x}, torch.Generator().manual_seed(1)).backward()

    d = _vae_task(state, disc_weight=0.5)
    xx, post, rec = _reconstruct(d, x, 1)
    (0.5 * (torch.relu(1 - d.disc(xx)).mean() + torch.relu(1 + d.disc(rec.detach())).mean())).backward()
    assert all(torch.allclose(p.grad, q.grad, atol=1e-6) for p, q in zip(both.disc.parameters(), d.disc.parameters()))

    v = _vae_task(state, disc_weight=0.5)
    v.disc.requires_grad_(False)
    xx, post, rec = _reconstruct(v, x, 1)
    l1, adv = torch.nn.functional.l1_loss(rec, xx), -v.disc(rec).mean()
    # taming-transformers' adaptive weight: gradient norms of both terms at the decoder's last layer
    last = v.vae.decoder.conv_out.weight
    w = (torch.autograd.grad(l1, last, retain_graph=True)[0].norm()
         / (torch.autograd.grad(adv, last, retain_graph=True)[0].norm() + 1e-4))
    assert 0 < w < 1e4
    (l1 + 1e-6 * post.kl().mean() + 0.5 * w.detach() * adv).backward()
    assert all(torch.allclose(p.grad, q.grad, atol=1e-6) for p, q in zip(both.vae.parameters(), v.vae.parameters()))

    # before disc_start neither term counts: the VAE learns as without a discriminator, the discriminator not at all
    late, plain = _vae_task(state, disc_weight=0.5, disc_start=10), _vae_task(state)
    for t in (late, plain):
        t({"x": x}, torch.Generator().manual_seed(1)).backward()
    assert all(torch.allclose(p.grad, q.grad, atol=1e-7) for p, q in zip(late.vae.parameters(), plain.vae.parameters()))
    assert all(p.grad.abs().max() == 0 for p in late.disc.parameters())


def test_vae_with_the_whole_autoencoder_loss_trains_resumes_and_needs_its_dino(tmp_path):
    from pathsynth.prototypes.features import SelfTrained

    x = np.random.default_rng(0).integers(0, 255, (8, 16, 16, 3), dtype=np.uint8)
    cfg = LP.vae.model_copy(update={"disc_weight": 0.5, "disc_start": 1, "perceptual_weight": 1.0,
                                    "train": loop(steps=2, batch_size=4)})
    with pytest.raises(ValueError, match="perceptual_weight > 0 needs the prototypes stage's own DINO"):
        T.train_vae(x, cfg, 0, "cpu", tmp_path, tmp_path / "l.csv", "fp")
    ext = SelfTrained(_small_vit(), "test")
    vae, out = T.train_vae(x, cfg, 0, "cpu", tmp_path, tmp_path / "l.csv", "fp", perceptual=ext)
    log = pd.read_csv(tmp_path / "l.csv")
    assert list(log.columns[-5:]) == ["l1", "perceptual", "g_loss", "d_loss", "disc_scale"] and (log.perceptual > 0).all()
    assert log.disc_scale.iloc[0] == 0 and log.disc_scale.iloc[-1] > 0  # disc_start 1: off at the first step only
    assert out["steps"] == 2 and vae.config.scaling_factor > 0
    assert not any(k.startswith("_frozen") for k in out["model"].state_dict())  # the DINO is not checkpointed
    again = T.train_vae(x, cfg, 0, "cpu", tmp_path, tmp_path / "l.csv", "fp", perceptual=ext)[1]
    assert again["resumed_from"] == 2
    other = SelfTrained(_small_vit().requires_grad_(False), "other")
    with torch.no_grad():
        other.backbone.blocks[0].mlp.fc1.weight.add_(0.1)
    assert T.train_vae(x, cfg, 0, "cpu", tmp_path, tmp_path / "l.csv", "fp", perceptual=other)[1]["resumed_from"] == 0


def test_sampling_settings_do_not_invalidate_unet_checkpoints():
    h = T.unet_run_hash("mep", LP, 0, "fp", PROMPTS)
    same = LP.model_copy(update={"sample_guidance": 7.5, "n_sample_seeds": 8,
                                 "train": LP.train.model_copy(update={"sample_every": 7, "log_every": 3})})
    assert T.unet_run_hash("mep", same, 0, "fp", PROMPTS) == h
    other = LP.model_copy(update={"train": LP.train.model_copy(update={"lr": 1e-3})})
    assert T.unet_run_hash("mep", other, 0, "fp", PROMPTS) != h
    assert T.unet_run_hash("mep", LP.model_copy(update={"snr_gamma": 5.0}), 0, "fp", PROMPTS) != h
    assert T.unet_run_hash("baseline", LP, 0, "fp", PROMPTS) != h
    # the loop's cadence is left out at any depth, for every model (VAE, classifier, DINO)
    vae = LP.vae.model_dump()
    later = {**vae, "train": {**vae["train"], "checkpoint_every": 7, "keep_checkpoints": 5}}
    assert params_hash({"vae": later}) == params_hash({"vae": vae})
    assert params_hash({"vae": {**vae, "train": {**vae["train"], "steps": 7}}}) != params_hash({"vae": vae})


def test_pipeline_roundtrip_through_plain_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    tok, te, unet, vae = tiny_parts()
    pipe = models.assemble_pipeline(vae, te, tok, unet, models.noise_scheduler())
    pipe.save_pretrained(tmp_path / "p")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "p")
    for k, v in unet.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[k], v)
    a = T.sample_images(loaded, [PROMPTS[0]], [7], 3, 2.0, "cpu")
    b = T.sample_images(pipe, [PROMPTS[0]], [7], 3, 2.0, "cpu")
    assert a.shape == (1, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)  # same weights, same seed: the same image


def test_kill_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    from pathsynth import training

    def make():
        torch.manual_seed(0)
        return ClassifierTask(NoisyLatentClassifier(num_classes=3, channels=(8, 16), time_dim=16), models.noise_scheduler())

    mean, std = latents(24)
    data = {"mean": mean, "std": std, "prototype": torch.arange(24) % 3}
    cfg = loop(ema_decay=0.9)
    full = train_loop(make(), data, cfg, tmp_path / "full", "h", seed=1)["model"].state_dict()
    real = training.Checkpoints.save

    def save_and_die(self, step, state, extra=None):
        real(self, step, state, extra)
        if step == 4:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(training.Checkpoints, "save", save_and_die)
    with pytest.raises(KeyboardInterrupt):
        train_loop(make(), data, cfg, tmp_path / "killed", "h", seed=1)
    monkeypatch.setattr(training.Checkpoints, "save", real)
    resumed = train_loop(make(), data, cfg, tmp_path / "killed", "h", seed=1)
    assert resumed["resumed_from"] == 4
    for k, v in full.items():
        torch.testing.assert_close(resumed["model"].state_dict()[k], v, rtol=0, atol=0)
    # the same folder under other params: refused
    with pytest.raises(TrainingError, match="different params"):
        train_loop(make(), data, cfg, tmp_path / "killed", "other-hash", seed=1)


def test_loss_log_survives_a_rerun_that_resumes_a_finished_run(tmp_path):
    """DVC deletes a stage's CSV outputs before rerunning it; the run resumes from its final checkpoint
    and must write the whole loss log again."""
    def once():
        torch.manual_seed(0)
        task = ClassifierTask(NoisyLatentClassifier(num_classes=3, channels=(8, 16), time_dim=16), models.noise_scheduler())
        data = {"mean": latents(16)[0], "std": latents(16)[1], "prototype": torch.arange(16) % 3}
        return train_loop(task, data, loop(steps=6, checkpoint_every=3), tmp_path / "ck", "h", seed=0,
                          log_csv=tmp_path / "loss.csv")
    first = once()
    rows = pd.read_csv(tmp_path / "loss.csv")
    assert rows.step.tolist() == [1, 2, 3, 4, 5, 6]
    (tmp_path / "loss.csv").unlink()
    again = once()
    assert again["resumed_from"] == 6
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "loss.csv"), rows)
    assert again["history"] == first["history"]


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    class Bad(Task):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, batch, g):
            return self.w * float("nan")

    with pytest.raises(TrainingError, match="loss became nan at step 0"):
        train_loop(Bad(), {"x": torch.zeros(8)}, loop(), tmp_path, "h", seed=0)


def test_batch_larger_than_data(tmp_path):
    with pytest.raises(TrainingError, match="batch size 64 is larger than the 8 training items"):
        train_loop(ClassifierTask(NoisyLatentClassifier(num_classes=2), models.noise_scheduler()),
                   {"mean": torch.zeros(8, 4, 8, 8)}, loop(batch_size=64), tmp_path, "h", seed=0)


def test_classifier_learns_clean_latents_and_reports_noise_levels(tmp_path):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(96) % 3
    centres = torch.randn(3, 4, 8, 8, generator=g) * 2
    mean = centres[y] + 0.3 * torch.randn(96, 4, 8, 8, generator=g)
    torch.manual_seed(0)
    task = ClassifierTask(NoisyLatentClassifier(num_classes=3, channels=(16, 32), time_dim=16), models.noise_scheduler())
    out = train_loop(task, {"mean": mean, "std": torch.zeros_like(mean), "prototype": y}, loop(steps=80, batch_size=32),
                     tmp_path, "h", seed=0)
    rows = accuracy_by_noise(out["model"].model, models.noise_scheduler(), mean, y, 4, seed=0)
    assert rows[0]["accuracy"] > 0.9  # almost clean latents: easy
    assert rows[-1]["accuracy"] < 0.6  # pure noise: about chance (1/3)
    for r in rows:  # the Wilson interval, checked against the formula written out
        assert r["n"] == 96 and (r["ci_low"], r["ci_high"]) == pytest.approx(wilson(round(r["accuracy"] * 96), 96))


def _save_tiny_sd(folder: Path):
    tok, te, unet, vae = tiny_parts()
    pipe = models.assemble_pipeline(vae, te, tok, unet, models.noise_scheduler())
    pipe.scheduler = models.noise_scheduler()
    pipe.save_pretrained(folder)
    return folder


def test_finetune_regime_against_a_tiny_local_sd(tmp_path):
    """The paper's path (pretrained SD, UNet only, VAE and text encoder frozen), with a tiny local stand-in."""
    from diffusers import StableDiffusionPipeline

    folder = _save_tiny_sd(tmp_path / "sd")
    parts = models.load_components(str(folder), allow_network=False, root=tmp_path)
    te_before = {k: v.clone() for k, v in parts["text_encoder"].state_dict().items()}
    x = np.random.default_rng(0).integers(0, 255, (16, 16, 16, 3), dtype=np.uint8)  # 16 px, resized to 32
    lat = T.encode(parts["vae"], x, 32, "cpu")
    assert lat[0].shape == (16, 4, 8, 8)
    lp = LP.model_copy(update={"train": loop(steps=3)})
    unet0 = {k: v.clone() for k, v in parts["unet"].state_dict().items()}
    out = T.train_unet("mep", lat, PROMPTS * 2, parts["tokenizer"], parts["text_encoder"], parts["unet"], lp, 0, "cpu",
                       tmp_path / "ck", None, "fp", train_text_encoder=False)
    task = out["model"]
    assert not hasattr(task, "text_encoder")  # frozen: not part of what is trained or checkpointed
    assert any(not torch.equal(unet0[k], v) for k, v in task.unet.state_dict().items())
    for k, v in parts["text_encoder"].state_dict().items():
        torch.testing.assert_close(v, te_before[k])
    pipe = models.assemble_pipeline(parts["vae"], task.encoder(), parts["tokenizer"], task.unet, parts["scheduler"])
    pipe.save_pretrained(tmp_path / "out")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "out").unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in task.unet.state_dict().items())  # the trained UNet, saved


def test_pretrained_sd_bad_inputs(tmp_path):
    with pytest.raises(models.ModelError, match="needs allow_network: true"):
        models.load_components("runwayml/stable-diffusion-v1-5", allow_network=False, root=tmp_path)
    with pytest.raises(models.ModelError, match="does not exist"):
        models.load_components("./no/such/folder", allow_network=False, root=tmp_path)
    folder = _save_tiny_sd(tmp_path / "sd")
    import shutil

    shutil.rmtree(folder / "unet")
    with pytest.raises(models.ModelError, match=r"missing unet/"):
        models.load_components(str(folder), allow_network=False, root=tmp_path)
    # parts that do not fit each other
    folder2 = _save_tiny_sd(tmp_path / "sd2")
    torch.manual_seed(0)
    models.build_unet(LP.unet, 8, 4, 48).save_pretrained(folder2 / "unet")
    with pytest.raises(models.ModelError, match="cross_attention_dim 48 does not match the text encoder width 32"):
        models.load_components(str(folder2), allow_network=False, root=tmp_path)


def test_prompt_file_must_match_the_images():
    ds = ImageSet(np.zeros((3, 8, 8, 3), np.uint8), np.array([0, 1, 1]))
    t = pd.DataFrame({"index": [0, 1, 2], "label": [0, 1, 0], "prototype": [0, 0, 1],
                      "prompt_baseline": ["a"] * 3, "prompt_mep": ["b"] * 3})
    with pytest.raises(DataError, match="row 2 has label 0 but image 2 has label 1"):
        T.check_prompts(t, ds, Path("prompts_train.csv"))
    with pytest.raises(DataError, match="2 rows, but the image set has 3"):
        T.check_prompts(t.iloc[:2], ds, Path("prompts_train.csv"))


def test_vae_reconstruction_metrics_match_the_formula():
    class Identity(torch.nn.Module):  # a "VAE" whose reconstruction is the input plus a known offset
        config = type("C", (), {"scaling_factor": 1.0})

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def encode(self, x):
            return type("E", (), {"latent_dist": type("D", (), {"mean": x})})

        def decode(self, z):
            return type("O", (), {"sample": z + 0.1})  # +0.1 in [-1, 1] = +0.05 in [0, 1]

    x = np.random.default_rng(0).integers(20, 230, (6, 16, 16, 3), dtype=np.uint8)
    q = T.reconstruction_quality(Identity(), x, None, "cpu")
    assert q["psnr"] == pytest.approx(10 * np.log10(1 / 0.05 ** 2), abs=0.05)  # MSE = 0.05^2
    assert q["n"] == 6 and 0.9 < q["ssim"] <= 1.0


@pytest.mark.slow
def test_two_processes_on_cpu_through_accelerate(tmp_path):
    script = Path(__file__).with_name("ddp_worker.py")
    out = tmp_path / "w"
    # torchrun starts the two CPU processes; accelerate's Accelerator picks up the process group (MULTI_CPU, gloo)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    w0, w1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    for k in w0:
        torch.testing.assert_close(w0[k], w1[k])  # gradients were synchronised: identical replicas
    assert (out / "checkpoint-4").is_dir()


class _Regression(Task):
    """A deterministic task (no noise drawn): the loss of a batch is a plain mean over its items."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(6, 1)

    def forward(self, batch, g):
        return torch.nn.functional.mse_loss(self.lin(batch["x"]).squeeze(1), batch["y"])


def test_gradient_accumulation_of_k_batches_equals_one_batch_of_k_times_n(tmp_path):
    g = torch.Generator().manual_seed(1)
    data = {"x": torch.randn(64, 6, generator=g), "y": torch.randn(64, generator=g)}
    runs = {}
    for name, batch, accum in (("one", 32, 1), ("accumulated", 8, 4)):
        cfg = loop(steps=3, batch_size=batch, grad_accum=accum, lr=1e-2, clip_grad=None, checkpoint_every=100)
        out = train_loop(_Regression(), data, cfg, tmp_path / name, "h", seed=0)
        runs[name] = out["model"].lin.weight.detach().clone()
    # the same 32 items per optimiser step (the epoch permutation is shared), the same mean gradient
    torch.testing.assert_close(runs["accumulated"], runs["one"], rtol=1e-5, atol=1e-6)


def test_batch_size_checks_name_the_loop_that_does_not_fit():
    lp = section("ldm_finetune", train={"batch_size": 8}, vae={"train": {"batch_size": 64}},
                 classifier={"train": {"batch_size": 8}})
    with pytest.raises(ValueError, match=r"ldm_finetune\.vae\.train\.batch_size 64 is larger than the 50"):
        T.check_batch_sizes(lp, n_unet=40, n_vae=50)
    with pytest.raises(ValueError, match=r"ldm_finetune\.train\.batch_size 8 is larger than the 6"):
        T.check_batch_sizes(lp, n_unet=6, n_vae=500)
    T.check_batch_sizes(lp, n_unet=40, n_vae=500)


def test_a_variant_s_models_do_not_depend_on_what_ran_before():
    lp = LP
    alone = T.build_variant("mep", lp, PROMPTS, None, (4, 8, 8), seed=3)
    T.build_variant("baseline", lp, PROMPTS, None, (4, 8, 8), seed=3)
    torch.randn(100)  # anything else drawing from the global generator in between
    after = T.build_variant("mep", lp, PROMPTS, None, (4, 8, 8), seed=3)
    for a, b in ((alone[1], after[1]), (alone[2], after[2])):  # text encoder, UNet
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(va, vb), k
    assert alone[0].get_vocab() == after[0].get_vocab()
