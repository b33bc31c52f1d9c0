"""AudioLDM2 (diffusers AudioLDM2 UNet + AutoencoderKL + CLAP/T5/GPT-2 + HiFi-GAN) as a musiclora family.

Data: 16 kHz mono -> AudioLDM's log-mel (64 bands, hop 160) -> VAE posterior mean, stored as
`latents.npy` [C, T', F'], with the caption's conditioning as the UNet reads it: T5 states
`t5.npy` [S, D2] and GPT-2's generated states `generated.npy` [M, D] (both frozen, so prepare
computes them once). Training: the latent-diffusion loss (epsilon or v, as the scheduler config
says), padding masked, caption dropout to the empty prompt's states so classifier-free guidance
works. LoRA goes into the UNet only (`lora_root_attr = "unet"`): an adapter is a plain diffusers
UNet adapter. Generation runs the components directly (DDIM + CFG -> VAE decoder -> vocoder);
`AudioLDM2Pipeline` is only the tests' reference.
"""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from musiclora.models.audioldm2_components import (
    AudioLDM2,
    PromptStates,
    audioldm2_skeleton,
    encode_prompts,
    load_audioldm2,
    save_audioldm2,
)
from musiclora.models.audioldm2_tiny import build_tiny_audioldm2
from musiclora.models.audioldm_components import (
    HOP_LENGTH,
    SAMPLE_RATE,
    mel_basis,
    mel_frames_for,
    normalize_waveform,
    pad_frames,
    waveform_to_log_mel,
)
from musiclora.models.base import GenerationRequest, Loaded, ModelFamily, Segment, npy_bytes, unwrap_to

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TIME = ["time_embedding.linear_1", "time_embedding.linear_2"]
DEFAULT_STEPS = 10
"""Denoising steps when none are given (the pipeline's default is 200; 10 keeps CPU demos short)."""
LICENCE_NOTE = ("the adapter is a derivative of the base model: its licence terms apply "
                "(cvssp/audioldm2-music: CC-BY-NC-SA-4.0 weights)")


class AudioLDM2Options(BaseModel):
    """`model.options` of an AudioLDM2 run.

    Attributes:
        caption_dropout: probability, per training sample, of replacing the caption's states by the
            empty prompt's (AudioLDM2 trains with 0.1), for classifier-free guidance.
    """

    model_config = ConfigDict(extra="forbid")

    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0)


class AudioLDM2Family(ModelFamily):
    """AudioLDM2: VAE latents of the log-mel + T5 / GPT-2 states -> LoRA on the UNet."""

    name = "audioldm2"
    default_base = "cvssp/audioldm2-music"
    default_segment_s = 10.24
    """AudioLDM2's training clip length (1024 mel frames)."""
    sample_rate = SAMPLE_RATE
    channels = 1
    licence_note = LICENCE_NOTE
    lora_root_attr = "unet"
    takes_steps = True
    lora_presets: ClassVar[dict[str, list[str]]] = {
        # study 004 (AudioLDM2 on MusicNet) tuned the whole model; LoRA keeps its target, the UNet's
        # attention (self- and both cross-attentions), plus the timestep MLP by default
        "study004": ATTN + TIME,
        "attn": list(ATTN),
        "attn+time": ATTN + TIME,
        "attn+out": ATTN + ["ff.net.2"],
    }

    options_model = AudioLDM2Options

    # ------------------------------------------------------------------ loading

    def load(self, base: str, dtype: torch.dtype = torch.float32, revision: str | None = None) -> Loaded:
        if base == self.tiny_id:
            model, tokenizers = build_tiny_audioldm2()
        else:
            model, tokenizers = load_audioldm2(base, torch.float32, revision)
        model.extras["uncond"] = encode_prompts(model, tokenizers, [""])
        return Loaded(model=model.to(dtype).eval(), tokenizer=tokenizers, base=base, family=self.name)

    def skeleton(self, base: str, revision: str | None = None) -> nn.Module:
        if base == self.tiny_id:
            return build_tiny_audioldm2()[0]
        return audioldm2_skeleton(base, revision)

    def save_tiny(self, out_dir: str, seed: int = 0) -> str:
        model, tokenizers = build_tiny_audioldm2(seed)
        return save_audioldm2(model, tokenizers, out_dir)

    # ------------------------------------------------------------------ data

    def feature_spec(self, loaded: Loaded) -> dict[str, Any]:
        model = _container(loaded.model)
        unet = _base(model.unet)
        return {
            "family": self.name,
            "codec": "audioldm2-vae",
            "codec_sample_rate": SAMPLE_RATE,
            "mel": {"n_mels": 64, "hop_length": HOP_LENGTH, "n_fft": 1024, "win_length": 1024, "fmin": 0,
                    "fmax": 8000, "scale": "ln(max(mel(|STFT|), 1e-5))"},
            "frame_rate": SAMPLE_RATE / HOP_LENGTH / model.vae_scale_factor,
            "latent_channels": int(model.vae.config.latent_channels),
            "vae_scale_factor": model.vae_scale_factor,
            "cross_attention_dim": [list(d) if isinstance(d, (list, tuple)) else d for d in
                                    _as_list(unet.config.cross_attention_dim)],
            "fields": {
                "latents.npy": "float16 [C, T', F'] VAE posterior mean of the log-mel (unscaled)",
                "t5.npy": "float32 [S, D2] T5 last hidden states of the caption (its S tokens)",
                "generated.npy": "float32 [M, D] GPT-2 generated states of the caption (M = 8)",
                "json": "caption, num_frames (valid latent frames), source, start_s, duration_s",
            },
        }

    @torch.no_grad()
    def encode_segments(self, loaded: Loaded, segments: list[Segment]) -> list[dict[str, Any]]:
        """VAE latents of the log-mel and the caption's T5 / GPT-2 states per segment.

        Each caption is encoded alone (batch of one), as generation encodes its prompt: GPT-2 sees
        absolute positions, so padding a caption inside a batch would change its states.

        Returns:
            one WebDataset sample per segment: `__key__`, `latents.npy` (float16 [C, T', F']),
            `t5.npy` (float32 [S, D2]), `generated.npy` (float32 [M, D]) as .npy bytes, and `json`.
        """
        model = _container(loaded.model)
        factor = model.vae_scale_factor
        wav = np.zeros((len(segments), len(segments[0].audio)), np.float32)
        for i, seg in enumerate(segments):
            wav[i, : seg.num_valid] = normalize_waveform(seg.audio[: seg.num_valid])
        mel = pad_frames(waveform_to_log_mel(torch.from_numpy(wav), mel_basis()), factor)  # [B, T, 64]
        vae_dtype = next(model.vae.parameters()).dtype
        latents = model.vae.encode(mel[:, None].to(vae_dtype)).latent_dist.mode().float()  # [B, C, T/f, 64/f]
        out = []
        for i, seg in enumerate(segments):
            states = encode_prompts(model, loaded.tokenizer, [seg.caption])
            tokens = int(states.t5_mask[0].sum())
            frames = math.ceil(seg.num_valid / HOP_LENGTH / factor)
            out.append({
                "__key__": seg.key,
                "latents.npy": npy_bytes(latents[i].to(torch.float16).numpy()),
                "t5.npy": npy_bytes(states.t5[0, :tokens].numpy()),
                "generated.npy": npy_bytes(states.generated[0].numpy()),
                "json": dict(seg.meta, caption=seg.caption, num_frames=frames),
            })
        return out

    def collate(self, samples: list[dict[str, Any]], loaded: Loaded) -> dict[str, torch.Tensor]:
        """Decoded samples -> `latents` [B, C, T', F'] float32 (unscaled), `valid` [B, T'] bool, the
        caption's `t5` [B, S, D2] / `t5_mask` [B, S] int64 / `generated` [B, M, D] and the empty
        prompt's `uncond_t5` / `uncond_t5_mask` / `uncond_generated` of the same shapes (S: the
        longest of the batch and the empty prompt; zero-padded, mask 0)."""
        latents = torch.stack([torch.as_tensor(s["latents.npy"].astype(np.float32)) for s in samples])
        t = latents.shape[2]
        frames = torch.tensor([min(int(s["json"]["num_frames"]), t) for s in samples])
        valid = torch.arange(t)[None, :] < frames[:, None]
        uncond: PromptStates = _container(loaded.model).extras["uncond"]
        t5s = [torch.as_tensor(s["t5.npy"].astype(np.float32)) for s in samples]
        u_len = int(uncond.t5_mask[0].sum())
        width = max([x.shape[0] for x in t5s] + [u_len])
        t5, mask = _pad_states(t5s, width)
        u_t5, u_mask = _pad_states([uncond.t5[0, :u_len].float()] * len(samples), width)
        generated = torch.stack([torch.as_tensor(s["generated.npy"].astype(np.float32)) for s in samples])
        return {"latents": latents, "valid": valid, "t5": t5, "t5_mask": mask, "generated": generated,
                "uncond_t5": u_t5, "uncond_t5_mask": u_mask,
                "uncond_generated": uncond.generated.float().expand_as(generated).clone()}

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Valid latent frames in the batch (25 per second of audio), the analogue of codec tokens."""
        return int(batch["valid"].sum())

    # ------------------------------------------------------------------ training

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Latent-diffusion loss: MSE between the UNet's prediction and its target, padding masked.

        x0 = latents * vae.scaling_factor; t ~ U{0, ..., N-1}; x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
        (the scheduler's `add_noise`); the target is eps for `prediction_type="epsilon"` and
        v = sqrt(a_t) eps - sqrt(1 - a_t) x0 for "v_prediction" (Ho et al. 2020; Salimans & Ho 2022;
        diffusers `get_velocity`). In training mode each sample's caption states become the empty
        prompt's with probability `options.caption_dropout`.

        Args:
            model: the `AudioLDM2` module (or the DeepSpeed engine / wrapper around it).
            batch: `collate` output.

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
        noise = torch.randn_like(x0)
        t = torch.randint(0, int(sched.config.num_train_timesteps), (b,), dtype=torch.long)
        noisy = sched.add_noise(x0, noise, t)
        kind = sched.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = sched.get_velocity(x0, noise, t)
        else:
            raise ValueError(f"scheduler prediction_type {kind!r}: expected 'epsilon' or 'v_prediction'")
        t5, mask, gen = batch["t5"], batch["t5_mask"], batch["generated"]
        if model.training and self.options.caption_dropout > 0:
            drop = torch.rand(b) < self.options.caption_dropout
            t5 = torch.where(drop[:, None, None], batch["uncond_t5"], t5)
            mask = torch.where(drop[:, None], batch["uncond_t5_mask"], mask)
            gen = torch.where(drop[:, None, None], batch["uncond_generated"], gen)
        dev, dt = param.device, param.dtype
        pred = model(noisy.to(dev, dt), t.to(dev), gen.to(dev, dt), t5.to(dev, dt), mask.to(dev))
        err = (pred.float() - target.to(dev)) ** 2
        valid = batch["valid"].to(dev)[:, None, :, None].float()
        return (err * valid).sum() / (valid.sum() * err.shape[1] * err.shape[3]).clamp_min(1.0)

    # ------------------------------------------------------------------ generation

    def generate(self, model, tokenizer, request: GenerationRequest) -> tuple[np.ndarray, int]:
        """Sample audio from a text prompt with classifier-free guidance (see `sample_audioldm2`).

        AudioLDM2 takes no conditioning audio here: `request.melody` must be None.

        Returns:
            (float32 waveform [round(duration_s * 16000)], 16000).

        Raises:
            ValueError: conditioning audio given.
        """
        if request.melody is not None:
            raise ValueError("audioldm2 generates from text only: conditioning audio (melody) is not supported")
        return sample_audioldm2(model, tokenizer, request.prompt, request.duration_s, request.guidance_scale,
                                request.seed, request.steps)


@torch.no_grad()
def sample_audioldm2(model: nn.Module, tokenizers, prompt: str, duration_s: float, guidance_scale: float = 3.5,
                     seed: int = 0, steps: int | None = None) -> tuple[np.ndarray, int]:
    """DDIM (eta 0) over `steps` steps from seeded Gaussian latents, guidance
    eps = eps_u + w (eps_c - eps_u) against the empty prompt (Ho & Salimans 2022), then VAE decoder
    -> log-mel -> HiFi-GAN vocoder: what diffusers' AudioLDM2Pipeline computes for the same latents
    (the empty prompt's T5 tokens padded to the prompt's length, as it pads them; training's caption
    dropout uses the empty prompt encoded alone, `extras["uncond"]`).

    Args:
        model: `AudioLDM2` (or a wrapper); tokenizers: its `AudioLDM2Tokenizers`.
        prompt: text prompt. duration_s: seconds to return (> 0). guidance_scale: w (<= 1: off).
        seed: seed of the initial latents. steps: denoising steps (default `DEFAULT_STEPS`).

    Returns:
        (float32 waveform [round(duration_s * 16000)], 16000).

    Raises:
        ValueError: duration_s <= 0 or steps < 1.
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be > 0 seconds, got {duration_s}")
    steps = DEFAULT_STEPS if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1 denoising steps, got {steps}")
    inner = _container(model)
    param = next(p for p in inner.unet.parameters())
    dev, dt = param.device, param.dtype
    cond = encode_prompts(inner, tokenizers, [prompt])
    guided = guidance_scale > 1.0
    if guided:  # the empty prompt, its T5 tokens padded to the prompt's length as the pipeline pads them
        uncond = encode_prompts(inner, tokenizers, [""], t5_length=cond.t5.shape[1])
        t5, mask = torch.cat([uncond.t5, cond.t5]), torch.cat([uncond.t5_mask, cond.t5_mask])
        gen = torch.cat([uncond.generated, cond.generated])
    else:
        t5, mask, gen = cond.t5, cond.t5_mask, cond.generated
    factor = inner.vae_scale_factor
    n_mels = int(inner.vocoder.config.model_in_dim)
    frames = mel_frames_for(duration_s, factor)
    sched = copy.deepcopy(inner.scheduler)
    sched.set_timesteps(steps)
    gen_rng = torch.Generator().manual_seed(int(seed))
    shape = (1, int(_base(inner.unet).config.in_channels), frames // factor, n_mels // factor)
    latents = torch.randn(shape, generator=gen_rng) * sched.init_noise_sigma
    for t in sched.timesteps:
        x = torch.cat([latents, latents]) if guided else latents
        x = sched.scale_model_input(x, t)
        step_t = torch.full((x.shape[0],), int(t), dtype=torch.long, device=dev)
        pred = inner(x.to(dev, dt), step_t, gen.to(dev, dt), t5.to(dev, dt), mask.to(dev)).float().cpu()
        if guided:
            pred_u, pred_c = pred.chunk(2)
            pred = pred_u + guidance_scale * (pred_c - pred_u)
        latents = sched.step(pred, t, latents, eta=0.0, generator=gen_rng).prev_sample
    vae_param = next(inner.vae.parameters())
    z = (latents / float(inner.vae.config.scaling_factor)).to(vae_param.device, vae_param.dtype)
    mel = inner.vae.decode(z).sample  # [1, 1, T, 64]
    voc_param = next(inner.vocoder.parameters())
    wav = inner.vocoder(mel[:, 0].to(voc_param.dtype))  # [1, T * 160]
    return wav[0, : round(duration_s * SAMPLE_RATE)].float().cpu().numpy(), SAMPLE_RATE


def _pad_states(states: list[torch.Tensor], width: int):
    """Stack [S_i, D] states zero-padded to [N, width, D] with their int64 masks [N, width]."""
    out = torch.zeros(len(states), width, states[0].shape[-1])
    mask = torch.zeros(len(states), width, dtype=torch.long)
    for i, x in enumerate(states):
        out[i, : x.shape[0]] = x
        mask[i, : x.shape[0]] = 1
    return out, mask


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _base(module: nn.Module) -> nn.Module:
    """A module's base model under a peft wrapper (itself otherwise)."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


def _container(model: nn.Module) -> AudioLDM2:
    """The `AudioLDM2` module under DeepSpeed / other wrappers (raises TypeError when there is none)."""
    return unwrap_to(model, AudioLDM2)

