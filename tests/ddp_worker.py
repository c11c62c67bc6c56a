"""Run by test_two_processes_on_cpu_through_accelerate under `torchrun --nproc_per_node 2` (CPU, gloo)."""
import sys
from pathlib import Path

import torch

from pathsynth.config import section
from pathsynth.diffusion import models
from pathsynth.diffusion.classifier import ClassifierTask, NoisyLatentClassifier
from pathsynth.training import train_loop

out = Path(sys.argv[1])
torch.manual_seed(0)
task = ClassifierTask(NoisyLatentClassifier(num_classes=3, channels=(8, 16), time_dim=16), models.noise_scheduler())
g = torch.Generator().manual_seed(0)
data = {"mean": torch.randn(32, 4, 8, 8, generator=g), "std": torch.zeros(32, 4, 8, 8), "prototype": torch.arange(32) % 3}
res = train_loop(task, data, section("ldm_finetune.vae.train", weight_decay=0.01, steps=4, batch_size=4, lr=1e-2, ema_decay=None, checkpoint_every=2, log_every=1),
                 out, "h", seed=0)
acc = res["accelerator"]
assert acc.num_processes == 2, acc.num_processes
torch.save(res["model"].state_dict(), out / f"rank{acc.process_index}.pt")
