"""Generate audio with a base model, optionally with a LoRA adapter: WAV + spectrogram PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from musiclora.adapters import load_adapter, read_card
from musiclora.audio import load_audio, to_mono
from musiclora.models.families import get_family
from musiclora.plots import plot_spectrogram


def generate(
    prompt: str,
    out_wav: str,
    family: str | None = None,
    base: str | None = None,
    adapter: str | None = None,
    duration_s: float = 2.0,
    guidance_scale: float = 3.0,
    seed: int = 0,
    melody: str | None = None,
    steps: int | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """Generate `duration_s` seconds for `prompt`, write `out_wav` (PCM 16) and `<out_wav>.png`.

    Args:
        family / base: the base model; when omitted they come from the adapter's card.json.
        adapter: adapter folder URL or path (peft format), or None for the base model alone.
        melody: optional audio file whose chroma conditions the melody (MusicGen-Melody).
        steps: denoising steps of diffusion families (AudioLDM); others ignore it.
        reference: optional audio file whose CLAP audio embedding conditions instead of the prompt
            (AudioLDM's audio-to-music); the family receives it as its conditioning audio, like
            `melody`, so give one of the two.

    Returns:
        {"wav", "reference", "png", "sample_rate", "duration_s", "rms", "adapter", "base", "family"}.

    Raises:
        ValueError: neither `base` nor an adapter card naming one; unknown family; both `melody` and
            `reference`; a silent or too short reference clip (AudioLDM).
        AudioDecodeError: `melody` / `reference` is not decodable audio.
    """
    card = read_card(adapter) if adapter else {}
    family = family or card.get("family") or "musicgen-melody"
    base = base or card.get("base_model")
    if not base:
        raise ValueError("generate: no base model given and the adapter card names none (pass --base)")
    if melody and reference:
        raise ValueError("generate: give either melody or reference audio, not both")
    fam = get_family(family)
    loaded = fam.load(base)
    model = _with_adapter(fam, loaded.model, adapter) if adapter else loaded.model
    mel, mel_sr = None, None
    if melody or reference:
        wav, mel_sr = load_audio(melody or reference)
        mel = to_mono(wav)
    audio, sr = fam.generate(model, loaded.tokenizer, prompt, duration_s, guidance_scale, seed, mel, mel_sr,
                             steps=steps)
    Path(out_wav).parent.mkdir(parents=True, exist_ok=True)
    sf.write(out_wav, np.clip(audio, -1, 1), sr, subtype="PCM_16")
    png = str(Path(out_wav).with_suffix(".png"))
    what = f"reference {Path(reference).name}" if reference else repr(prompt)
    plot_spectrogram(audio, sr, png, title=f"{what} ({'adapter ' + adapter if adapter else 'base'})")
    return {"wav": out_wav, "reference": reference, "png": png, "sample_rate": sr, "duration_s": len(audio) / sr,
            "rms": float(np.sqrt(np.mean(audio**2))), "adapter": adapter, "base": base, "family": family}


def _with_adapter(fam, model, adapter: str):
    """Attach the adapter to the family's LoRA root (the whole model, or e.g. AudioLDM's UNet)."""
    peft_root = load_adapter(fam.lora_root(model), adapter)
    if fam.lora_root_attr is None:
        return peft_root
    setattr(model, fam.lora_root_attr, peft_root)
    return model
