"""The model-family interface: everything the data path, trainer and server ask of a family.

A family turns audio into the features its shards hold (`encode_segments`), turns a batch of
decoded shard samples into model inputs (`collate`), computes the training loss (`loss`),
knows which modules LoRA targets (`lora_presets`) and generates audio (`generate`). The trainer
and `prepare` only ever talk to this interface: no `if family == ...` outside `models/`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class Loaded:
    """A loaded base model with what it needs around it.

    Attributes:
        model: the full transformers/diffusers-backed `nn.Module` (eval mode).
        tokenizer: the text tokenizer/processor matching `model`.
        base: the id it was loaded from (`tiny`, a hub id or a folder).
        family: the family's name.
    """

    model: nn.Module
    tokenizer: Any
    base: str
    family: str


@dataclass
class Segment:
    """One fixed-length piece of a track, ready for feature extraction.

    Attributes:
        key: unique sample key (`<track-id>_<start-ms>`), safe as a WebDataset `__key__`.
        audio: float32 waveform at the family's `sample_rate`, zero-padded to the segment length:
            mono [L], or [2, L] where the family takes stereo (`ModelFamily.channels == 2`) and the
            data path keeps it (a stereo family also accepts mono [L], as dual mono).
        num_valid: number of real (non-padding) samples at the start of `audio`.
        caption: text prompt describing the music.
        meta: extra JSON-serialisable fields copied into the sample (source path, start_s, ...).
    """

    key: str
    audio: np.ndarray
    num_valid: int
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)


class ModelFamily(ABC):
    """One family of text-to-music model (MusicGen-Melody, AudioLDM, ...).

    Attributes:
        name: the family's registry name, e.g. `musicgen-melody`.
        tiny_id: the pseudo model id that builds the tiny random-weight preset.
        lora_presets: preset name -> list of module-name suffixes for peft's `target_modules`.
    """

    name: str = ""
    tiny_id: str = "tiny"
    lora_presets: dict[str, list[str]] = {}
    lora_root_attr: str | None = None
    """Attribute of the loaded model holding the sub-module LoRA goes into (None: the whole model).
    AudioLDM sets "unet", so its adapter is a UNet adapter that loads onto a bare UNet."""

    def lora_root(self, model: nn.Module) -> nn.Module:
        """The module LoRA is applied to and saved from (after `apply_lora`: the PeftModel).

        Pass the model itself, not a DeepSpeed engine (use `engine.module`)."""
        return getattr(model, self.lora_root_attr) if self.lora_root_attr else model

    @abstractmethod
    def load(self, base: str, dtype: torch.dtype = torch.float32, revision: str | None = None) -> Loaded:
        """Load the full model from a hub id or local folder, or build the tiny preset.

        Raises:
            ValueError: `base` is neither `tiny`, a folder with a config, nor a loadable hub id.
        """

    @abstractmethod
    def skeleton(self, base: str, revision: str | None = None) -> nn.Module:
        """The model's module tree without loading weights (meta device; tiny: the real tiny model).

        Used on the driver to check LoRA target modules before any worker starts.
        """

    @abstractmethod
    def save_tiny(self, out_dir: str, seed: int = 0) -> str:
        """Build the tiny preset and write it as a `save_pretrained` folder; return its path."""

    sample_rate: int = 0
    """Audio sample rate in Hz the family's encoder expects."""

    channels: int = 1
    """Audio channels the family's encoder takes: 1 (mono `Segment.audio` [L]) or 2 (stereo [2, L],
    Stable Audio Open). Where segments are cut, data/ keeps this many channels."""

    licence_note: str = ("the adapter is a derivative of the base model: its licence terms apply "
                         "(see the base model's card)")
    """Sentence for the adapter card: the base weights' licence, which an adapter inherits."""

    @abstractmethod
    def feature_spec(self, loaded: Loaded) -> dict[str, Any]:
        """JSON description of what each shard sample holds (written into manifest.json)."""

    def check_shards(self, feature_spec: dict[str, Any]) -> None:
        """Refuse shards that lack what this family's configured options need (preflight, no weights).

        Args:
            feature_spec: the manifest's `feature_spec` (written by `prepare`).

        Raises:
            ValueError: a field the options need is missing; the message says how to re-prepare.
        """

    @abstractmethod
    def encode_segments(self, loaded: Loaded, segments: list[Segment]) -> list[dict[str, Any]]:
        """Turn segments into WebDataset samples (dicts of `__key__` and encoded fields)."""

    @abstractmethod
    def collate(self, samples: list[dict[str, Any]], loaded: Loaded) -> dict[str, torch.Tensor]:
        """Batch decoded shard samples into the tensors `loss` takes."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss (float32) for one batch."""

    @abstractmethod
    def generate(
        self,
        model: nn.Module,
        tokenizer: Any,
        prompt: str,
        duration_s: float,
        guidance_scale: float = 3.0,
        seed: int = 0,
        melody: np.ndarray | None = None,
        melody_sample_rate: int | None = None,
        steps: int | None = None,
    ) -> tuple[np.ndarray, int]:
        """Generate audio; returns (float32 waveform [L], sample_rate in Hz).

        `melody` / `melody_sample_rate` are the conditioning audio, float mono [L] at its rate in Hz:
        MusicGen-Melody takes its chroma, AudioLDM its CLAP audio embedding (a reference clip).
        `steps` is the number of denoising steps of diffusion families (others ignore it).
        """

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Target tokens in a batch, for the tokens/s metric (0 when the family has no tokens)."""
        return 0

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        """Turn on activation checkpointing in the LoRA root (transformers/diffusers API)."""
        root = self.lora_root(model)
        base = root.get_base_model() if hasattr(root, "get_base_model") else root
        if hasattr(base, "gradient_checkpointing_enable"):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(base, "enable_gradient_checkpointing"):
            base.enable_gradient_checkpointing()
        else:
            raise ValueError(f"{type(base).__name__} has no gradient checkpointing switch")

    def configure(self, options: dict[str, Any] | None) -> ModelFamily:
        """Apply family-specific `model.options` (validated by the family); returns self.

        Raises:
            ValueError: options given to a family that takes none (names them).
        """
        if options:
            raise ValueError(f"model.options: family {self.name!r} takes no options, got {sorted(options)}")
        return self

    def target_modules(self, preset: str, explicit: list[str] | None = None) -> list[str]:
        """peft `target_modules` for a preset name, or the explicit list when given.

        Raises:
            ValueError: unknown preset (names the known ones).
        """
        if explicit:
            return list(explicit)
        if preset not in self.lora_presets:
            raise ValueError(
                f"unknown LoRA preset {preset!r} for family {self.name!r}; "
                f"expected one of {sorted(self.lora_presets)} or explicit target_modules"
            )
        return list(self.lora_presets[preset])

