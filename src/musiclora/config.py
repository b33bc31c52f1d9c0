"""Configuration schemas (pydantic) and the YAML loader with `key=value` overrides.

One schema per concern. A `TrainConfig` is what `ray_jobs/train.py` reads, what Ray Train's
`train_loop_config` carries (as its dict) and what Tune's `param_space` addresses with the same
dotted keys (`adapter.r`, `optim.lr`, ...). Validation happens here, on the driver, so a bad
config fails before any worker starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

FAMILIES = ("musicgen-melody", "audioldm", "audioldm2", "stable-audio-open")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """Which base model to adapt.

    Attributes:
        family: model family name, one of `FAMILIES`.
        base: a hub id (e.g. `facebook/musicgen-melody`), a local `save_pretrained` folder, or an
            fsspec URL of such a folder (copied locally first).
        revision: hub revision, recorded in the adapter card.
        options: family-specific training knobs (validated by the family), e.g. AudioLDM's
            `caption_dropout`.
    """

    family: str = "musicgen-melody"
    base: str = "facebook/musicgen-melody"
    revision: str | None = None
    options: dict[str, Any] = {}

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        if v not in FAMILIES:
            raise ValueError(f"unknown model family {v!r}; expected one of {list(FAMILIES)}")
        return v


class AdapterConfig(_Strict):
    """LoRA hyper-parameters, named as in peft's `LoraConfig`.

    Defaults are the seed study's (research/001): r 8, lora_alpha 16, lora_dropout 0.25.
    `target_modules`, when given, overrides the preset's module list.
    """

    preset: str = "attn"
    r: int = Field(8, gt=0)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.25, ge=0.0, lt=1.0)
    target_modules: list[str] | None = None


class DataConfig(_Strict):
    """Where the training shards are and how they are batched.

    Attributes:
        shards_url: folder URL holding `manifest.json` and the `.tar` shards (s3:// or file://).
        batch_size: samples per worker per step.
        loader_workers: torch DataLoader worker processes per Ray Train worker.
        shuffle_buffer: samples held in the shuffle buffer (0 disables shuffling).
        seed: base seed; the order is a function of (seed, epoch).
        val_batches: at most this many validation batches per rank per evaluation.
        prepare_config: the PrepareConfig YAML that makes `shards_url` (relative to this file, or
            absolute); `--dry-run` checks the pairing when the shards do not exist yet.
    """

    shards_url: str
    batch_size: int = Field(2, gt=0)
    loader_workers: int = Field(0, ge=0)
    shuffle_buffer: int = Field(32, ge=0)
    seed: int = 0
    val_batches: int = Field(8, gt=0)
    prepare_config: str | None = None


class OptimConfig(_Strict):
    """AdamW with linear warm-up then cosine decay (the seed study's schedule, research/001)."""

    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(0, ge=0)
    max_steps: int = Field(100, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False


class DeepSpeedConfig(_Strict):
    """The DeepSpeed ZeRO settings the trainer builds its `ds_config` from."""

    zero_stage: Literal[2, 3] = 2
    precision: Literal["fp32", "bf16"] = "fp32"
    offload_optimizer: bool = False


class RunConfig(_Strict):
    """Where and how the Ray Train run executes.

    Attributes:
        name: run name; re-running the same name under the same storage_path resumes it.
        storage_path: URL where Ray Train keeps checkpoints and results (s3:// or file://).
        adapters_url: URL prefix; the final adapter is published to `<adapters_url>/<name>/`.
        num_workers: Ray Train workers (one DeepSpeed rank each).
        use_gpu: one GPU per worker, nccl backend, when true; gloo on CPU otherwise.
        cpus_per_worker: CPUs reserved per worker.
        checkpoint_every: steps between checkpoints.
        log_every: steps between `ray.train.report` calls and progress lines.
        max_failures: worker-group restarts Ray Train makes (each resumes from the last checkpoint).
        eval_every: steps between validation passes on the `val` shards (0: never).
        early_stopping_patience: evaluations without improvement before stopping (0: never stop early).
        min_delta: smallest validation-loss decrease that counts as an improvement.
    """

    name: str = "musiclora-run"
    storage_path: str
    adapters_url: str
    num_workers: int = Field(2, gt=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    checkpoint_every: int = Field(20, gt=0)
    log_every: int = Field(1, gt=0)
    max_failures: int = Field(0, ge=0)
    eval_every: int = Field(0, ge=0)
    early_stopping_patience: int = Field(0, ge=0)
    min_delta: float = Field(0.0, ge=0)


class TrainConfig(_Strict):
    """Everything one LoRA training run needs; `ray_jobs/configs/*.yaml` are instances."""

    model: ModelConfig = ModelConfig()
    adapter: AdapterConfig = AdapterConfig()
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    run: RunConfig


class PrepareConfig(_Strict):
    """What `musiclora prepare` turns into shards.

    Attributes:
        family / base: the model whose codec or VAE encodes the audio.
        metadata: JSONL/CSV of tracks (path, caption, ...), e.g. the corpus's `metadata.jsonl`.
        output_url: folder URL the shards and `manifest.json` are written to.
        segment_s: segment length in seconds (MusicGen was trained on 30 s; tiny demos use less).
        hop_s: hop between segment starts in seconds (default: `segment_s`, no overlap).
        min_s: shortest tail segment kept (zero-padded, masked) in seconds.
        max_segments_per_track: cap per track (None: all).
        samples_per_shard: most samples written per `.tar` shard.
        val_fraction: share of tracks held out into `val-*.tar` shards.
        seed: seeds the train/val split and the augmentation draws.
        trim_db: leading/trailing silence threshold in dB below the loudest frame (None: no trim).
        loudness_lufs: integrated loudness every track is normalised to (ITU-R BS.1770), LUFS.
        augment_copies: augmented copies per track beside the original (0: no augmentation).
        pitch_shift_semitones: largest |pitch shift| of a copy, whole semitones (0: off).
        time_stretch: largest relative tempo change of a copy, e.g. 0.1 for +-10 % (0: off).
        noise_snr_db: lowest signal-to-noise ratio of noise added to a copy, dB (None: off).
        target_shard_mb: close a shard before it would pass this size in MB (None: count only).
        encoder_actors: encoder actors (each holds one copy of the model); `--concurrency` overrides.
        encoder_gpus: GPUs per encoder actor (0: CPU actors; fractions share a GPU).
        encoder_cpus: CPUs per encoder actor.
        encode_batch_size: segments encoded per forward pass of the codec / VAE.
        encode_precision: the encoders' dtype on GPU (`bf16` where the codec allows it; CPU stays fp32).
        model_options: the family's `model.options` as training will set them (validated by the
            family), where they change what the shards hold, e.g. AudioLDM's `condition: audio`.
    """

    family: str = "musicgen-melody"
    base: str = "facebook/musicgen-melody"
    metadata: str
    output_url: str
    segment_s: float = Field(30.0, gt=0)
    hop_s: float | None = Field(None, gt=0)
    min_s: float = Field(1.0, ge=0)
    max_segments_per_track: int | None = Field(None, gt=0)
    samples_per_shard: int = Field(64, gt=0)
    val_fraction: float = Field(0.0, ge=0, lt=1)
    seed: int = 0
    trim_db: float | None = Field(40.0, gt=0)
    loudness_lufs: float = Field(-14.0, lt=0)
    augment_copies: int = Field(0, ge=0)
    pitch_shift_semitones: int = Field(0, ge=0, le=12)
    time_stretch: float = Field(0.0, ge=0, lt=0.5)
    noise_snr_db: float | None = None
    target_shard_mb: float | None = Field(None, gt=0)
    encoder_actors: int = Field(1, gt=0)
    encoder_gpus: float = Field(0.0, ge=0)
    encoder_cpus: float = Field(1.0, gt=0)
    encode_batch_size: int = Field(16, gt=0)
    encode_precision: Literal["fp32", "bf16"] = "fp32"
    model_options: dict[str, Any] = {}

    @field_validator("family")
    @classmethod
    def _known_family(cls, v: str) -> str:
        return ModelConfig._known_family(v)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what was expected."""


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> dict[str, Any]:
    """Turn `["adapter.r=16", "run.name=x"]` into `{"adapter.r": 16, "run.name": "x"}`.

    Values are parsed as YAML scalars (so `16` is an int, `true` a bool, `[a, b]` a list).

    Raises:
        ConfigError: an override without `=`.
    """
    out: dict[str, Any] = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. adapter.r=16")
        key, raw = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw)
    return out


def apply_overrides(tree: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of the nested dict `tree` with dotted-key values from `flat` set."""
    import copy

    tree = copy.deepcopy(tree)
    for key, value in flat.items():
        _set_dotted(tree, key, value)
    return tree


def load_config(path: str | Path, overrides: list[str] | None = None, schema: type[BaseModel] = TrainConfig):
    """Load a YAML config, apply `key=value` overrides, validate it.

    Args:
        path: YAML file (local path).
        overrides: dotted `key=value` strings applied after the file.
        schema: the pydantic model to validate against (default `TrainConfig`).

    Returns:
        An instance of `schema`.

    Raises:
        ConfigError: unreadable file, bad YAML, or a validation error; the message lists each
            offending dotted key and what was expected.
    """
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"config {path}: cannot read YAML ({exc})") from exc
    return validate_config(apply_overrides(tree, parse_overrides(overrides)), schema, source=str(path))


def validate_config(tree: dict[str, Any], schema: type[BaseModel] = TrainConfig, source: str = "config"):
    """Validate a nested dict against `schema`, turning pydantic errors into one `ConfigError`."""
    try:
        return schema.model_validate(tree)
    except ValidationError as exc:
        lines = [f"{source}: invalid configuration"]
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None


class SearchDim(_Strict):
    """One search dimension; exactly one field set.

    `choice`: a list of values; `uniform` / `loguniform`: [low, high]; `randint`: [low, high).
    """

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    def kind(self) -> str:
        set_ = [k for k in ("choice", "uniform", "loguniform", "randint") if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"a search dimension needs exactly one of choice/uniform/loguniform/randint, got {set_}")
        return set_[0]

    def probe_values(self) -> list[Any]:
        """Values that must all be valid for the dimension to be valid (choices, or both bounds)."""
        kind = self.kind()
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice: empty list")
            return list(self.choice)
        low, high = getattr(self, kind)
        if not low < high:
            raise ValueError(f"{kind}: low {low} must be < high {high}")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform: bounds must be > 0, got {low}")
        return [low, high - 1] if kind == "randint" else [low, high]


class ASHAConfig(_Strict):
    """ASHA early stopping of weak trials (Li et al. 2020), on `TuneConfig.metric`, in training steps.

    Attributes:
        grace_period: steps before a trial can be stopped (None: derived from the trial's
            `optim.max_steps`, `optim.warmup_steps` and the interval its metric is reported at,
            `run.eval_every` or `run.log_every`; see `musiclora.tune.search.asha_schedule`).
        max_t: steps at which ASHA stops every trial (None: one past `optim.max_steps`).
        reduction_factor: 1/reduction_factor of the trials at a rung go on to the next.
    """

    grace_period: int | None = Field(None, gt=0)
    max_t: int | None = Field(None, gt=0)
    reduction_factor: float = Field(2.0, gt=1)


class AudioObjective(_Strict):
    """The optional audio objective of a search: at the end of each trial that trained to the end,
    generate from the validation captions (conditioned on the validation audio's melody where the
    family takes one) and score KAD (Chung et al. 2025, `musiclora.eval.metrics.kad`) against
    the validation audio, in `musiclora.eval`'s embedding space `embedder`.

    Attributes:
        embedder: KAD embedder spec of `musiclora.eval.evaluate.build_embedders` ("mel-stats"
            needs no weights; "encodec" is the base model's own codec; "clap" needs a CLAP).
        clap: CLAP hub id or folder, required by the "clap" embedder (a random CLAP gives no real score).
        num_clips: validation samples used (captions generated from, and reference clips), >= 2.
        duration_s: seconds generated per caption (also the reference clip length).
        guidance_scale: classifier-free guidance for generation.
    """

    kind: Literal["kad"] = "kad"
    embedder: str = "mel-stats"
    clap: str | None = None
    num_clips: int = Field(8, ge=2)
    duration_s: float = Field(4.0, gt=0)
    guidance_scale: float = Field(3.0, ge=0)


class TuneConfig(_Strict):
    """A Ray Tune search over a training config (`ray_jobs/configs/tune_*.yaml`).

    Attributes:
        train_config: the TrainConfig YAML every trial starts from (relative to this file or absolute).
        train_overrides: dotted overrides applied to it before the search space.
        search_space: dotted TrainConfig key -> dimension (same keys as `key=value` overrides).
        metric / mode: what ASHA optimises, and the winner selection unless `select_by` says
            otherwise. It must be in every report of every trial (Tune's strict metric check):
            `val_loss` (default), the held-out validation loss, which the training loop measures at
            step 0 and every `run.eval_every` steps and carries forward in every report with the
            step it was measured at (`val_step`), so it needs `run.eval_every > 0` and shards with
            a `val` split; or `loss`, the last training step's loss (dropout on, so noisy and
            biased against `adapter.lora_dropout`).
        audio_objective: optional audio score computed at the end of each finished trial (see
            `AudioObjective`); reported as `kad`.
        select_by: what picks the winner: None (the `metric`, in `mode`) or `kad` (lowest KAD,
            needs `audio_objective`).
        num_samples: trials.
        max_concurrent: trials at once (None: as many as the cluster's CPUs/GPUs fit).
        seed: seed of the search algorithm; trials' data seeds stay as in the train config.
        storage_path: where Tune keeps its experiment (s3:// or file://); resume = same name + path.
        registry_url / registry_name: the winner is published there as a new version and promoted
            (registry_name None: the search's `name`).
        mlflow_tracking_uri: MLflow tracking URI (default a local sqlite store under `.musiclora/`).
        worker_start_attempts: tries each trial makes to start its worker group, each waiting
            `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` (Ray's default 60 s) for its CPUs/GPUs, before
            the trial is reported as errored (raise it on a cluster whose autoscaler adds nodes).
    """

    name: str = "musiclora-tune"
    train_config: str
    train_overrides: list[str] = []
    search_space: dict[str, SearchDim]
    metric: Literal["val_loss", "loss"] = "val_loss"
    mode: Literal["min", "max"] = "min"
    audio_objective: AudioObjective | None = None
    select_by: Literal["kad"] | None = None
    num_samples: int = Field(4, gt=0)
    max_concurrent: int | None = Field(None, gt=0)
    seed: int = 0
    asha: ASHAConfig | None = ASHAConfig()
    storage_path: str = "s3://musiclora/tune"
    registry_url: str | None = None
    registry_name: str | None = None
    mlflow_tracking_uri: str | None = None
    worker_start_attempts: int = Field(3, gt=0)

    @model_validator(mode="after")
    def _kad_needs_audio_objective(self) -> TuneConfig:
        if self.select_by == "kad" and self.audio_objective is None:
            raise ValueError("select_by: kad needs an audio_objective (e.g. audio_objective: {embedder: mel-stats})")
        return self
