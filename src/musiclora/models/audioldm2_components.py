"""AudioLDM2's parts without its diffusers pipeline: the model container, prompt encoding (CLAP + T5
-> projection -> GPT-2 "language of audio"), and loading/saving the `cvssp/audioldm2-music` layout.

The folder layout is diffusers' (one `save_pretrained` folder per component, `model_index.json` on
top), so a folder written here loads with the plain classes and `AudioLDM2Pipeline` (used by the
tests as the reference), and `load_audioldm2` reads the hub checkpoint the same way:

    model_index.json
    unet/              AudioLDM2UNet2DConditionModel (cross-attention to the GPT-2 states and to T5)
    vae/               diffusers AutoencoderKL over the log-mel "image" [B, 1, T, 64]
    text_encoder/      transformers ClapModel; musiclora loads its text tower alone (ClapTextModelWithProjection:
                       no 0-dim logit scales, which DeepSpeed cannot broadcast)
    text_encoder_2/    transformers T5EncoderModel (flan-t5-large in the hub checkpoint)
    projection_model/  AudioLDM2ProjectionModel (CLAP + T5 -> the language model's width, SOS/EOS)
    language_model/    transformers GPT2Model (generates 8 hidden states: the "language of audio")
    tokenizer/ tokenizer_2/ feature_extractor/   RoBERTa BPE, T5, ClapFeatureExtractor
    vocoder/           transformers SpeechT5HifiGan (log-mel [B, T, 64] -> 16 kHz waveform)
    scheduler/         diffusers DDIMScheduler config

The mel front end (16 kHz, 64 bands, hop 160) is AudioLDM's: `audioldm_components.waveform_to_log_mel`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

COMPONENTS = {
    "unet": ("audioldm2", "AudioLDM2UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "ClapModel"),
    "text_encoder_2": ("transformers", "T5EncoderModel"),
    "projection_model": ("audioldm2", "AudioLDM2ProjectionModel"),
    "language_model": ("transformers", "GPT2Model"),
    "tokenizer": ("transformers", "RobertaTokenizerFast"),
    "tokenizer_2": ("transformers", "T5TokenizerFast"),
    "feature_extractor": ("transformers", "ClapFeatureExtractor"),
    "vocoder": ("transformers", "SpeechT5HifiGan"),
    "scheduler": ("diffusers", "DDIMScheduler"),
}
"""The `model_index.json` entries of the hub layout (what AudioLDM2Pipeline.from_pretrained reads)."""

MAX_NEW_TOKENS = 8
"""GPT-2 states generated per prompt when the language model's config names none (AudioLDM2's 8)."""


@dataclass
class AudioLDM2Tokenizers:
    """The two tokenizers of AudioLDM2 (the family's `Loaded.tokenizer`).

    Attributes:
        clap: RoBERTa BPE tokenizer of the CLAP text tower.
        t5: T5 tokenizer of `text_encoder_2`.
        feature_extractor: the CLAP audio feature extractor (saved with the folder; unused in training).
    """

    clap: Any
    t5: Any
    feature_extractor: Any = None


@dataclass
class PromptStates:
    """Encoded prompts: what the UNet cross-attends to.

    Attributes:
        t5: float32 T5 last hidden states, shape [N, S, D2] (zero past each prompt's tokens).
        t5_mask: int64 attention mask of `t5`, shape [N, S] (1 = token).
        generated: float32 GPT-2 generated states, shape [N, M, D] (M = max_new_tokens, 8).
    """

    t5: torch.Tensor
    t5_mask: torch.Tensor
    generated: torch.Tensor


class AudioLDM2(nn.Module):
    """The AudioLDM2 components as one module; `forward` is the UNet's noise (or v) prediction.

    The training loop wraps this module in DeepSpeed and calls it, so the UNet runs inside the
    engine's forward; LoRA goes into `unet` (the family's `lora_root_attr`). Components other
    than `unet` are None in a skeleton. `extras` holds what is not a sub-module: `uncond`
    (`PromptStates` of the empty prompt, [1, ...]) and `source` ({"base", "revision"}).
    """

    def __init__(self, unet: nn.Module, vae=None, text_encoder=None, text_encoder_2=None, projection_model=None,
                 language_model=None, vocoder=None, scheduler=None):
        super().__init__()
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.projection_model = projection_model
        self.language_model = language_model
        self.vocoder = vocoder
        self.scheduler = scheduler
        self.extras: dict[str, Any] = {}

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, generated: torch.Tensor, t5: torch.Tensor,
                t5_mask: torch.Tensor) -> torch.Tensor:
        """UNet prediction for noisy latents.

        Args:
            sample: noisy latents, shape [B, C, T', F'] (T' = mel frames / 4, F' = 64 / 4 at real size).
            timestep: int64 diffusion steps, shape [B].
            generated: GPT-2 generated states, shape [B, M, D] (`encoder_hidden_states`).
            t5: T5 hidden states, shape [B, S, D2] (`encoder_hidden_states_1`).
            t5_mask: int64 mask of `t5`, shape [B, S] (`encoder_attention_mask_1`).

        Returns:
            the prediction (epsilon or v, per the scheduler's `prediction_type`), shape of `sample`.
        """
        return self.unet(sample, timestep, encoder_hidden_states=generated, encoder_hidden_states_1=t5,
                         encoder_attention_mask_1=t5_mask).sample

    @property
    def vae_scale_factor(self) -> int:
        """Down-sampling of the VAE along time and frequency (4 for audioldm2-music)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


@torch.no_grad()
def generate_language_model(language_model: nn.Module, embeds: torch.Tensor, mask: torch.Tensor,
                            max_new_tokens: int) -> torch.Tensor:
    """Let GPT-2 continue a sequence of input embeddings by `max_new_tokens` hidden states.

    Each step feeds the whole sequence (no KV cache: 8 steps over a short prompt) and appends the
    last position's final hidden state, as diffusers' `AudioLDM2Pipeline.generate_language_model`.

    Args:
        language_model: transformers `GPT2Model`.
        embeds: float input embeddings, shape [N, L, D].
        mask: int64 attention mask, shape [N, L].
        max_new_tokens: M, states to generate.

    Returns:
        float tensor [N, M, D], the generated states.
    """
    mask = mask.long()
    for _ in range(max_new_tokens):
        out = language_model(inputs_embeds=embeds, attention_mask=mask)
        embeds = torch.cat([embeds, out.last_hidden_state[:, -1:]], dim=1)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
    return embeds[:, -max_new_tokens:]


@torch.no_grad()
def encode_prompts(model: AudioLDM2, tokenizers: AudioLDM2Tokenizers, texts: list[str],
                   t5_length: int | None = None) -> PromptStates:
    """AudioLDM2's text conditioning for a list of prompts.

    CLAP text features [N, 1, Dc] and T5 last hidden states [N, S, D2] -> `projection_model`
    (linear maps, learned SOS/EOS, concatenation) -> GPT-2 generates M states. Source: diffusers
    `AudioLDM2Pipeline.encode_prompt` (CLAP padded to `model_max_length`, T5 padded to the longest,
    or to `t5_length` as the pipeline pads the negative prompt to the prompt's length; GPT-2 sees
    absolute positions, so that padding changes the generated states).

    Returns:
        `PromptStates` on the CPU, float32.
    """
    device = next(model.text_encoder_2.parameters()).device
    clap = tokenizers.clap(list(texts), padding="max_length", max_length=_max_len(tokenizers.clap), truncation=True,
                           return_tensors="pt")
    t5_pad = {"padding": True, "max_length": _max_len(tokenizers.t5)} if t5_length is None else \
        {"padding": "max_length", "max_length": int(t5_length)}
    t5_tok = tokenizers.t5(list(texts), truncation=True, return_tensors="pt", **t5_pad)
    clap_states = F.normalize(model.text_encoder(clap.input_ids.to(device), attention_mask=clap.attention_mask.to(device))
                              .text_embeds, dim=-1)[:, None, :]  # = ClapModel.get_text_features
    t5_mask = t5_tok.attention_mask.to(device)
    t5 = model.text_encoder_2(t5_tok.input_ids.to(device), attention_mask=t5_mask)[0]
    proj = model.projection_model(hidden_states=clap_states, hidden_states_1=t5,
                                  attention_mask=t5_mask.new_ones((len(texts), 1)), attention_mask_1=t5_mask)
    lm = model.language_model
    steps = int(getattr(lm.config, "max_new_tokens", None) or MAX_NEW_TOKENS)
    generated = generate_language_model(lm, proj.hidden_states.to(next(lm.parameters()).dtype),
                                        proj.attention_mask, steps)
    t5 = t5.float() * t5_mask[..., None].float()
    return PromptStates(t5.cpu(), t5_mask.long().cpu(), generated.float().cpu())


def _max_len(tokenizer) -> int:
    return int(min(getattr(tokenizer, "model_max_length", 512) or 512, 512))


# --------------------------------------------------------------------------- folder layout


def _classes() -> dict[str, Any]:
    from diffusers import (
        AudioLDM2ProjectionModel,
        AudioLDM2UNet2DConditionModel,
        AutoencoderKL,
        DDIMScheduler,
    )
    from transformers import (
        AutoTokenizer,
        ClapFeatureExtractor,
        ClapTextModelWithProjection,
        GPT2Model,
        SpeechT5HifiGan,
        T5EncoderModel,
    )

    return {"unet": AudioLDM2UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": ClapTextModelWithProjection,
            "text_encoder_2": T5EncoderModel, "projection_model": AudioLDM2ProjectionModel,
            "language_model": GPT2Model, "vocoder": SpeechT5HifiGan, "scheduler": DDIMScheduler,
            "tokenizer": AutoTokenizer, "tokenizer_2": AutoTokenizer, "feature_extractor": ClapFeatureExtractor}


def load_audioldm2(base: str, dtype: torch.dtype = torch.float32, revision: str | None = None):
    """Load every component of a folder or hub id in the `cvssp/audioldm2-music` layout.

    Args:
        base: hub id or local folder (see the module docstring for the layout).
        dtype: parameter dtype of the modules.
        revision: hub revision (branch, tag or commit).

    Returns:
        (`AudioLDM2` in eval mode, `AudioLDM2Tokenizers`).

    Raises:
        ValueError: a component is missing or cannot be read (names the component and the base).
    """
    parts: dict[str, Any] = {}
    for name, cls in _classes().items():
        try:
            parts[name] = cls.from_pretrained(base, subfolder=name, revision=revision)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"cannot load AudioLDM2 component {name!r} from {base!r}: expected 'tiny', a folder or hub id in the "
                f"cvssp/audioldm2-music layout with {name}/ ({exc})"
            ) from exc
    model = AudioLDM2(parts["unet"], parts["vae"], parts["text_encoder"], parts["text_encoder_2"],
                      parts["projection_model"], parts["language_model"], parts["vocoder"], parts["scheduler"])
    model.extras["source"] = {"base": base, "revision": revision}
    tokenizers = AudioLDM2Tokenizers(parts["tokenizer"], parts["tokenizer_2"], parts["feature_extractor"])
    return model.to(dtype).eval(), tokenizers


def audioldm2_skeleton(base: str, revision: str | None = None) -> AudioLDM2:
    """UNet and VAE module trees from `<base>/{unet,vae}/config.json` on the meta device (no weights
    read): enough to check LoRA targets and the feature spec before any worker starts.

    Raises:
        ValueError: a config cannot be read (names it).
    """
    classes = _classes()
    configs = {}
    for name in ("unet", "vae"):
        try:
            configs[name] = classes[name].load_config(base, subfolder=name, revision=revision)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the {name} config of AudioLDM2 base {base!r} ({name}/config.json) ({exc})") from exc
    with torch.device("meta"):
        return AudioLDM2(classes["unet"].from_config(configs["unet"]), classes["vae"].from_config(configs["vae"]))


def save_audioldm2(model: AudioLDM2, tokenizers: AudioLDM2Tokenizers, out_dir: str) -> str:
    """Write `model` in the hub folder layout; returns `out_dir`.

    `text_encoder/` is the full CLAP (`extras["clap"]`, which the tiny preset keeps), as the hub has it.

    Raises:
        ValueError: `model` holds no full CLAP model to write as `text_encoder/`.
    """
    import diffusers

    if model.extras.get("clap") is None:
        raise ValueError("save_audioldm2: extras['clap'] (the full transformers ClapModel) is needed for text_encoder/")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder_2", "projection_model", "language_model", "vocoder", "scheduler"):
        getattr(model, name).save_pretrained(str(out / name))
    model.extras["clap"].save_pretrained(str(out / "text_encoder"))
    tokenizers.clap.save_pretrained(str(out / "tokenizer"))
    tokenizers.t5.save_pretrained(str(out / "tokenizer_2"))
    if tokenizers.feature_extractor is not None:
        tokenizers.feature_extractor.save_pretrained(str(out / "feature_extractor"))
    index = {"_class_name": "AudioLDM2Pipeline", "_diffusers_version": diffusers.__version__}
    index.update({k: list(v) for k, v in COMPONENTS.items()})
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out_dir
