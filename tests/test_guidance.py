import numpy as np
import pytest
import torch

from pathsynth.config import Loop
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
                     Loop(steps=150, batch_size=40, lr=2e-3, ema_decay=None, log_every=50, checkpoint_every=1000),
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
