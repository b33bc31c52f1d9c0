"""Small builders shared by the train/ unit tests: tiny models, synthetic batches, a fake engine."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class FakeEngine(nn.Module):
    """The slice of a DeepSpeed engine the training step and validation use: `module`, `device`,
    forward, `backward`, `step` (no optimizer: the tests check placement, not learning)."""

    def __init__(self, module: nn.Module, device: str | torch.device):
        super().__init__()
        self.module = module
        self.device = torch.device(device)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        pass


def synthetic_batch(family, loaded, batch_size: int = 2, seconds: float = 0.5) -> dict[str, torch.Tensor]:
    """A collated CPU batch of random features shaped as the family's shards hold them."""
    rng = np.random.default_rng(0)
    spec = family.feature_spec(loaded)
    meta = {"caption": "a quiet piano piece"}
    if spec["codec"] == "encodec":
        k, t = spec["num_codebooks"], int(seconds * spec["frame_rate"])
        t_c = int(np.ceil(seconds * spec["codec_sample_rate"] / 4096))
        samples = [{"codes.npy": rng.integers(0, spec["codebook_size"], (k, t)).astype(np.int16),
                    "chroma.npy": np.eye(12, dtype=np.uint8)[rng.integers(0, 12, t_c)],
                    "json": {**meta, "num_frames": t}} for _ in range(batch_size)]
    else:
        t, f = 16, 64 // spec["vae_scale_factor"]
        emb = rng.standard_normal(spec["clap_dim"]).astype(np.float32)
        samples = [{"latents.npy": rng.standard_normal((spec["latent_channels"], t, f)).astype(np.float16),
                    "clap_text.npy": emb, "clap_audio.npy": emb, "json": {**meta, "num_frames": t}}
                   for _ in range(batch_size)]
    return family.collate(samples, loaded)
