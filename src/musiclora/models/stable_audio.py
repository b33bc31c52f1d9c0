"""Stable Audio Open (diffusers StableAudioDiTModel + AutoencoderOobleck + T5) as a musiclora family.

Data: 44.1 kHz stereo -> Oobleck VAE posterior mean, stored as `latents.npy` [C, T'] (C = 64 at real
size, 21.5 frames per second), with the caption's T5 states `t5.npy` [S, D] and the timing
conditioning seconds_start / seconds_total in the JSON. A mono segment ([L]) is encoded as dual
mono; a stereo one ([2, L]) as it is (see `ModelFamily.channels`). Training: the v-objective of
stable-audio-tools (t ~ U(0, 1), x_t = cos(t pi/2) x0 + sin(t pi/2) eps, target
v = cos(t pi/2) eps - sin(t pi/2) x0), padding masked, caption dropout to the null (all-zero)
cross-attention input. LoRA goes into the DiT only (`lora_root_attr = "transformer"`): an adapter
is a plain diffusers transformer adapter. Generation runs the components directly and returns stereo [2, L].
"""

from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from musiclora.models.base import GenerationRequest, Loaded, ModelFamily, Segment, npy_bytes, unwrap_to
from musiclora.models.stable_audio_components import (
    SAMPLE_RATE,
    StableAudio,
    angles,
    load_stable_audio,
    sampling_times,
    save_stable_audio,
    stable_audio_skeleton,
    t5_states,
    text_len,
)
from musiclora.models.stable_audio_tiny import build_tiny_stable_audio

ATTN = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
FF = ["ff.net.0.proj", "ff.net.2"]
DEFAULT_STEPS = 10
"""Sampling steps when none are given (the pipeline's default is 100; 10 keeps CPU demos short)."""
LICENCE_NOTE = ("the adapter is a derivative of the base model: its licence terms apply "
                "(stabilityai/stable-audio-open-1.0: Stability AI Community License)")


class StableAudioOptions(BaseModel):
    """`model.options` of a Stable Audio Open run.

    Attributes:
        caption_dropout: probability, per training sample, of training on the null (all-zero)
            cross-attention input, so classifier-free guidance has an unconditional model
            (stable-audio-tools' cfg_dropout_prob, 0.1).
    """

    model_config = ConfigDict(extra="forbid")

    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0)


class StableAudioFamily(ModelFamily):
    """Stable Audio Open: Oobleck latents of stereo 44.1 kHz audio + T5 + timing -> LoRA on the DiT."""

    name = "stable-audio-open"
    default_base = "stabilityai/stable-audio-open-1.0"
    default_segment_s = 47.55
    """The DiT's window: 1024 latent frames * 2048 / 44100 Hz."""
    sample_rate = SAMPLE_RATE
    channels = 2
    licence_note = LICENCE_NOTE
    lora_root_attr = "transformer"
    takes_steps = True
    lora_presets: ClassVar[dict[str, list[str]]] = {
        # study 002 (LoRA on Stable Audio Open, MusicCaps, via LoRAW): the diffusion model's attention;
        # the default adds each block's feed-forward
        "study002": ATTN + FF,
        "attn": list(ATTN),
        "cross-attn": ATTN[4:],
    }

    options_model = StableAudioOptions

    # ------------------------------------------------------------------ loading

    def load(self, base: str, dtype: torch.dtype = torch.float32, revision: str | None = None) -> Loaded:
        if base == self.tiny_id:
            model, tokenizer = build_tiny_stable_audio()
        else:
            model, tokenizer = load_stable_audio(base, torch.float32, revision)
        return Loaded(model=model.to(dtype).eval(), tokenizer=tokenizer, base=base, family=self.name)

    def skeleton(self, base: str, revision: str | None = None) -> nn.Module:
        if base == self.tiny_id:
            return build_tiny_stable_audio()[0]
        return stable_audio_skeleton(base, revision)

    def save_tiny(self, out_dir: str, seed: int = 0) -> str:
        model, tokenizer = build_tiny_stable_audio(seed)
        return save_stable_audio(model, tokenizer, out_dir)

    # ------------------------------------------------------------------ data

    def feature_spec(self, loaded: Loaded) -> dict[str, Any]:
        model = _container(loaded.model)
        hop = int(np.prod(model.vae.config.downsampling_ratios))
        return {
            "family": self.name,
            "codec": "oobleck-vae",
            "codec_sample_rate": SAMPLE_RATE,
            "channels": self.channels,
            "hop_length": hop,
            "frame_rate": SAMPLE_RATE / hop,
            "latent_channels": int(model.vae.config.decoder_input_channels),
            "fields": {
                "latents.npy": "float16 [C, T'] Oobleck VAE posterior mean of the stereo clip (dual mono if mono)",
                "t5.npy": "float32 [S, D] T5 last hidden states of the caption (its S tokens)",
                "json": "caption, num_frames (valid latent frames), seconds_start, seconds_total, source, start_s",
            },
        }

    @torch.no_grad()
    def encode_segments(self, loaded: Loaded, segments: list[Segment]) -> list[dict[str, Any]]:
        """Oobleck latents, T5 states and timing per segment.

        seconds_start is the segment's start in its track (`meta["start_s"]`), seconds_total the
        track's length (`meta["track_duration_s"]`, else the segment's end), as stable-audio-tools
        conditions its training crops.

        Returns:
            one WebDataset sample per segment: `__key__`, `latents.npy` (float16 [C, T']), `t5.npy`
            (float32 [S, D]) as .npy bytes, and `json`.

        Raises:
            ValueError: a segment's audio is neither [L] nor [2, L].
        """
        model = _container(loaded.model)
        hop = model.hop_length
        wav = np.stack([_stereo(s.audio, s.key) for s in segments])  # [B, 2, L]
        wav = np.pad(wav, ((0, 0), (0, 0), (0, (-wav.shape[-1]) % hop)))
        for i, seg in enumerate(segments):
            wav[i, :, seg.num_valid:] = 0.0
        vae_param = next(model.vae.parameters())
        latents = model.vae.encode(torch.from_numpy(wav).to(vae_param.device, vae_param.dtype)).latent_dist.mean
        states, mask = t5_states(model.text_encoder, loaded.tokenizer, [s.caption for s in segments])
        out = []
        for i, seg in enumerate(segments):
            start = float(seg.meta.get("start_s", 0.0))
            total = float(seg.meta.get("track_duration_s") or start + seg.num_valid / SAMPLE_RATE)
            meta = dict(seg.meta, caption=seg.caption, num_frames=math.ceil(seg.num_valid / hop),
                        seconds_start=start, seconds_total=total)
            out.append({
                "__key__": seg.key,
                "latents.npy": npy_bytes(latents[i].float().cpu().to(torch.float16).numpy()),
                "t5.npy": npy_bytes(states[i, : int(mask[i].sum())].numpy()),
                "json": meta,
            })
        return out

    def collate(self, samples: list[dict[str, Any]], loaded: Loaded) -> dict[str, torch.Tensor]:
        """Decoded samples -> `latents` [B, C, T'] float32, `valid` [B, T'] bool, `t5` [B, S, D]
        float32 zero-padded to the tokenizer's `model_max_length` with `t5_mask` [B, S] int64, and
        `seconds_start` / `seconds_total` [B] float32."""
        latents = torch.stack([torch.as_tensor(s["latents.npy"].astype(np.float32)) for s in samples])
        t = latents.shape[2]
        frames = torch.tensor([min(int(s["json"]["num_frames"]), t) for s in samples])
        width = text_len(loaded.tokenizer)
        t5 = torch.zeros(len(samples), width, samples[0]["t5.npy"].shape[-1])
        mask = torch.zeros(len(samples), width, dtype=torch.long)
        for i, s in enumerate(samples):
            n = min(s["t5.npy"].shape[0], width)
            t5[i, :n] = torch.as_tensor(s["t5.npy"][:n].astype(np.float32))
            mask[i, :n] = 1
        timing = {k: torch.tensor([float(s["json"][k]) for s in samples]) for k in ("seconds_start", "seconds_total")}
        return {"latents": latents, "valid": torch.arange(t)[None, :] < frames[:, None], "t5": t5, "t5_mask": mask,
                **timing}

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Valid latent frames in the batch (21.5 per second of audio), the analogue of codec tokens."""
        return int(batch["valid"].sum())

    # ------------------------------------------------------------------ training

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """v-objective loss: MSE between the DiT's v and the target v over valid latent frames.

        t ~ U(0, 1); (alpha, sigma) = (cos(t pi/2), sin(t pi/2)); x_t = alpha x0 + sigma eps;
        v = alpha eps - sigma x0 (stable-audio-tools `diffusion_objective: v`; Salimans & Ho 2022).
        The sampler's denoised estimate alpha x_t - sigma v is then x0, which is what diffusers'
        cosine scheduler computes from a v prediction. In training mode each sample's
        cross-attention input is nulled with probability `options.caption_dropout`.

        Args:
            model: the `StableAudio` module (or the DeepSpeed engine / wrapper around it).
            batch: `collate` output.

        Returns:
            float32 scalar.
        """
        inner = _container(model)
        param = next(p for p in inner.transformer.parameters())
        dev, dt = param.device, param.dtype
        x0 = batch["latents"].float()
        b = x0.shape[0]
        noise = torch.randn_like(x0)
        t = torch.rand(b)
        alpha, sigma = (a[:, None, None] for a in angles(t))
        noisy = alpha * x0 + sigma * noise
        target = alpha * noise - sigma * x0
        drop = torch.zeros(b, dtype=torch.bool)
        if model.training and self.options.caption_dropout > 0:
            drop = torch.rand(b) < self.options.caption_dropout
        pred = model(noisy.to(dev, dt), t.to(dev), batch["t5"].to(dev, dt), batch["t5_mask"].to(dev),
                     batch["seconds_start"].to(dev), batch["seconds_total"].to(dev), drop.to(dev))
        err = (pred.float() - target.to(dev)) ** 2
        mask = batch["valid"].to(dev)[:, None, :].float()
        return (err * mask).sum() / (mask.sum() * err.shape[1]).clamp_min(1.0)

    # ------------------------------------------------------------------ generation

    def generate(self, model, tokenizer, request: GenerationRequest) -> tuple[np.ndarray, int]:
        """Sample stereo audio from a text prompt (`sample_stable_audio` with the request's fields).

        Returns:
            (float32 waveform [2, round(duration_s * 44100)], 44100): the family's `channels` = 2.

        Raises:
            ValueError: conditioning audio given, a duration beyond the DiT window.
        """
        if request.melody is not None:
            raise ValueError("stable-audio-open generates from text only: conditioning audio (melody) is not supported")
        wav, sr = sample_stable_audio(model, tokenizer, request.prompt, request.duration_s, request.guidance_scale,
                                      request.seed, request.steps)
        return wav.astype(np.float32, copy=False), sr


@torch.no_grad()
def sample_stable_audio(model: nn.Module, tokenizer, prompt: str, duration_s: float, guidance_scale: float = 7.0,
                        seed: int = 0, steps: int | None = None) -> tuple[np.ndarray, int]:
    """Stereo audio from a text prompt: seeded noise over the DiT window -> deterministic v-sampler -> VAE.

    The sampler is DDIM (eta 0) in the angle parametrisation (stable-audio-tools / v-diffusion
    `sample`): x0 = alpha x - sigma v, eps = sigma x + alpha v, x <- alpha' x0 + sigma' eps, over
    the scheduler config's sigma schedule (`sampling_times`). Guidance v = v_u + w (v_c - v_u) against
    the null cross-attention input (StableAudioPipeline's default negative). Timing: seconds_start 0,
    seconds_total `duration_s`; the window is the DiT's `sample_size` latent frames (47.55 s at real
    size), cropped to `duration_s`, as the pipeline does.

    Returns:
        (float32 waveform [2, round(duration_s * 44100)], 44100).

    Raises:
        ValueError: duration_s <= 0 or longer than the window, steps < 1.
    """
    inner = _container(model)
    dit = inner.transformer
    config = dit.get_base_model().config if hasattr(dit, "get_base_model") else dit.config
    window_s = int(config.sample_size) * inner.hop_length / SAMPLE_RATE
    if not 0 < duration_s <= window_s:
        raise ValueError(f"duration_s must be in (0, {window_s:.2f}] seconds (the DiT window), got {duration_s}")
    steps = DEFAULT_STEPS if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1 sampling steps, got {steps}")
    param = next(p for p in dit.parameters())
    dev, dt = param.device, param.dtype
    t5, mask = t5_states(inner.text_encoder, tokenizer, [prompt])
    guided = guidance_scale > 1.0
    n = 2 if guided else 1
    cond = (t5.repeat(n, 1, 1).to(dev, dt), mask.repeat(n, 1).to(dev), torch.zeros(n, device=dev),
            torch.full((n,), float(duration_s), device=dev), torch.tensor([True, False][-n:], device=dev))
    gen = torch.Generator().manual_seed(int(seed))
    times = sampling_times(inner.scheduler_config, steps)
    x = torch.randn((1, int(config.in_channels), int(config.sample_size)), generator=gen) * angles(times[0])[1]
    for now, nxt in itertools.pairwise(times.tolist()):
        xin = x.repeat(n, 1, 1).to(dev, dt)
        v = inner(xin, torch.full((n,), float(now), device=dev), *cond).float().cpu()
        if guided:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance_scale * (v_c - v_u)
        alpha, sigma = angles(torch.tensor(now))
        x0, eps = alpha * x - sigma * v, sigma * x + alpha * v
        alpha, sigma = angles(torch.tensor(nxt))
        x = alpha * x0 + sigma * eps
    vae_param = next(inner.vae.parameters())
    audio = inner.vae.decode(x.to(vae_param.device, vae_param.dtype)).sample  # [1, 2, L]
    return audio[0, :, : round(duration_s * SAMPLE_RATE)].float().cpu().numpy(), SAMPLE_RATE


def _stereo(audio: np.ndarray, key: str) -> np.ndarray:
    """A segment's audio as float32 [2, L]: stereo as it is, mono [L] duplicated (dual mono).

    Raises:
        ValueError: neither [L] nor [2, L] (names the segment).
    """
    audio = np.asarray(audio, np.float32)
    if audio.ndim == 1:
        return np.stack([audio, audio])
    if audio.ndim == 2 and audio.shape[0] == 2:
        return audio
    raise ValueError(f"segment {key}: audio must be mono [L] or stereo [2, L] at 44.1 kHz, got shape {audio.shape}")


def _container(model: nn.Module) -> StableAudio:
    """The `StableAudio` module under DeepSpeed / other wrappers (raises TypeError when there is none)."""
    return unwrap_to(model, StableAudio)

