"""Train-free test adapters for the registry and the server: random LoRA B weights on a tiny base."""

from __future__ import annotations

import io

import numpy as np
import torch

from musiclora.adapters import apply_lora, save_adapter
from musiclora.audio import load_clip, save_audio
from musiclora.config import AdapterConfig
from musiclora.models.families import get_family


def make_random_adapter(base: str, url: str, seed: int, family: str = "musicgen-melody", scale: float = 0.5) -> str:
    """Write a peft adapter folder (+ card) whose LoRA B weights are seeded random, not zero.

    A fresh peft adapter has B = 0 and changes nothing; random B makes it change the output,
    and two seeds give two different adapters without any training.

    Returns:
        `url`.
    """
    fam = get_family(family)
    loaded = fam.load(base)
    model = apply_lora(loaded.model, fam, AdapterConfig())
    root = fam.lora_root(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in root.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    card = {"format": "musiclora-adapter/1", "family": family, "base_model": base, "test_seed": seed}
    return save_adapter(root, url, card=card)


def wav_bytes_to_array(data: bytes) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC bytes to (float32 mono [L] or channels-first [C, L], sample rate): generate's layout."""
    return load_clip(io.BytesIO(data))


def reference_audio(base: str, adapter_dir: str | None, prompt: str, duration_s: float, seed: int,
                    guidance_scale: float = 3.0, family: str = "musicgen-melody",
                    steps: int | None = None) -> np.ndarray:
    """What the server should return, computed here: the base (+ adapter) through the family, as PCM 16
    ([L], or [C, L] for a stereo family)."""
    from musiclora.adapters import load_for_inference
    from musiclora.models.base import GenerationRequest

    fam, loaded = load_for_inference(adapter_dir, base, family)
    audio, sr = fam.generate(loaded.model, loaded.tokenizer, GenerationRequest(prompt, duration_s, guidance_scale, seed,
                                                                                  steps))
    buf = io.BytesIO()
    save_audio(buf, audio, sr)
    return wav_bytes_to_array(buf.getvalue())[0]
