"""AudioLDM (diffusers UNet + AutoencoderKL + CLAP + HiFi-GAN) as a musiclora family.

Data: 16 kHz mono -> AudioLDM's log-mel (64 bands, hop 160) -> VAE posterior mean, stored as
`latents.npy` [C, T', F'] with the CLAP text embedding of the caption and the CLAP audio embedding
of the clip (or of a paired conditioning clip). Training: the latent-diffusion noise-prediction
loss (epsilon or v, as the scheduler config says), the CLAP embedding entering the UNet's class
embedding as in AudioLDM, caption dropout to the empty-prompt embedding so classifier-free guidance
works. LoRA goes into the UNet only (`lora_root_attr = "unet"`), so an adapter is a plain UNet
adapter. Generation runs the components directly (DDIM + CFG -> VAE decoder -> vocoder); nothing
depends on diffusers' deprecated AudioLDMPipeline.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from musiclora.models.audioldm_components import (
    HOP_LENGTH,
    N_MELS,
    SAMPLE_RATE,
    AudioLDM,
    audioldm_skeleton,
    clap_audio_embeddings,
    clap_text_embeddings,
    load_audioldm,
    load_clap_audio,
    mel_basis,
    mel_frames_for,
    normalize_waveform,
    pad_frames,
    save_audioldm,
    waveform_to_log_mel,
)
from musiclora.models.audioldm_tiny import build_tiny_audioldm
from musiclora.models.base import GenerationRequest, Loaded, ModelFamily, Segment, npy_bytes, unwrap_to

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_STEPS = 10
"""Denoising steps when none are given (diffusers' AudioLDM default; the paper samples 200)."""
MIN_REFERENCE_S = 0.1


class AudioLDMOptions(BaseModel):
    """`model.options` of an AudioLDM run.

    Attributes:
        caption_dropout: probability, per training sample, of replacing the conditioning embedding
            by the empty-prompt CLAP embedding (AudioLDM trains with 0.1), so classifier-free
            guidance has an unconditional model to contrast with.
        condition: which stored CLAP embedding conditions training: `text` (of the caption) or
            `audio` (of the clip itself, or of its paired conditioning clip such as a vocal stem).
            Prepare computes CLAP audio embeddings only for `audio` (or tracks with `cond_audio`).
        clap_audio: the CLAP checkpoint (hub id or folder) whose audio tower the base was trained with,
            when the base does not ship it as `audio_encoder/`; audio conditioning fails without one.
    """

    model_config = ConfigDict(extra="forbid")

    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    condition: Literal["text", "audio"] = "text"
    clap_audio: str | None = None


class AudioLDMFamily(ModelFamily):
    """AudioLDM: VAE latents of the log-mel + CLAP embeddings -> LoRA on the UNet."""

    name = "audioldm"
    default_base = "cvssp/audioldm-s-full-v2"
    default_segment_s = 10.24
    """AudioLDM's training clip length (1024 mel frames)."""
    sample_rate = SAMPLE_RATE
    takes_steps = True
    licence_note = ("the adapter is a derivative of the base model: its licence terms apply "
                    "(cvssp/audioldm-s-full-v2: CC-BY-NC-SA-4.0 weights)")
    lora_root_attr = "unet"
    lora_presets: ClassVar[dict[str, list[str]]] = {
        "attn": list(ATTN),
        # time_embedding.linear_1/2: the timestep MLP, the seed study's "temporal control" layers
        "attn+time": ATTN + ["time_embedding.linear_1", "time_embedding.linear_2"],
        # ff.net.2: each transformer block's output projection (its feed-forward's last linear)
        "attn+out": ATTN + ["ff.net.2"],
    }

    options_model = AudioLDMOptions

    # ------------------------------------------------------------------ loading

    def load(self, base: str, dtype: torch.dtype = torch.float32, revision: str | None = None) -> Loaded:
        if base == self.tiny_id:
            model, tokenizer = build_tiny_audioldm()
        else:
            model, tokenizer = load_audioldm(base, torch.float32, revision)
        model.extras["uncond"] = clap_text_embeddings(model.text_encoder, tokenizer, [""])[0]
        return Loaded(model=model.to(dtype).eval(), tokenizer=tokenizer, base=base, family=self.name)

    def skeleton(self, base: str, revision: str | None = None) -> nn.Module:
        if base == self.tiny_id:
            return build_tiny_audioldm()[0]
        return audioldm_skeleton(base, revision)

    def save_tiny(self, out_dir: str, seed: int = 0) -> str:
        model, tokenizer = build_tiny_audioldm(seed)
        return save_audioldm(model, tokenizer, out_dir)

    def clap_audio(self, model: nn.Module):
        """The CLAP audio embedder of a loaded model (loaded on first use, then cached)."""
        inner = _container(model)
        if inner.extras.get("clap_audio") is None:
            inner.extras["clap_audio"] = load_clap_audio(inner.extras.get("source", {}), self.options.clap_audio)
        return inner.extras["clap_audio"]

    # ------------------------------------------------------------------ data

    def feature_spec(self, loaded: Loaded) -> dict[str, Any]:
        model = _container(loaded.model)
        return {
            "family": self.name,
            "codec": "audioldm-vae",
            "codec_sample_rate": SAMPLE_RATE,
            "mel": {"n_mels": N_MELS, "hop_length": HOP_LENGTH, "n_fft": 1024, "win_length": 1024, "fmin": 0,
                    "fmax": 8000, "scale": "ln(max(mel(|STFT|), 1e-5))"},
            "frame_rate": SAMPLE_RATE / HOP_LENGTH / model.vae_scale_factor,
            "latent_channels": int(model.vae.config.latent_channels),
            "vae_scale_factor": model.vae_scale_factor,
            "clap_dim": int(_unet_config(model).projection_class_embeddings_input_dim),
            "fields": {
                "latents.npy": "float16 [C, T', F'] VAE posterior mean of the log-mel (unscaled)",
                "clap_text.npy": "float32 [D] L2-normalised CLAP text embedding of the caption",
                **({"clap_audio.npy": "float32 [D] L2-normalised CLAP audio embedding of the clip (or its cond_audio)"}
                   if self.options.condition == "audio" else {}),
                "json": "caption, num_frames (valid latent frames), audio_embed_source, source, start_s, duration_s",
            },
        }

    def check_shards(self, feature_spec: dict[str, Any]) -> None:
        """Audio conditioning needs shards prepared with `model_options.condition: audio`.

        Raises:
            ValueError: `options.condition` is `audio` and the shards hold no CLAP audio embeddings.
        """
        if self.options.condition == "audio" and "clap_audio.npy" not in feature_spec.get("fields", {}):
            raise ValueError("model.options.condition is 'audio' but the shards hold no clap_audio.npy: re-run prepare "
                             "with model_options.condition: audio")

    @torch.no_grad()
    def encode_segments(self, loaded: Loaded, segments: list[Segment]) -> list[dict[str, Any]]:
        """VAE latents of the log-mel, CLAP text and audio embeddings per segment.

        A segment whose `meta` names `cond_audio` (a paired clip, e.g. the vocal stem of the same
        track) gets that clip's CLAP audio embedding over the same window instead of its own.

        Returns:
            one WebDataset sample per segment: `__key__`, `latents.npy` (float16 [C, T', F']),
            `clap_text.npy` / `clap_audio.npy` (float32 [D]) as .npy bytes, and `json`.

        Raises:
            AudioDecodeError / ValueError: a `cond_audio` file cannot be read or is silent.
        """
        model = _container(loaded.model)
        factor = model.vae_scale_factor
        wav = np.zeros((len(segments), len(segments[0].audio)), np.float32)
        for i, seg in enumerate(segments):
            wav[i, : seg.num_valid] = normalize_waveform(seg.audio[: seg.num_valid])
        mel = pad_frames(waveform_to_log_mel(torch.from_numpy(wav), mel_basis()), factor)  # [B, T, 64]
        vae = next(model.vae.parameters())
        latents = model.vae.encode(mel[:, None].to(vae.device, vae.dtype)).latent_dist.mode().float().cpu()  # [B, C, T/f, 64/f]
        text = clap_text_embeddings(model.text_encoder, loaded.tokenizer, [s.caption for s in segments])
        audio, sources = None, ["none"] * len(segments)
        if self.options.condition == "audio" or any(s.meta.get("cond_audio") for s in segments):
            clips, sources = zip(*(_conditioning_clip(s) for s in segments))
            audio = clap_audio_embeddings(self.clap_audio(model), list(clips))
        out = []
        for i, seg in enumerate(segments):
            frames = math.ceil(seg.num_valid / HOP_LENGTH / factor)
            meta = dict(seg.meta, caption=seg.caption, num_frames=frames, audio_embed_source=sources[i])
            out.append({
                "__key__": seg.key,
                "latents.npy": npy_bytes(latents[i].to(torch.float16).numpy()),
                "clap_text.npy": npy_bytes(text[i].numpy()),
                "json": meta,
                **({"clap_audio.npy": npy_bytes(audio[i].numpy())} if audio is not None else {}),
            })
        return out

    def collate(self, samples: list[dict[str, Any]], loaded: Loaded) -> dict[str, torch.Tensor]:
        """Decoded samples -> `latents` [B, C, T', F'] float32 (unscaled), `valid` [B, T'] bool,
        `cond` [B, D] float32 (text or audio CLAP embedding per `options.condition`) and `uncond`
        [B, D] float32 (the empty prompt's embedding, for caption dropout)."""
        latents = torch.stack([torch.as_tensor(s["latents.npy"].astype(np.float32)) for s in samples])
        t = latents.shape[2]
        frames = torch.tensor([min(int(s["json"]["num_frames"]), t) for s in samples])
        valid = torch.arange(t)[None, :] < frames[:, None]
        field = "clap_text.npy" if self.options.condition == "text" else "clap_audio.npy"
        if any(field not in s for s in samples):
            raise ValueError(f"model.options.condition={self.options.condition!r} needs {field} in every sample, but "
                             "the shards were prepared without it: re-run prepare with model_options.condition: audio")
        cond = torch.stack([torch.as_tensor(s[field].astype(np.float32)) for s in samples])
        uncond = _container(loaded.model).extras["uncond"].float()[None].expand_as(cond).clone()
        return {"latents": latents, "valid": valid, "cond": cond, "uncond": uncond}

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Valid latent frames in the batch (25 per second of audio), the analogue of codec tokens."""
        return int(batch["valid"].sum())

    # ------------------------------------------------------------------ training

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Latent-diffusion loss: MSE between the UNet's prediction and its target, padding masked.

        x0 = latents * vae.scaling_factor; t ~ U{0, ..., N-1}; x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
        (the scheduler's `add_noise`); the target is eps for `prediction_type="epsilon"` and
        v = sqrt(a_t) eps - sqrt(1 - a_t) x0 for "v_prediction" (Ho et al. 2020; Salimans & Ho
        2022; diffusers `get_velocity`). While the model is in training mode each sample's
        condition is replaced by the empty-prompt embedding with probability
        `options.caption_dropout` (AudioLDM's unconditional_prob_cfg).

        Args:
            model: the `AudioLDM` module (or the DeepSpeed engine / wrapper around it).
            batch: `collate` output; with `noise_seeds` (int64 [B], validation) each sample's noise and
                timestep come from its own generator seeded by it, so the loss is a fixed function
                of the adapter.

        Returns:
            float32 scalar, the mean squared error over valid latent frames.

        Raises:
            ValueError: a scheduler `prediction_type` other than epsilon or v_prediction.
        """
        inner = _container(model)
        sched = inner.scheduler
        param = next(p for p in inner.unet.parameters())
        x0 = batch["latents"].float() * float(inner.vae.config.scaling_factor)
        b = x0.shape[0]
        noise, t = _noise_and_timesteps(x0, int(sched.config.num_train_timesteps), batch.get("noise_seeds"))
        noisy = sched.add_noise(x0, noise, t)
        kind = sched.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = sched.get_velocity(x0, noise, t)
        else:
            raise ValueError(f"scheduler prediction_type {kind!r}: expected 'epsilon' or 'v_prediction'")
        cond = batch["cond"]
        if model.training and self.options.caption_dropout > 0:
            drop = torch.rand(b, device=cond.device) < self.options.caption_dropout
            cond = torch.where(drop[:, None], batch["uncond"], cond)
        pred = model(noisy.to(param.device, param.dtype), t.to(param.device), class_labels=cond.to(param.device, param.dtype))
        err = (pred.float() - target.to(param.device)) ** 2
        mask = batch["valid"].to(param.device)[:, None, :, None].float()
        return (err * mask).sum() / (mask.sum() * err.shape[1] * err.shape[3]).clamp_min(1.0)

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, model, tokenizer, request: GenerationRequest) -> tuple[np.ndarray, int]:
        """Sample audio from text or from a reference clip, with classifier-free guidance.

        One request of `generate_batch` with the model's active adapter (the same request and seed
        give the same audio alone and inside any batch).

        Returns:
            (float32 waveform [round(duration_s * 16000)] on the CPU, 16000).

        Raises:
            ValueError: a reference clip that is silent or too short (< 0.1 s).
        """
        result = self.generate_batch(model, tokenizer, [request])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @torch.no_grad()
    def generate_batch(self, model, tokenizer, requests: list[GenerationRequest],
                       adapter_names: list[str] | None = None) -> list[tuple[np.ndarray, int] | Exception]:
        """Denoise a batch of requests together, each row with its own adapter, seed and guidance.

        DDIM (eta 0) over `steps` steps (default `DEFAULT_STEPS`) from Gaussian latents drawn per
        request by a CPU generator seeded with its seed, then moved to the UNet's device; guidance
        eps = eps_u + w (eps_c - eps_u) against the empty prompt's embedding, run with the
        request's own adapter (Ho & Salimans 2022, as diffusers' AudioLDMPipeline), off for w <= 1;
        then VAE decoder -> log-mel -> HiFi-GAN vocoder per request. `melody`, when given, is a
        reference clip whose CLAP audio embedding conditions instead of the prompt. Requests share
        one denoising loop per (latent length, steps) bucket: the UNet's convolutions would mix a
        padded row with its padding, and DDIM's timesteps depend on the step count.

        Args:
            requests: what to generate.
            adapter_names: per request, peft adapter name or `batching.BASE_ROW` (None: the
                active adapter).

        Returns:
            per request, (float32 waveform [round(duration_s * 16000)] on the CPU, 16000), or the
            exception it raised (ValueError: a reference clip that is silent or too short).
        """
        inner = _container(model)
        out: list[Any] = [None] * len(requests)
        buckets: dict[tuple[int, int], list[int]] = {}
        for i, r in enumerate(requests):
            try:
                cond = (self.reference_embedding(inner, r.melody, r.melody_sample_rate) if r.melody is not None
                        else clap_text_embeddings(inner.text_encoder, tokenizer, [r.prompt]))
            except ValueError as exc:
                out[i] = exc
                continue
            out[i] = cond
            key = (mel_frames_for(r.duration_s, inner.vae_scale_factor), DEFAULT_STEPS if r.steps is None else r.steps)
            buckets.setdefault(key, []).append(i)
        for (frames, steps), idx in buckets.items():
            names = None if adapter_names is None else [adapter_names[i] for i in idx]
            try:
                wavs = self._denoise(inner, [requests[i] for i in idx], [out[i] for i in idx], names, frames, steps)
            except (ValueError, RuntimeError) as exc:
                wavs = [exc] * len(idx)
            for i, wav in zip(idx, wavs):
                out[i] = wav
        return out

    def _denoise(self, inner: AudioLDM, requests: list[GenerationRequest], conds: list[torch.Tensor],
                 names: list[str] | None, frames: int, steps: int) -> list[tuple[np.ndarray, int]]:
        """One DDIM loop over requests of equal latent length and steps; conds are float32 [1, D] each."""
        from musiclora.models.batching import row_adapters

        param = next(p for p in inner.unet.parameters())
        factor = inner.vae_scale_factor
        sched = copy.deepcopy(inner.scheduler)
        sched.set_timesteps(steps)
        shape = (1, int(_unet_config(inner).in_channels), frames // factor, N_MELS // factor)
        latents = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(r.seed)) for r in requests])
        latents = (latents * sched.init_noise_sigma).to(param.device)
        n = len(requests)
        guided = [j for j, r in enumerate(requests) if r.guidance_scale > 1.0]
        rows = list(range(n)) + guided  # conditional rows, then the unconditional rows of guided requests
        uncond = inner.extras["uncond"].float()[None]
        labels = torch.cat([c.float().cpu() for c in conds] + [uncond.cpu()] * len(guided)).to(param.device, param.dtype)
        w = torch.tensor([requests[j].guidance_scale for j in guided], device=param.device)[:, None, None, None]
        with row_adapters(self.lora_root(inner), None if names is None else [names[j] for j in rows]):
            for t in sched.timesteps:
                x = sched.scale_model_input(latents[rows], t)
                step_t = torch.full((len(rows),), int(t), dtype=torch.long, device=param.device)
                pred = inner(x.to(param.dtype), step_t, labels).float()
                eps = pred[:n].clone()
                if guided:
                    eps_u = pred[n:]
                    eps[guided] = eps_u + w * (eps[guided] - eps_u)
                latents = sched.step(eps, t, latents, eta=0.0).prev_sample  # eta 0: no noise drawn
        return [(self._decode(inner, latents[j : j + 1], r.duration_s), SAMPLE_RATE) for j, r in enumerate(requests)]

    @staticmethod
    def _decode(inner: AudioLDM, latents: torch.Tensor, duration_s: float) -> np.ndarray:
        """Latents [1, C, T', F'] -> VAE decoder -> log-mel -> vocoder -> float32 waveform [L] on the CPU."""
        vae_param = next(inner.vae.parameters())
        z = (latents / float(inner.vae.config.scaling_factor)).to(vae_param.device, vae_param.dtype)
        mel = inner.vae.decode(z).sample  # [1, 1, T, 64]
        voc_param = next(inner.vocoder.parameters())
        wav = inner.vocoder(mel[:, 0].to(voc_param.device, voc_param.dtype))  # [1, T * 160]
        return wav[0, : round(duration_s * SAMPLE_RATE)].float().cpu().numpy()

    def reference_embedding(self, model: nn.Module, audio: np.ndarray, sample_rate: int | None) -> torch.Tensor:
        """CLAP audio embedding of a reference clip, float32 [1, D].

        Raises:
            ValueError: no sample rate, not mono, shorter than 0.1 s, or silent (below -60 dBFS).
        """
        from musiclora.audio import is_silent, resample

        if not sample_rate:
            raise ValueError("reference audio: its sample rate (melody_sample_rate) is required")
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1:
            raise ValueError(f"reference audio must be mono [L], got shape {audio.shape}")
        if audio.size < MIN_REFERENCE_S * sample_rate:
            raise ValueError(f"reference audio is {audio.size / sample_rate:.3f} s long; need at least {MIN_REFERENCE_S} s")
        if is_silent(audio):
            raise ValueError("reference audio is silent (RMS below -60 dBFS); give a clip with audible sound")
        return clap_audio_embeddings(self.clap_audio(model), [resample(audio, int(sample_rate), SAMPLE_RATE)])


def _conditioning_clip(seg: Segment) -> tuple[np.ndarray, str]:
    """The clip whose CLAP audio embedding a segment stores, and where it came from."""
    path = seg.meta.get("cond_audio")
    if not path:
        return seg.audio[: seg.num_valid], "clip"
    from musiclora.audio import is_silent, load_window

    start = float(seg.meta.get("source_start_s", seg.meta.get("start_s", 0.0)))
    dur = seg.num_valid / SAMPLE_RATE
    clip = load_window(path, start, dur, SAMPLE_RATE)
    if clip.size == 0 or is_silent(clip):
        raise ValueError(f"cond_audio {path}: silent or empty over {start:.2f}-{start + dur:.2f} s of segment {seg.key}")
    return clip, f"cond_audio:{path}"


def _unet_config(model: AudioLDM):
    """The UNet's config, under a peft wrapper too."""
    unet = model.unet
    return unet.get_base_model().config if hasattr(unet, "get_base_model") else unet.config


def _container(model: nn.Module) -> AudioLDM:
    """The `AudioLDM` module under DeepSpeed / other wrappers (raises TypeError when there is none)."""
    return unwrap_to(model, AudioLDM)



def _noise_and_timesteps(x0: torch.Tensor, num_timesteps: int, seeds: torch.Tensor | None):
    """Noise shaped like x0 [B, C, T', F'] (float32) and timesteps int64 [B] in [0, num_timesteps).

    From torch's global generator, or with `seeds` (int64 [B]) per sample from
    `torch.Generator().manual_seed(seed)`: noise first, then the timestep.
    """
    if seeds is None:
        return torch.randn_like(x0), torch.randint(0, num_timesteps, (x0.shape[0],), dtype=torch.long)
    noise, t = [], []
    for i, seed in enumerate(seeds.tolist()):
        g = torch.Generator().manual_seed(int(seed))
        noise.append(torch.randn(x0.shape[1:], generator=g, dtype=torch.float32))
        t.append(int(torch.randint(0, num_timesteps, (1,), generator=g)))
    return torch.stack(noise).to(x0.device, x0.dtype), torch.tensor(t, dtype=torch.long)
