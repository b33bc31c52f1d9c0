"""The model-family interface: everything the data path, trainer and server ask of a family.

A family turns audio into the features its shards hold (`encode_segments`), turns a batch of
decoded shard samples into model inputs (`collate`), computes the training loss (`loss`),
knows which modules LoRA targets (`lora_presets`) and generates audio (`generate`). The trainer
and `prepare` only ever talk to this interface: no `if family == ...` outside `models/`.
"""

from __future__ import annotations

import io
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
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


@dataclass
class GenerationRequest:
    """One generation request, the same for every family and every entry point.

    Attributes:
        prompt: text prompt (AudioLDM ignores it when `melody` is given).
        duration_s: seconds of audio to return, > 0.
        guidance_scale: classifier-free guidance scale w, >= 0 (AudioLDM: <= 1 switches guidance off).
        seed: torch seed, >= 0; the same seed, model, device and request give the same audio.
        steps: denoising steps of diffusion families (None: the family default); others ignore it.
        melody: optional conditioning audio, float32 mono [L] (converted here): MusicGen-Melody takes
            its chroma, AudioLDM its CLAP audio embedding (a reference clip).
        melody_sample_rate: its rate in Hz; required with `melody`.

    Raises:
        TypeError: a prompt that is not a string.
        ValueError: on construction, naming the field and what was expected: an empty or non-finite
            duration, a negative guidance scale or seed, steps < 1, a melody that is not a non-empty,
            finite 1-D array, or a melody without a positive sample rate.
    """

    prompt: str = ""
    duration_s: float = 2.0
    guidance_scale: float = 3.0
    seed: int = 0
    steps: int | None = None
    melody: np.ndarray | None = None
    melody_sample_rate: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"duration_s must be > 0 seconds, got {self.duration_s}")
        if not (math.isfinite(self.guidance_scale) and self.guidance_scale >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {self.guidance_scale}")
        if int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed}")
        self.seed = int(self.seed)
        if self.steps is not None:
            if int(self.steps) != self.steps or self.steps < 1:
                raise ValueError(f"steps must be >= 1 denoising steps (or None for the default), got {self.steps}")
            self.steps = int(self.steps)
        if self.melody is None:
            return
        melody = np.asarray(self.melody, dtype=np.float32)
        if melody.ndim != 1 or melody.size == 0:
            raise ValueError(f"melody (conditioning audio) must be mono float [L] with L > 0, got shape {melody.shape}")
        if not np.isfinite(melody).all():
            raise ValueError("melody (conditioning audio) holds NaN or infinite samples")
        if not self.melody_sample_rate or self.melody_sample_rate <= 0:
            raise ValueError(f"melody (conditioning audio): its sample rate (melody_sample_rate, Hz) is required, "
                             f"got {self.melody_sample_rate!r}")
        self.melody, self.melody_sample_rate = melody, int(self.melody_sample_rate)


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (where its inputs must go)."""
    return next(model.parameters()).device


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

    def with_lora_root(self, model: nn.Module, root: nn.Module) -> nn.Module:
        """Put `root` (e.g. a PeftModel over the old root) in place of the model's LoRA root.

        Returns:
            the model to run: `root` itself when the root is the whole model, else `model` with its
            root attribute replaced.
        """
        if self.lora_root_attr is None:
            return root
        setattr(model, self.lora_root_attr, root)
        return model

    def attach_adapter(self, model: nn.Module, adapter_dir: str, adapter_name: str = "default") -> nn.Module:
        """Attach a peft adapter folder to the family's LoRA root: the one way to attach an adapter.

        The first adapter wraps the root in a `PeftModel` (as `PeftModel.from_pretrained` does);
        more adapters (a root that is a PeftModel already) go in with `load_adapter` under their
        own name. The new adapter becomes the active one. Every LoRA module peft creates must get
        its tensors from the folder: a folder saved from another root (e.g. a UNet adapter put on
        the whole AudioLDM model, whose keys then match nothing) is refused, and the model left as
        it was, instead of running with LoRA silently at zero. `adapters.load_adapter` downloads a
        URL first.

        Args:
            model: the loaded model (`Loaded.model`), or what an earlier attach returned.
            adapter_dir: local folder with `adapter_config.json` + `adapter_model.safetensors`.
            adapter_name: peft adapter name (no '.').

        Returns:
            the model to generate with, in eval mode (see `with_lora_root`).

        Raises:
            FileNotFoundError: no `adapter_config.json` in `adapter_dir`.
            ValueError: LoRA modules of the root that the folder has no tensors for (names a few), or
                `adapter_name` already attached.
        """
        from peft import LoraConfig, PeftModel

        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter_dir} is not a peft adapter folder: adapter_config.json missing")
        root = self.lora_root(model)
        first = not isinstance(root, PeftModel)
        if not first and adapter_name in root.peft_config:
            raise ValueError(f"adapter name {adapter_name!r} is already attached to this model")
        if first:  # what PeftModel.from_pretrained does, keeping load_adapter's result to check it
            config = LoraConfig.from_pretrained(adapter_dir)
            config.inference_mode = True
            root = PeftModel(root, config, adapter_name)
        try:
            missing = root.load_adapter(adapter_dir, adapter_name=adapter_name).missing_keys
            # peft keeps a missing key when the adapter name occurs anywhere in it (a substring test), so an
            # adapter named "y" would count the other adapters' "layers..." keys: keep only this adapter's
            missing = [k for k in missing if f".{adapter_name}." in k]
            if missing:
                raise ValueError(
                    f"adapter {adapter_dir}: {len(missing)} LoRA tensors of the {self.name} LoRA root are not in "
                    f"the folder (e.g. {missing[:2]}); was it saved from another model or root?"
                )
        except BaseException:  # peft put LoRA layers into the modules in place: take them out again
            root.unload() if first else root.delete_adapter(adapter_name)
            raise
        root.set_adapter(adapter_name)
        return self.with_lora_root(model, root.eval()).eval()

    def detach_adapter(self, model: nn.Module, adapter_name: str) -> nn.Module:
        """Remove one attached adapter; the last one takes LoRA off the root (`unload`).

        Returns:
            the model to generate with (the bare model once no adapter is left).

        Raises:
            ValueError: `adapter_name` is not attached.
        """
        root = self.lora_root(model)
        names = getattr(root, "peft_config", {})
        if adapter_name not in names:
            raise ValueError(f"adapter {adapter_name!r} is not attached (attached: {sorted(names)})")
        if len(names) > 1:
            root.delete_adapter(adapter_name)
            return model
        return self.with_lora_root(model, root.unload())

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
    takes_steps: bool = False
    """Whether `generate` uses `GenerationRequest.steps` (diffusion families)."""
    takes_melody: bool = False
    """Whether `generate` conditions on `GenerationRequest.melody` as a melody to follow (MusicGen-Melody's
    chroma), so an evaluation may pass the reference clip's own audio; False where `melody` is a
    reference clip whose embedding would copy the target (AudioLDM) or is refused."""

    channels: int = 1
    """Audio channels the family's encoder takes and `generate` returns: 1 (mono `Segment.audio` and
    output [L]) or 2 (stereo [2, L], Stable Audio Open). Where segments are cut, data/ keeps this many
    channels."""

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
    def generate(self, model: nn.Module, tokenizer: Any, request: GenerationRequest) -> tuple[np.ndarray, int]:
        """Generate audio for one request on the model's device.

        Every input tensor is made on (or moved to) the device of `model`'s parameters; the seed's
        noise comes from a CPU generator or the global seed, so a seed gives the same audio on a
        given device. Only the finished waveform comes back to the CPU.

        Args:
            model: the loaded model, or what `attach_adapter` returned.
            tokenizer: `Loaded.tokenizer`.
            request: what to generate (validated on construction).

        Returns:
            (float32 waveform as a numpy array on the CPU, sample_rate in Hz): mono [L] for a family
            with `channels` 1, channels-first [C, L] with C = `channels` otherwise (Stable Audio Open:
            stereo [2, L]). Consumers read the channels from the array (`ndim`, `shape[0]`) and the
            length from its last axis; `musiclora.audio.save_audio` writes either as a WAV/FLAC.
        """

    def generate_batch(
        self, model: nn.Module, tokenizer: Any, requests: list[GenerationRequest],
        adapter_names: list[str] | None = None,
    ) -> list[tuple[np.ndarray, int] | Exception]:
        """Generate a batch of requests, each row with its own adapter, seed and guidance.

        A family that batches overrides this so that a request gives the same audio alone and
        inside any batch; this default runs the requests one by one with `generate`.

        Args:
            model / tokenizer: as `generate`.
            requests: what to generate.
            adapter_names: per request, the peft adapter name to run it with, or
                `batching.BASE_ROW` for the base model (None: the model's active adapter).

        Returns:
            per request, (float32 waveform on the CPU, [L] or [C, L] as `generate`, sample_rate in Hz),
            or the exception that request raised (ValueError for a bad melody ...); the other requests still run.
        """
        import contextlib

        out: list[tuple[np.ndarray, int] | Exception] = []
        root = self.lora_root(model)
        for i, request in enumerate(requests):
            name = None if adapter_names is None else adapter_names[i]
            try:
                scope = contextlib.nullcontext()
                if name == "__base__" and getattr(root, "peft_config", None):
                    scope = root.disable_adapter()
                elif name not in (None, "__base__"):
                    root.set_adapter(name)
                with scope:
                    out.append(self.generate(model, tokenizer, request))
            except (ValueError, RuntimeError) as exc:
                out.append(exc)
        return out

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

    options_model: ClassVar[type[BaseModel] | None] = None
    """The pydantic schema of the family's `model.options` (None: the family takes none)."""

    def __init__(self, options: dict[str, Any] | None = None):
        self.options = self.options_model() if self.options_model else None
        if options:
            self.configure(options)

    def configure(self, options: dict[str, Any] | None) -> ModelFamily:
        """Validate and apply family-specific `model.options` against `options_model`; returns self.

        Raises:
            ValueError: options given to a family that takes none (names them), an unknown key or a bad
                value (names `model.options.<key>` and the value given).
        """
        if self.options_model is None:
            if options:
                raise ValueError(f"model.options: family {self.name!r} takes no options, got {sorted(options)}")
            return self
        try:
            self.options = self.options_model.model_validate(dict(options or {}))
        except ValidationError as exc:
            problems = "; ".join(
                f"model.options.{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors()
            )
            raise ValueError(f"invalid {self.name} options: {problems}") from None
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


def unwrap_to(model: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """The first `cls` module found by following `.module` through DeepSpeed / other wrappers.

    Raises:
        TypeError: no `cls` inside `model` (names both types).
    """
    seen = model
    while not isinstance(seen, cls):
        if not hasattr(seen, "module"):
            raise TypeError(f"expected an {cls.__name__} model (or a wrapper of one), got {type(model).__name__}")
        seen = seen.module
    return seen


def npy_bytes(array: np.ndarray) -> bytes:
    """`array` as .npy file bytes (no pickle), the encoding of shard fields like `codes.npy`."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()
