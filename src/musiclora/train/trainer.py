"""The Ray Train driver: check the config, run a `TorchTrainer`, publish the adapter.

Everything that can be wrong with a run (unknown family or preset, target modules matching
nothing, missing shards or shards of another family, too few samples for the workers, a storage
path that cannot be written) is caught here on the driver, before any worker starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from musiclora.adapters import CARD, check_targets, upload_dir
from musiclora.config import TrainConfig
from musiclora.data.shards import MANIFEST, load_manifest
from musiclora.models.base import Loaded
from musiclora.models.families import get_family
from musiclora.storage import ensure_bucket, get_fs, join_url, open_url, pyarrow_fs
from musiclora.train.checkpoint import BEST, STATE
from musiclora.train.device import ds_accelerator
from musiclora.train.loop import train_loop_per_worker

WORKER_ENV = ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
"""What a local `ray.init` passes to the workers in `runtime_env`. No secrets: runtime_env env_vars are
shown by the Ray dashboard and kept in job metadata, so object-store keys and hub tokens come from the
nodes' own environment (the processes `ray start` launches inherit it; a KubeRay pod reads a Secret;
the demo and the test clusters start Ray with them), or from credential files."""


class PreflightError(ValueError):
    """The run cannot start; the message names the config key or URL at fault."""


def preflight(cfg: TrainConfig) -> dict[str, Any]:
    """Check a run before any worker starts.

    Returns:
        {"manifest": ..., "manifest_sha256": ..., "target_modules": [...]}.

    Raises:
        PreflightError: unknown family/preset, target modules that match nothing, missing shards,
            shards prepared for another family, fewer training samples than one batch per worker,
            an unwritable storage_path or adapters_url.
    """
    try:
        family = get_family(cfg.model.family)
        family.configure(cfg.model.options)
        skeleton = family.skeleton(cfg.model.base, cfg.model.revision)
        targets = check_targets(family.lora_root(skeleton), family, cfg.adapter)
    except ValueError as exc:
        raise PreflightError(f"model/adapter: {exc}") from None
    try:
        manifest = load_manifest(cfg.data.shards_url)
    except FileNotFoundError as exc:
        raise PreflightError(f"data.shards_url: {exc}") from None
    if manifest.get("family") != family.name:
        raise PreflightError(
            f"data.shards_url: shards at {cfg.data.shards_url} were prepared for family {manifest.get('family')!r}, "
            f"not {family.name!r}"
        )
    expected = family.feature_spec(Loaded(skeleton, None, cfg.model.base, family.name))
    for key, value in expected.items():
        if key != "fields" and manifest.get("feature_spec", {}).get(key) != value:
            raise PreflightError(
                f"data.shards_url: shards were prepared with {key}={manifest.get('feature_spec', {}).get(key)!r} but "
                f"model {cfg.model.base!r} expects {value!r}; re-run `musiclora prepare` with this base model"
            )
    try:
        family.check_shards(manifest.get("feature_spec", {}))
    except ValueError as exc:
        raise PreflightError(f"data.shards_url: {exc}") from None
    if cfg.run.eval_every and not manifest["num_samples"].get("val"):
        raise PreflightError("run.eval_every is set but the shards have no 'val' split (prepare with val_fraction > 0)")
    need = cfg.run.num_workers * cfg.data.batch_size
    if manifest["num_samples"]["train"] < need:
        raise PreflightError(
            f"data: {manifest['num_samples']['train']} training samples, fewer than one batch per worker "
            f"({cfg.run.num_workers} workers x batch_size {cfg.data.batch_size}); prepare more data or scale down"
        )
    for key, url in (("run.storage_path", cfg.run.storage_path), ("run.adapters_url", cfg.run.adapters_url)):
        _check_writable(key, url)
    with open_url(join_url(cfg.data.shards_url, MANIFEST), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"manifest": manifest, "manifest_sha256": digest, "target_modules": targets}


def _check_writable(key: str, url: str) -> None:
    probe = join_url(url, f".musiclora-write-probe-{uuid.uuid4().hex[:8]}")
    try:
        ensure_bucket(url)
        with open_url(probe, "wb") as f:
            f.write(b"ok")
        fs, path = get_fs(probe)
        fs.rm(path)
    except Exception as exc:  # noqa: BLE001 - any storage failure is the same answer for the user
        raise PreflightError(f"{key}: cannot write to {url} ({exc})") from None


def build_trainer(cfg: TrainConfig, callbacks: list | None = None, worker_start_attempts: int | None = None):
    """A `TorchTrainer` running `train_loop_per_worker` with the run's scaling and storage.

    Args:
        callbacks: Ray Train user callbacks (e.g. Tune's `TuneReportCallback` inside a trial).
        worker_start_attempts: tries to start the worker group, each waiting
            `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S` (Ray's default 60 s) for its placement group,
            before the run fails; None keeps Ray's default (retry forever, e.g. while an
            autoscaler adds nodes).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    fs, path = pyarrow_fs(cfg.run.storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=cfg.model_dump(),
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if cfg.run.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.run.name, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures, controller_failure_limit=(
                -1 if worker_start_attempts is None else worker_start_attempts - 1)),
            checkpoint_config=CheckpointConfig(num_to_keep=2),  # the last ones: resume + best/ inside
            callbacks=callbacks or [],
        ),
    )


def worker_env(use_gpu: bool) -> dict[str, str]:
    """Environment the workers need (object store endpoint, DeepSpeed's accelerator); never secrets.

    Args:
        use_gpu: the run's `run.use_gpu`; DS_ACCELERATOR is `cuda` for GPU runs and `cpu`
            otherwise, whatever the driver's own environment says.
    """
    env = {k: os.environ[k] for k in WORKER_ENV if k in os.environ}
    env["DS_ACCELERATOR"] = ds_accelerator(use_gpu)
    return env


def run_training(cfg: TrainConfig, callbacks: list | None = None,
                 worker_start_attempts: int | None = None) -> dict[str, Any]:
    """Preflight, train on the current Ray cluster, publish the adapter to `<adapters_url>/<name>/`.

    `callbacks` and `worker_start_attempts` go to `build_trainer`.

    Returns:
        summary: adapter URL, steps, first/last loss, the losses, trainable parameters.
    """
    import ray

    checks = preflight(cfg)
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": worker_env(cfg.run.use_gpu)})
    result = build_trainer(cfg, callbacks, worker_start_attempts).fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.run.name}: finished without a checkpoint ({result.error})")
    adapter_url = join_url(cfg.run.adapters_url, cfg.run.name)
    with result.checkpoint.as_directory() as ckpt:
        state = json.loads(Path(ckpt, STATE).read_text())
        card = build_card(cfg, checks, state)
        publish_adapter(ckpt, adapter_url, card)
    return {"adapter_url": adapter_url, **card["training"]}


def build_card(cfg: TrainConfig, checks: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """The adapter card: base model, family, LoRA settings, data manifest hash, training figures."""
    losses = state["losses"]
    best = state.get("best")
    k = max(1, min(5, len(losses) // 4))
    return {
        "format": "musiclora-adapter/1",
        "family": cfg.model.family,
        "base_model": cfg.model.base,
        "base_revision": cfg.model.revision,
        "base_licence_note": get_family(cfg.model.family).licence_note,
        "adapter": {**cfg.adapter.model_dump(), "target_modules": checks["target_modules"]},
        "data": {"shards_url": cfg.data.shards_url, "manifest_sha256": checks["manifest_sha256"],
                 "num_samples": checks["manifest"]["num_samples"]},
        "training": {
            "steps": state["step"], "samples": state["samples"], "losses": losses,
            "first_loss_mean": sum(losses[:k]) / k, "last_loss_mean": sum(losses[-k:]) / k,
            "deepspeed": cfg.deepspeed.model_dump(), "num_workers": cfg.run.num_workers,
            "val": state.get("val", []), "val_base": state.get("val_base"), "best": best, "stopped_early": state.get("stopped_early", False),
            "selected": "best-by-validation" if best else "last",
        },
    }


def publish_adapter(checkpoint_dir: str, url: str, card: dict[str, Any]) -> None:
    """Copy the peft files of a checkpoint to `url` (the best-by-validation tensors when the run
    validated), with card.json and a loss-curve PNG."""
    from musiclora.plots import plot_losses

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "adapter_config.json").write_bytes(Path(checkpoint_dir, "adapter_config.json").read_bytes())
        best = Path(checkpoint_dir, BEST, "adapter_model.safetensors")
        chosen = best if card["training"]["best"] and best.exists() else Path(checkpoint_dir, "adapter_model.safetensors")
        Path(tmp, "adapter_model.safetensors").write_bytes(chosen.read_bytes())
        Path(tmp, CARD).write_text(json.dumps(card, indent=2, sort_keys=True))
        plot_losses(card["training"]["losses"], str(Path(tmp, "loss.png")), title=f"LoRA training loss ({url})",
                    val=card["training"]["val"])
        upload_dir(tmp, url)
