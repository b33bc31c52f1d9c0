"""Evaluate an adapter against its base: generate on the same prompts and seeds, score, report.

Three entry points, from the most to the least packaged:

Every entry point takes one `EvalSettings` (CLAP model, embedders, clip length, guidance, reference
cap and split, music metrics, base/family overrides) instead of repeating its fields.

- `evaluate(adapter, prompts, reference, out_dir, settings)`: what `musiclora evaluate` runs. Base and
  adapter clips, every metric of `musiclora.eval.scoring`, and the report (report.md,
  report.html, metrics.json, WAVs, spectrogram PNGs) in `out_dir`.
- `evaluate_adapter(adapter, prompts, reference, settings) -> dict[str, float]`: the Tune objective. The
  adapter's flat metrics (`clap_score`, `kad`, `fad`, `kad_<embedder>`, `mel_mse`, ...), to hand
  to `ray.train.report` / `tune.report`; with `include_base=True` also `base_<name>` and
  `delta_<name>` (adapter minus base). Tune settings: `tune.metric: kad, mode: min` or
  `tune.metric: clap_score, mode: max`::

      from musiclora.eval.evaluate import evaluate_adapter

      def trainable(config):
          adapter_url = train_one(config)              # however the run publishes its adapter
          ray.train.report(evaluate_adapter(adapter_url, "prompts.jsonl", "s3://bucket/shards/val-set",
                                            EvalSettings(clap="laion/larger_clap_music",
                                                         embedders=("clap", "encodec"))))

- `Evaluator`: the reusable core for periodic evaluation inside a training loop. Build it once
  before the loop (it loads the reference clips, embeds them, embeds the prompts), then call it
  on the live model every N steps; it switches the model to eval mode and back, and forks the
  torch RNG so the training's random stream is untouched::

      evaluator = build_evaluator(family, loaded, load_prompts("prompts.jsonl", duration_s=4.0),
                                  "s3://bucket/shards/val-set", EvalSettings(embedders=("encodec",), music=False))
      ...
      if rank == 0 and step % eval_every == 0:      # ZeRO-2 / DDP: every rank holds full weights
          metrics.update({f"eval/{k}": v for k, v in evaluator(engine.module, loaded.tokenizer).items()})
      ray.train.report(metrics)

  Under ZeRO-3 the parameters are partitioned: gather them (`deepspeed.zero.GatheredParameters`)
  on every rank around the call, or evaluate the saved checkpoint with `evaluate_adapter` instead.
  `music=False` skips the pYIN-based metrics, the slowest part.

A CLAP score needs a real CLAP checkpoint (`EvalSettings.clap`, a hub id or folder). Without one the
CLAP score and the CLAP-embedder KAD/FAD are left out, the reason is printed once (stderr) and kept
in `Evaluator.left_out` (and the report); the other embedders still run. `clap="tiny"` builds the
random tiny CLAP, for tests: its figures are labelled "random — not a real score" in the report.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from musiclora.audio import resample
from musiclora.eval import scoring
from musiclora.eval.embeddings import (
    DEFAULT_EMBEDDERS,
    NO_CLAP,
    build_embedders,
    left_out_metrics,
    load_clap_bundle,
    plan_embedders,
)
from musiclora.eval.inputs import PromptSpec, ReferenceSet, check_prompts, load_prompts, load_reference
from musiclora.models.base import GenerationRequest, Loaded, ModelFamily


class EvalSettings(BaseModel):
    """How an evaluation runs: one object passed through `evaluate`, `evaluate_adapter` and
    `build_evaluator` (and built by `musiclora evaluate` from its options).

    Attributes:
        base / family: override the adapter card's base model and family (None: the card's).
        clap: a CLAP hub id or folder (e.g. "laion/larger_clap_music") for the CLAP score and the
            "clap" embedder; None leaves both out; "tiny" is the random tiny CLAP (tests only:
            labelled not a real score).
        embedders: KAD/FAD embedder specs (see `build_embedders`); the first that runs gives `kad` /
            `fad`. None: `DEFAULT_EMBEDDERS`, those not available left out.
        duration_s: seconds per generated clip (also the reference clip length).
        guidance_scale: classifier-free guidance for generation.
        max_reference_clips: cap on reference clips.
        reference_split: shards split (None: "val" if present, else "train").
        music: compute harmonic accuracy, melodic complexity, rhythmic inconsistency (the slowest part).
        device: where the model generates (cpu, cuda, cuda:N); None: cuda when visible, else cpu
            (`musiclora.generate.resolve_device`, the rule of `musiclora generate`).
        dtype: the model's parameter dtype (float32, float16, bfloat16); None: bfloat16 on a GPU,
            float32 on the CPU. The `encodec` embedder runs where the base's codec is,
            the others on the CPU.

    Raises:
        pydantic.ValidationError: a field out of range or unknown (names it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: str | None = None
    family: str | None = None
    clap: str | None = Field(None, min_length=1)
    embedders: tuple[str, ...] | None = Field(None, min_length=1)
    duration_s: float = Field(4.0, gt=0)
    guidance_scale: float = Field(3.0, ge=0)
    max_reference_clips: int = Field(32, ge=2)
    reference_split: str | None = None
    music: bool = True
    device: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None


def model_placement(settings: EvalSettings) -> tuple[torch.device, torch.dtype]:
    """(device, dtype) the evaluated model is loaded with (see `EvalSettings.device` / `dtype`).

    Raises:
        ValueError: a device this machine does not have (names it).
    """
    from musiclora.generate import parse_dtype, resolve_device

    device = resolve_device(settings.device)
    name = settings.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    return device, parse_dtype(name)


DEFAULT_SETTINGS = EvalSettings()


def codec_of(loaded: Loaded) -> nn.Module | None:
    """The model's EnCodec (`audio_encoder` of MusicGen) when it has one, else None (latent-diffusion
    families keep their VAE elsewhere); with `codes_decoder` it turns stored codes back into audio."""
    codec = getattr(loaded.model, "audio_encoder", None)
    return codec if codec is not None and hasattr(codec, "encoder") else None


def codes_decoder(codec: nn.Module):
    """Function int codes [K, T] -> float32 mono audio [L] through `codec` (a transformers EncodecModel)."""

    def decode(codes: np.ndarray) -> np.ndarray:
        device = next(codec.parameters()).device  # the codec's device (a model evaluated on a GPU)
        c = torch.as_tensor(np.asarray(codes, dtype=np.int64), device=device)[None, None]  # [1 chunk, 1, K, T]
        with torch.inference_mode():
            audio = codec.decode(c, [None]).audio_values  # [1, C, L]
        return audio[0].float().mean(dim=0).cpu().numpy()

    return decode


def fit_length(audio: np.ndarray, num_samples: int) -> np.ndarray:
    """A clip [L] or [C, L] cut or zero-padded along its last axis to `num_samples`, as float32."""
    audio = np.asarray(audio, np.float32)[..., :num_samples]
    pad = [(0, 0)] * (audio.ndim - 1) + [(0, num_samples - audio.shape[-1])]
    return np.pad(audio, pad)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        model.train(was_training)


@dataclass
class Evaluator:
    """Generates clips for fixed prompts and scores them against a fixed reference set.

    Reference embeddings, CLAP text embeddings and embedders are computed once here, so calling
    it repeatedly (periodic evaluation, Tune trials in one process) only pays for generation
    and the generated side of the metrics.

    Attributes:
        family: the model family (generates audio).
        prompts: at least 2 prompts (KAD/FAD need 2 clips).
        reference: the reference clips, at `family.sample_rate`.
        clap: the CLAP bundle (model, feature extractor, tokenizer), or None: no CLAP score.
        embedders: metric key -> embedder for KAD/FAD; the first gives `kad` / `fad`.
        duration_s: seconds generated per prompt.
        guidance_scale: classifier-free guidance.
        music: compute the pYIN-based music-theory metrics (slowest part).
        left_out: metric -> why it is not computed (`clap_score` is added when `clap` is None);
            printed once, on stderr, when the evaluator is built.
    """

    family: ModelFamily
    prompts: list[PromptSpec]
    reference: ReferenceSet
    clap: Any
    embedders: dict[str, Any]
    duration_s: float = 4.0
    guidance_scale: float = 3.0
    music: bool = True
    left_out: dict[str, str] = field(default_factory=dict)
    _ref_emb: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _text_emb: np.ndarray | None = field(default=None, repr=False)
    max_reference_music: int = 8
    _ref_music: list[dict[str, float | None]] | None = field(default=None, repr=False)
    _distances: scoring.ReferenceDistances | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        from musiclora.models.clap import ClapTextEmbedder

        check_prompts(self.prompts)
        if not self.embedders:
            raise ValueError("embedders: need at least one for KAD/FAD (e.g. encodec, crepe-tiny, mel-stats)")
        if self.reference.sample_rate != self.family.sample_rate:
            raise ValueError(
                f"reference is at {self.reference.sample_rate} Hz but {self.family.name} generates at "
                f"{self.family.sample_rate} Hz; load it with sample_rate={self.family.sample_rate}"
            )
        if self.clap is None:
            self.left_out = {"clap_score": NO_CLAP, **self.left_out}
        self._say_left_out()
        self._ref_emb = self.embed(self.reference.wavs)
        self._distances = scoring.ReferenceDistances(self.reference.wavs, self.sample_rate)
        if self.clap is not None:
            self._text_emb = ClapTextEmbedder(self.clap.model, self.clap.tokenizer)(
                [p.text for p in self.prompts]
            )

    def _say_left_out(self) -> None:
        """Print each reason in `left_out` once, with the metrics it removes (stderr)."""
        by_reason: dict[str, list[str]] = {}
        for metric, reason in self.left_out.items():
            by_reason.setdefault(reason, []).append(metric)
        for reason, metrics in by_reason.items():
            print(f"[musiclora] evaluate: left out {', '.join(metrics)}: {reason}", file=sys.stderr, flush=True)

    @property
    def sample_rate(self) -> int:
        return self.family.sample_rate

    def embed(self, wavs: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Embed clips at `sample_rate`, mono [L] or [C, L] (the embedders take the downmix), with every
        embedder (resampled to each one's rate)."""
        out = {}
        for key, emb in self.embedders.items():
            out[key] = emb([resample(w, self.sample_rate, emb.sample_rate) for w in wavs])
        return out

    def generate(self, model: nn.Module, tokenizer: Any) -> list[np.ndarray]:
        """One clip per prompt, each with the prompt's seed, in the family's layout.

        Returns:
            float32 clips cut or zero-padded to n = round(duration_s * sample_rate) samples: mono [n],
            or [C, n] for a family with C channels (Stable Audio Open: stereo). `score` takes either;
            embedders and the reference distances see the downmix, the saved report clips keep the channels.
        """
        n = round(self.duration_s * self.sample_rate)
        clips = []
        with _eval_mode(model):
            for p in self.prompts:
                request = GenerationRequest(p.text, self.duration_s, self.guidance_scale, p.seed,
                                            melody=p.melody, melody_sample_rate=p.melody_sample_rate)
                audio, sr = self.family.generate(model, tokenizer, request)
                audio = resample(audio, sr, self.sample_rate) if sr != self.sample_rate else audio
                clips.append(fit_length(audio, n))
        return clips

    def score(self, clips: list[np.ndarray]) -> scoring.SetScores:
        """All metrics of one generated set (one clip per prompt, at `sample_rate`, mono [L] or [C, L]).

        KAD/FAD embedders, the CLAP score, the reference distances and chroma score the downmix; the
        study-002 music metrics take [C, L] as it is (they score its downmix too)."""
        if len(clips) != len(self.prompts):
            raise ValueError(f"{len(clips)} clips for {len(self.prompts)} prompts")
        gen_emb = self.embed(clips)
        clap_audio = self._clap_audio(clips) if self.clap is not None else None
        per_clip, errors = [], []
        for i, (p, wav) in enumerate(zip(self.prompts, clips)):
            row: dict[str, float | None] = {}
            if clap_audio is not None:
                row["clap_score"] = scoring.per_clip_clap(self._text_emb[i : i + 1], clap_audio[i : i + 1])[0]
            err: dict[str, str] = {}
            row.update(self._distances(wav))
            if self.music:
                values, problems = scoring.music_scores(wav, self.sample_rate)
                for name in ("harmonic_accuracy", "melodic_complexity", "rhythmic_inconsistency"):
                    row[name] = values.get(name)
                err.update(problems)
            if p.melody is not None:
                row["chroma_cosine"], problem = scoring.chroma_or_none(
                    p.melody, p.melody_sample_rate, wav, self.sample_rate
                )
                if problem:
                    err["chroma_cosine"] = problem
            per_clip.append(row)
            errors.append(err)
        result = scoring.aggregate(per_clip, errors)
        clap = {"clap_score": result.metrics.pop("clap_score")} if "clap_score" in result.metrics else {}
        result.metrics = {**clap, **scoring.distribution_scores(self._ref_emb, gen_emb), **result.metrics}
        return result

    def _clap_audio(self, clips: list[np.ndarray]) -> np.ndarray:
        from musiclora.models.clap import ClapAudioEmbedder

        emb = next(
            (
                e
                for e in self.embedders.values()
                if isinstance(e, ClapAudioEmbedder) and e.model is self.clap.model
            ),
            None,
        )
        emb = emb or ClapAudioEmbedder(self.clap.model, self.clap.feature_extractor,
                                       source=getattr(self.clap, "source", "unknown"))
        return emb([resample(w, self.sample_rate, emb.sample_rate) for w in clips])

    def reference_music(self) -> list[dict[str, float | None]]:
        """Music-theory metrics of the first `max_reference_music` reference clips (computed once), for context."""
        if self._ref_music is None:
            self._ref_music = []
            for wav in self.reference.wavs[: self.max_reference_music]:
                values, _ = scoring.music_scores(wav, self.sample_rate)
                self._ref_music.append(
                    {
                        k: values.get(k)
                        for k in ("harmonic_accuracy", "melodic_complexity", "rhythmic_inconsistency")
                    }
                )
        return self._ref_music

    def __call__(self, model: nn.Module, tokenizer: Any) -> dict[str, float]:
        """Generate with `model` and return the flat metrics (the Tune / periodic-evaluation dict)."""
        return self.score(self.generate(model, tokenizer)).metrics


def build_evaluator(
    family: ModelFamily,
    loaded: Loaded,
    prompts: list[PromptSpec],
    reference: str | ReferenceSet,
    settings: EvalSettings = DEFAULT_SETTINGS,
) -> Evaluator:
    """Build an `Evaluator` from names: CLAP model id, embedder specs, reference URL or set.

    Without a CLAP checkpoint (`settings.clap` None) the CLAP score and the "clap" embedder are
    left out (see `plan_embedders`); the reasons are in `Evaluator.left_out`, printed once.

    Args:
        family / loaded: the family and its loaded base model (its codec serves "encodec").
        prompts: the prompts (see `load_prompts`).
        reference: shards URL, audio folder or file, or an already loaded `ReferenceSet`.
        settings: CLAP model, embedders, clip length, guidance, reference cap and split, music metrics.

    Raises:
        ValueError / FileNotFoundError: as `load_reference`, `build_embedders`, `plan_embedders`,
            `load_clap_bundle`, `check_prompts`.
    """
    codec = codec_of(loaded)
    names, left_out = plan_embedders(settings.embedders, settings.clap is not None, codec is not None)
    if not isinstance(reference, ReferenceSet):
        reference = load_reference(
            reference,
            family.sample_rate,
            settings.duration_s,
            settings.max_reference_clips,
            settings.reference_split,
            decode_codes=codes_decoder(codec) if codec is not None else None,
        )
    bundle = load_clap_bundle(settings.clap)
    return Evaluator(
        family=family,
        prompts=prompts,
        reference=reference,
        clap=bundle,
        embedders=build_embedders(names, bundle, codec, codec_source=f"codec of base {loaded.base}"),
        duration_s=settings.duration_s,
        guidance_scale=settings.guidance_scale,
        music=settings.music,
        left_out=left_out_metrics(left_out),
    )


@dataclass
class Comparison:
    """Base vs adapter on the same prompts and seeds.

    Attributes:
        evaluator: what generated and scored (prompts, reference, settings).
        clips: "base" / "adapter" -> one float32 clip per prompt at `evaluator.sample_rate`, [L] or [C, L]
            (the family's channels).
        scores: "base" / "adapter" -> their `SetScores`.
        info: facts for the report (adapter, base, family, timings, settings).
    """

    evaluator: Evaluator
    clips: dict[str, list[np.ndarray]]
    scores: dict[str, scoring.SetScores]
    info: dict[str, Any] = field(default_factory=dict)

    def delta(self) -> dict[str, float]:
        """Adapter minus base for every flat metric."""
        base, adapter = self.scores["base"].metrics, self.scores["adapter"].metrics
        return {k: adapter[k] - base[k] for k in adapter if k in base}


def compare(
    evaluator: Evaluator, peft_model: nn.Module, tokenizer: Any, info: dict[str, Any] | None = None
) -> Comparison:
    """Generate and score with the adapter disabled (base) and enabled, same prompts and seeds.

    Args:
        peft_model: the model with an adapter attached (`ModelFamily.attach_adapter` or `apply_lora`):
            its family's LoRA root is a peft `PeftModel`, whose `disable_adapter()` gives the base.

    Raises:
        TypeError: the LoRA root has no `disable_adapter` (no adapter attached).
    """
    root = evaluator.family.lora_root(peft_model)
    if not hasattr(root, "disable_adapter"):
        raise TypeError(f"compare needs an adapter attached (a peft PeftModel), got {type(root).__name__}")
    timings: dict[str, float] = {}
    clips: dict[str, list[np.ndarray]] = {}
    t0 = time.perf_counter()
    with root.disable_adapter():
        clips["base"] = evaluator.generate(peft_model, tokenizer)
    clips["adapter"] = evaluator.generate(peft_model, tokenizer)
    timings["generate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = {name: evaluator.score(c) for name, c in clips.items()}
    timings["score_s"] = time.perf_counter() - t0
    return Comparison(evaluator, clips, scores, info={**(info or {}), "timings": timings})


def _load_with_adapter(adapter: str, settings: EvalSettings):
    """(family, `Loaded` with the adapter attached to the family's LoRA root, facts for the report)."""
    from musiclora.adapters import load_for_inference

    device, dtype = model_placement(settings)
    fam, loaded = load_for_inference(adapter, settings.base, settings.family, dtype=dtype, device=device)
    return fam, loaded, {"adapter": adapter, "base": loaded.base, "family": loaded.family}


def _prompts(prompts: str | os.PathLike | list[PromptSpec], duration_s: float) -> list[PromptSpec]:
    return (
        load_prompts(prompts, duration_s=duration_s)
        if isinstance(prompts, (str, os.PathLike))
        else list(prompts)
    )


def evaluate(
    adapter: str,
    prompts: str | os.PathLike | list[PromptSpec],
    reference: str | ReferenceSet,
    out_dir: str | os.PathLike | None = None,
    settings: EvalSettings = DEFAULT_SETTINGS,
) -> Comparison:
    """Base vs adapter on the prompts, scored against the reference; the report goes to `out_dir`.

    Args:
        adapter: peft adapter folder (path or URL); its card.json names family and base.
        prompts: prompts JSONL path/URL or a list of `PromptSpec`.
        reference: shards URL, audio folder or file, or a `ReferenceSet`.
        out_dir: where report.md, report.html, metrics.json, audio/ and spectrograms/ go (None: no report).
        settings: see `EvalSettings`.

    Returns:
        The `Comparison` (clips, per-clip and flat scores for base and adapter).

    Raises:
        ValueError / FileNotFoundError: bad adapter, prompts, reference or embedder, each named.
    """
    t0 = time.perf_counter()
    fam, loaded, info = _load_with_adapter(adapter, settings)
    evaluator = build_evaluator(fam, loaded, _prompts(prompts, settings.duration_s), reference, settings)
    info.update(clap=settings.clap, embedders=list(settings.embedders or DEFAULT_EMBEDDERS),
                duration_s=settings.duration_s, guidance_scale=settings.guidance_scale)
    result = compare(evaluator, loaded.model, loaded.tokenizer, info)
    result.info["timings"]["total_s"] = time.perf_counter() - t0
    if out_dir is not None:
        from musiclora.eval.report import write_report

        result.info["files"] = write_report(result, out_dir)
    return result


def evaluate_adapter(
    adapter: str,
    prompts: str | os.PathLike | list[PromptSpec],
    reference: str | ReferenceSet,
    settings: EvalSettings = DEFAULT_SETTINGS,
    include_base: bool = False,
) -> dict[str, float]:
    """The Tune objective: the adapter's flat metrics (`kad`, `fad`, `kad_encodec`, `mel_mse`, ...;
    `clap_score` and `kad_clap` with a CLAP checkpoint).

    Args:
        adapter, prompts, reference, settings: as `evaluate` (`settings.reference_split` is used too).
        include_base: also generate with the base; adds `base_<name>` and `delta_<name>`
            (adapter minus base) for every metric. Doubles generation time.

    Returns:
        Metric name -> float; NaN where a metric is undefined for every clip.

    Raises:
        As `evaluate`.
    """
    fam, loaded, _ = _load_with_adapter(adapter, settings)
    evaluator = build_evaluator(fam, loaded, _prompts(prompts, settings.duration_s), reference, settings)
    if not include_base:
        return evaluator(loaded.model, loaded.tokenizer)
    result = compare(evaluator, loaded.model, loaded.tokenizer)
    out = dict(result.scores["adapter"].metrics)
    out.update({f"base_{k}": v for k, v in result.scores["base"].metrics.items()})
    out.update({f"delta_{k}": v for k, v in result.delta().items()})
    return out
