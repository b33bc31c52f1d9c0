"""Stable Audio Open's parts without its diffusers pipeline: the model container (DiT + conditioning),
text and timing conditioning, the v-objective's angle schedule, and loading/saving the
`stabilityai/stable-audio-open-1.0` layout.

The folder layout is diffusers' (`model_index.json` + one `save_pretrained` folder per component),
so a folder written here loads with the plain classes and `StableAudioPipeline`:

    model_index.json
    transformer/       StableAudioDiTModel (the denoiser; LoRA goes here)
    vae/               AutoencoderOobleck (44.1 kHz stereo <-> 64 latent channels at 2048x down-sampling)
    text_encoder/      transformers T5EncoderModel (t5-base in the hub checkpoint)
    tokenizer/         its T5 tokenizer
    projection_model/  StableAudioProjectionModel (T5 -> conditioning width; seconds_start / seconds_total)
    scheduler/         scheduler_config.json (CosineDPMSolverMultistepScheduler: v-prediction, sigma 0.3-500)

The scheduler config is read as JSON: diffusers' CosineDPMSolverMultistepScheduler needs `torchsde`,
and musiclora samples with its own deterministic sampler over the same schedule.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

SAMPLE_RATE = 44_100
"""Stable Audio Open's audio rate in Hz (stereo)."""

COMPONENTS = {
    "transformer": ("diffusers", "StableAudioDiTModel"),
    "vae": ("diffusers", "AutoencoderOobleck"),
    "text_encoder": ("transformers", "T5EncoderModel"),
    "tokenizer": ("transformers", "T5TokenizerFast"),
    "projection_model": ("stable_audio", "StableAudioProjectionModel"),
    "scheduler": ("diffusers", "CosineDPMSolverMultistepScheduler"),
}
"""The `model_index.json` entries of the hub layout (what StableAudioPipeline.from_pretrained reads)."""


class StableAudio(nn.Module):
    """The Stable Audio Open components as one module; `forward` is the DiT's v prediction.

    The training loop wraps this module in DeepSpeed and calls it, so the DiT runs inside the
    engine's forward; LoRA goes into `transformer` (the family's `lora_root_attr`). Components
    other than `transformer` are None in a skeleton. `scheduler_config` is the scheduler's JSON;
    `extras["source"]` = {"base", "revision"}.
    """

    def __init__(self, transformer: nn.Module, vae=None, text_encoder=None, projection_model=None,
                 scheduler_config: dict[str, Any] | None = None):
        super().__init__()
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.projection_model = projection_model
        self.scheduler_config = dict(scheduler_config or {})
        self.extras: dict[str, Any] = {}

    def forward(self, sample: torch.Tensor, t: torch.Tensor, t5: torch.Tensor, t5_mask: torch.Tensor,
                seconds_start: torch.Tensor, seconds_total: torch.Tensor, null_cond: torch.Tensor) -> torch.Tensor:
        """DiT v prediction for noisy latents, conditioned as StableAudioPipeline conditions.

        Cross-attention input: [projected T5 states (zero where masked); seconds_start; seconds_total]
        ([B, S + 2, D]); global input: [seconds_start, seconds_total] along the width ([B, 1, 2D]);
        rotary embeddings over the latent frames + 1. Where `null_cond` is True the cross-attention
        input is all zeros: the unconditional branch of classifier-free guidance, and what
        stable-audio-tools' cfg_dropout trains on (the global timing condition stays).

        Args:
            sample: noisy latents x_t, shape [B, C, T'].
            t: float32 diffusion time in [0, 1], shape [B] (angle t * pi / 2).
            t5: T5 last hidden states, shape [B, S, D_t5]. t5_mask: int64 [B, S], 1 = token.
            seconds_start / seconds_total: float32 [B], seconds.
            null_cond: bool [B].

        Returns:
            v prediction, shape of `sample`.
        """
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        proj = self.projection_model
        text = proj(text_hidden_states=t5).text_hidden_states * t5_mask[..., None].to(t5.dtype)
        timing = proj(start_seconds=seconds_start.float(), end_seconds=seconds_total.float())
        start, total = timing.seconds_start_hidden_states, timing.seconds_end_hidden_states  # [B, 1, D]
        cross = torch.cat([text.to(start.dtype), start, total], dim=1)
        cross = torch.where(null_cond.to(cross.device)[:, None, None], torch.zeros_like(cross), cross)
        glob = torch.cat([start, total], dim=2)
        dit = self.transformer
        config = dit.get_base_model().config if hasattr(dit, "get_base_model") else dit.config
        rotary = get_1d_rotary_pos_embed(int(config.attention_head_dim) // 2, sample.shape[2] + glob.shape[1],
                                         use_real=True, repeat_interleave_real=False)
        rotary = tuple(r.to(sample.device) for r in rotary)
        dtype = sample.dtype
        return dit(sample, t.to(dtype), encoder_hidden_states=cross.to(dtype), global_hidden_states=glob.to(dtype),
                   rotary_embedding=rotary).sample

    @property
    def hop_length(self) -> int:
        """Waveform samples per latent frame (2048 for stable-audio-open-1.0)."""
        return int(self.vae.hop_length)


def angles(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, sigma) = (cos(t pi / 2), sin(t pi / 2)): the v-objective's signal and noise scales.

    Source: stable-audio-tools `diffusion_objective: v` (Salimans & Ho 2022, the cosine schedule);
    diffusers' cosine scheduler feeds the model t = atan(sigma_edm) * 2 / pi, the same angle.
    """
    return torch.cos(t * math.pi / 2), torch.sin(t * math.pi / 2)


def sampling_times(config: dict[str, Any], steps: int) -> torch.Tensor:
    """Diffusion times [steps + 1] from the scheduler config's sigma schedule, ending at 0.

    The schedule is the config's `sigma_schedule` between `sigma_max` and `sigma_min` (exponential:
    log-linear, as diffusers' `_compute_exponential_sigmas`; karras: rho-spaced), mapped to
    t = atan(sigma / sigma_data) * 2 / pi (diffusers' `precondition_noise`), then a final 0.
    """
    lo, hi = float(config.get("sigma_min", 0.3)), float(config.get("sigma_max", 500.0))
    data = float(config.get("sigma_data", 1.0))
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    if config.get("sigma_schedule", "exponential") == "karras":
        rho = float(config.get("rho", 7.0))
        sigmas = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    else:
        sigmas = torch.exp(math.log(hi) + ramp * (math.log(lo) - math.log(hi)))
    times = torch.atan(sigmas / data) * 2 / math.pi
    return torch.cat([times, torch.zeros(1, dtype=torch.float64)]).float()


@torch.no_grad()
def t5_states(text_encoder: nn.Module, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 last hidden states of prompts, padded to the tokenizer's `model_max_length` as the pipeline pads.

    Returns:
        (float32 [N, S, D] zero where masked, int64 mask [N, S]) on the CPU; S = model_max_length (<= 512).
    """
    width = text_len(tokenizer)
    tokens = tokenizer(list(texts), padding="max_length", max_length=width, truncation=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device)
    states = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float()
    return (states * mask[..., None]).cpu(), mask.long().cpu()


def text_len(tokenizer) -> int:
    """Text positions the DiT cross-attends to: the tokenizer's `model_max_length` (128 for SAO), at most 512."""
    return int(min(getattr(tokenizer, "model_max_length", 512) or 512, 512))


# --------------------------------------------------------------------------- folder layout


def _classes() -> dict[str, Any]:
    from diffusers import AutoencoderOobleck, StableAudioDiTModel, StableAudioProjectionModel
    from transformers import AutoTokenizer, T5EncoderModel

    return {"transformer": StableAudioDiTModel, "vae": AutoencoderOobleck, "text_encoder": T5EncoderModel,
            "projection_model": StableAudioProjectionModel, "tokenizer": AutoTokenizer}


def _scheduler_config(base: str, revision: str | None) -> dict[str, Any]:
    from diffusers import DDIMScheduler  # any ConfigMixin reads the JSON; the named class is not built

    config = DDIMScheduler.load_config(base, subfolder="scheduler", revision=revision)
    return {k: v for k, v in dict(config).items() if not k.startswith("_") or k == "_class_name"}


def load_stable_audio(base: str, dtype: torch.dtype = torch.float32, revision: str | None = None):
    """Load every component of a folder or hub id in the `stabilityai/stable-audio-open-1.0` layout.

    Returns:
        (`StableAudio` in eval mode, T5 tokenizer).

    Raises:
        ValueError: a component is missing or cannot be read (names the component and the base).
    """
    parts: dict[str, Any] = {}
    loaders = {name: (lambda cls=cls, name=name: cls.from_pretrained(base, subfolder=name, revision=revision))
               for name, cls in _classes().items()}
    loaders["scheduler"] = lambda: _scheduler_config(base, revision)
    for name, load in loaders.items():
        try:
            parts[name] = load()
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"cannot load Stable Audio Open component {name!r} from {base!r}: expected 'tiny', a folder or hub id "
                f"in the stabilityai/stable-audio-open-1.0 layout with {name}/ ({exc})"
            ) from exc
    model = StableAudio(parts["transformer"], parts["vae"], parts["text_encoder"], parts["projection_model"],
                        parts["scheduler"])
    model.extras["source"] = {"base": base, "revision": revision}
    return model.to(dtype).eval(), parts["tokenizer"]


def stable_audio_skeleton(base: str, revision: str | None = None) -> StableAudio:
    """DiT and VAE module trees from `<base>/{transformer,vae}/config.json` on the meta device.

    Raises:
        ValueError: a config cannot be read (names it).
    """
    classes = _classes()
    configs = {}
    for name in ("transformer", "vae"):
        try:
            configs[name] = classes[name].load_config(base, subfolder=name, revision=revision)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the {name} config of Stable Audio Open base {base!r} "
                             f"({name}/config.json) ({exc})") from exc
    with torch.device("meta"):
        return StableAudio(classes["transformer"].from_config(configs["transformer"]),
                           classes["vae"].from_config(configs["vae"]))


def save_stable_audio(model: StableAudio, tokenizer, out_dir: str) -> str:
    """Write `model` in the hub folder layout; returns `out_dir`."""
    import diffusers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder", "projection_model"):
        getattr(model, name).save_pretrained(str(out / name))
    tokenizer.save_pretrained(str(out / "tokenizer"))
    (out / "scheduler").mkdir(exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2))
    index = {"_class_name": "StableAudioPipeline", "_diffusers_version": diffusers.__version__}
    index.update({k: list(v) for k, v in COMPONENTS.items()})
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out_dir
