"""Generate audio with a base model, optionally with a LoRA adapter: WAV + spectrogram PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from musiclora.adapters import load_for_inference
from musiclora.audio import load_audio, num_channels, save_audio, to_mono
from musiclora.models.base import GenerationRequest
from musiclora.plots import plot_spectrogram

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | None = None) -> torch.device:
    """The device to generate on: `device` when given (cpu, cuda, cuda:N), else cuda if available, else cpu.

    Raises:
        ValueError: not a torch device name, or a CUDA device this machine does not have.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r}: expected cpu, cuda or cuda:N ({exc})") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: expected cpu, cuda or cuda:N")
    return dev


def parse_dtype(name: str) -> torch.dtype:
    """torch dtype for `float32`, `float16` or `bfloat16`.

    Raises:
        ValueError: any other name (lists the known ones).
    """
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


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
    device: str | None = None,
    dtype: str = "float32",
    merge: bool = True,
) -> dict[str, Any]:
    """Generate `duration_s` seconds for `prompt`, write `out_wav` (PCM 16) and `<out_wav>.png`.

    The WAV has the family's channels (`ModelFamily.channels`: mono, or stereo for Stable Audio
    Open); the spectrogram shows the mono downmix.

    Args:
        family / base: the base model; when omitted they come from the adapter's card.json.
        adapter: adapter folder URL or path (peft format), or None for the base model alone.
        melody: optional audio file whose chroma conditions the melody (MusicGen-Melody).
        steps: denoising steps of diffusion families (AudioLDM); others ignore it.
        reference: optional audio file whose CLAP audio embedding conditions instead of the prompt
            (AudioLDM's audio-to-music); the family receives it as its conditioning audio, like
            `melody`, so give one of the two.
        device: cpu, cuda or cuda:N (default: cuda if available, else cpu).
        dtype: parameter dtype, float32, float16 or bfloat16.
        merge: fold the adapter into the base weights before generating (see `load_for_inference`).

    Returns:
        {"wav", "reference", "png", "sample_rate", "channels", "duration_s", "rms", "adapter", "base", "family",
        "device"}: `duration_s` is the written clip's length (its last axis), `rms` over every channel.

    Raises:
        ValueError: neither `base` nor an adapter card naming one; unknown family; both `melody` and
            `reference`; a bad request (see `GenerationRequest`); a silent or too short reference
            clip (AudioLDM); an unknown device or dtype.
        AudioDecodeError: `melody` / `reference` is not decodable audio.
    """
    if melody and reference:
        raise ValueError("generate: give either melody or reference audio, not both")
    dev = resolve_device(device)
    mel, mel_sr = None, None
    if melody or reference:
        wav, mel_sr = load_audio(melody or reference)
        mel = to_mono(wav)
    request = GenerationRequest(prompt, duration_s, guidance_scale, seed, steps, mel, mel_sr)
    fam, loaded = load_for_inference(adapter, base, family, parse_dtype(dtype), dev, merge=merge)
    audio, sr = fam.generate(loaded.model, loaded.tokenizer, request)  # [L] or [C, L]
    save_audio(out_wav, audio, sr)
    png = str(Path(out_wav).with_suffix(".png"))
    what = f"reference {Path(reference).name}" if reference else repr(prompt)
    plot_spectrogram(to_mono(audio), sr, png, title=f"{what} ({'adapter ' + adapter if adapter else 'base'})")
    return {"wav": out_wav, "reference": reference, "png": png, "sample_rate": sr, "channels": num_channels(audio),
            "duration_s": audio.shape[-1] / sr, "rms": float(np.sqrt(np.mean(audio**2))), "adapter": adapter,
            "base": loaded.base, "family": loaded.family, "device": str(dev)}
