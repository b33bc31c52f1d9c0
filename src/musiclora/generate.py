"""Generate audio with a base model, optionally with a LoRA adapter: WAV + spectrogram PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from musiclora.adapters import load_adapter, read_card
from musiclora.data.audio import load_audio, to_mono
from musiclora.models.registry import get_family
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
) -> dict[str, Any]:
    """Generate `duration_s` seconds for `prompt`, write `out_wav` (PCM 16) and `<out_wav>.png`.

    Args:
        family / base: the base model; when omitted they come from the adapter's card.json.
        adapter: adapter folder URL or path (peft format), or None for the base model alone.
        melody: optional audio file whose chroma conditions the melody (MusicGen-Melody).

    Returns:
        {"wav", "png", "sample_rate", "duration_s", "rms", "adapter", "base", "family"}.

    Raises:
        ValueError: neither `base` nor an adapter card naming one; unknown family.
        AudioDecodeError: `melody` is not decodable audio.
    """
    card = read_card(adapter) if adapter else {}
    family = family or card.get("family") or "musicgen-melody"
    base = base or card.get("base_model")
    if not base:
        raise ValueError("generate: no base model given and the adapter card names none (pass --base)")
    fam = get_family(family)
    loaded = fam.load(base)
    model = load_adapter(loaded.model, adapter) if adapter else loaded.model
    mel, mel_sr = None, None
    if melody:
        wav, mel_sr = load_audio(melody)
        mel = to_mono(wav)
    audio, sr = fam.generate(model, loaded.tokenizer, prompt, duration_s, guidance_scale, seed, mel, mel_sr)
    Path(out_wav).parent.mkdir(parents=True, exist_ok=True)
    sf.write(out_wav, np.clip(audio, -1, 1), sr, subtype="PCM_16")
    png = str(Path(out_wav).with_suffix(".png"))
    plot_spectrogram(audio, sr, png, title=f"{prompt!r} ({'adapter ' + adapter if adapter else 'base'})")
    return {"wav": out_wav, "png": png, "sample_rate": sr, "duration_s": len(audio) / sr,
            "rms": float(np.sqrt(np.mean(audio**2))), "adapter": adapter, "base": base, "family": family}
