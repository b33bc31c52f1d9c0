"""Ray Tune search over LoRA rank / alpha / dropout / lr / preset, the Ray 2.60 way.

Each trial is a Tune function that launches its own `TorchTrainer` (the deprecated
`Tuner(trainer)` pattern is not used) with `TuneReportCallback`, so every `ray.train.report`
of the workers reaches Tune and ASHA can stop weak trials. The search space uses the same dotted
keys as `key=value` overrides and is validated value by value before any trial starts. The objective
(`musiclora.tune.objective`) is the held-out validation loss by default: every trial validates at step 0
and every `run.eval_every` steps, every report carries the latest value, and ASHA's rungs fall on
validation steps; an optional audio objective (KAD of generated against validation audio, scored at
the end of each finished trial) can pick the winner instead. Curves go
to TensorBoard event files (Tune's TBX logger) and MLflow; the winner's adapter is published to
the adapter registry and promoted. Re-running the same name and storage path restores the
experiment (`Tuner.restore`) without re-running finished trials.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from musiclora.config import (
    ASHAConfig,
    AudioObjective,
    ConfigError,
    TrainConfig,
    TuneConfig,
    apply_overrides,
    parse_overrides,
    validate_config,
)
from musiclora.models.families import get_family
from musiclora.tune.objective import (
    check_objective,
    check_val_clips,
    pick_best,
    score_trial_audio,
    selection,
    trial_metrics,
)

# The trial function only drives its TorchTrainer (whose workers reserve the CPUs/GPUs): it asks for
# no CPU, so a trial fits where its workers fit, and a token of memory, since Tune refuses an empty
# request.
TRIAL_RESOURCES = {"CPU": 0, "memory": 64 * 2**20}

TRIAL_METRICS = ("step", "loss", "val_loss", "val_step", "last_val_loss", "val_base", "kad", "kad_embedder",
                 "adapter_url", "last_loss_mean")
"""The metrics of a trial's last report kept in its row of the search summary."""


def load_tune_config(path: str | Path, overrides: list[str] | None = None) -> tuple[TuneConfig, dict[str, Any]]:
    """Read a Tune YAML and its base TrainConfig YAML (+ overrides); validate both and the space.

    Returns:
        (TuneConfig, the base TrainConfig as a nested dict).

    Raises:
        ConfigError: an invalid file, key or search value; the message names the key.
    """
    path = Path(path)
    tree = yaml.safe_load(path.read_text()) or {}
    tune_cfg = validate_config(apply_overrides(tree, parse_overrides(overrides)), TuneConfig, source=str(path))
    train_path = Path(tune_cfg.train_config)
    if not train_path.is_absolute() and not train_path.exists():
        train_path = path.parent / train_path.name
    try:
        base = yaml.safe_load(train_path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: train_config {tune_cfg.train_config!r} cannot be read ({exc})") from None
    base = apply_overrides(base, parse_overrides(tune_cfg.train_overrides))
    validate_search_space(tune_cfg, base)
    check_objective(tune_cfg, validate_config(base, TrainConfig, source="train_config"))
    return tune_cfg, base


def validate_search_space(tune_cfg: TuneConfig, base: dict[str, Any]) -> None:
    """Every candidate value of every dimension must give a valid TrainConfig and a known preset.

    Raises:
        ConfigError: naming the search key and the offending value.
    """
    validate_config(base, TrainConfig, source="train_config")
    for key, dim in tune_cfg.search_space.items():
        try:
            values = dim.probe_values()
        except ValueError as exc:
            raise ConfigError(f"search_space.{key}: {exc}") from None
        for value in values:
            try:
                cfg = validate_config(apply_overrides(base, {key: value}), TrainConfig, source=f"search_space.{key}")
                get_family(cfg.model.family).target_modules(cfg.adapter.preset, cfg.adapter.target_modules)
            except (ConfigError, ValueError) as exc:
                raise ConfigError(f"search_space.{key}={value!r} is impossible: {exc}") from None


def param_space(tune_cfg: TuneConfig) -> dict[str, Any]:
    """Tune domains keyed by the dotted TrainConfig keys."""
    from ray import tune

    space = {}
    for key, dim in tune_cfg.search_space.items():
        kind = dim.kind()
        value = getattr(dim, kind)
        space[key] = tune.choice(value) if kind == "choice" else getattr(tune, kind)(*value)
    return space


def trial_config(base: dict[str, Any], params: dict[str, Any], trial_name: str) -> TrainConfig:
    """The TrainConfig of one trial: base + sampled values, its own run name."""
    tree = apply_overrides(base, {k: v for k, v in params.items() if "." in k})
    tree.setdefault("run", {})["name"] = trial_name
    return validate_config(tree, TrainConfig, source=trial_name)


def _trial(params: dict[str, Any], base: dict[str, Any], tune_name: str, worker_start_attempts: int,
           audio_objective: AudioObjective | None = None) -> None:
    """Tune function trainable: one TorchTrainer run, its reports forwarded to Tune, then the trial's
    final report (`objective.trial_metrics`, plus `kad` with an audio objective).

    A worker group that cannot get its resources fails the trial after `worker_start_attempts`
    tries (Ray Train's controller would otherwise retry forever); Tune reports it as errored.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from musiclora.train.trainer import run_training

    ctx = tune.get_context()
    cfg = trial_config(base, params, f"{tune_name}-{ctx.get_trial_id()}")
    summary = run_training(cfg, callbacks=[TuneReportCallback()], worker_start_attempts=worker_start_attempts)
    final = {"step": summary["steps"], "adapter_url": summary["adapter_url"], "done_training": 1,
             **trial_metrics(summary)}
    if audio_objective is not None:
        final.update(score_trial_audio(cfg, summary["adapter_url"], audio_objective))
    tune.report(final)


def trials_at_once(tune_cfg: TuneConfig, cfg: TrainConfig, resources: dict[str, float]) -> int:
    """How many trials may run at once: `max_concurrent`, else as many worker groups as fit.

    Args:
        cfg: the trials' TrainConfig (all trials share num_workers / cpus_per_worker / use_gpu).
        resources: the cluster's resources (`ray.cluster_resources()`), e.g. {"CPU": 2.0}.

    Returns:
        At least 1: on a cluster that cannot yet fit one trial (an autoscaler adds nodes on demand)
        one trial waits for its workers, `TuneConfig.worker_start_attempts` times.
    """
    if tune_cfg.max_concurrent:
        return tune_cfg.max_concurrent
    n = int(resources.get("CPU", 0) // (cfg.run.num_workers * cfg.run.cpus_per_worker))
    if cfg.run.use_gpu:
        n = min(n, int(resources.get("GPU", 0) // cfg.run.num_workers))
    return max(1, n)


def asha_schedule(asha: ASHAConfig, cfg: TrainConfig, metric: str) -> tuple[int, int]:
    """ASHA's (grace_period, max_t) in training steps, each derived from the trial unless set.

    The metric is reported every `interval` steps: `run.eval_every` for `val_loss`, else
    `run.log_every`. The grace period is the least multiple of `interval` that is at least the
    warm-up and `max_steps / reduction_factor**3` (three rungs below `max_steps`, as in the ASHA
    paper's examples, Li et al. 2020). `max_t` is `max_steps + 1`: ASHA terminates a trial that
    reaches `max_t`, and one step past the last lets finished trials publish their adapter.

    Returns:
        (grace_period, max_t), e.g. (6, 13) for max_steps 12, warmup 5, log_every 2, factor 2, and
        (750, 5001) for max_steps 5000, warmup 100, eval_every 250 on `val_loss`.
    """
    max_steps = cfg.optim.max_steps
    max_t = asha.max_t or max_steps + 1
    if asha.grace_period:
        return asha.grace_period, max_t
    interval = cfg.run.eval_every if metric == "val_loss" and cfg.run.eval_every else cfg.run.log_every
    floor = max(interval, cfg.optim.warmup_steps, math.ceil(max_steps / asha.reduction_factor ** 3))
    grace = math.ceil(floor / interval) * interval
    return min(grace, max_steps), max_t


def run_tune(tune_cfg: TuneConfig, base: dict[str, Any]) -> dict[str, Any]:
    """Run (or restore) the search on the current Ray cluster and publish the winner.

    Returns:
        {"best": trial config + metrics, "trials": [...], "registry": published ref or None}.
    """
    import ray
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from musiclora.storage import pyarrow_fs
    from musiclora.train.trainer import PreflightError, preflight, worker_env

    cfg = validate_config(base, TrainConfig)
    checks = preflight(cfg)  # shards (a val split for val_loss), targets, storage: once, before any trial
    try:
        check_val_clips(tune_cfg, checks["manifest"])
    except ValueError as exc:
        raise PreflightError(str(exc)) from None
    if not ray.is_initialized():
        ray.init(runtime_env={"env_vars": worker_env(bool(base.get("run", {}).get("use_gpu")))})
    fs, path = pyarrow_fs(tune_cfg.storage_path)
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base, tune_name=tune_cfg.name,
                                                         worker_start_attempts=tune_cfg.worker_start_attempts,
                                                         audio_objective=tune_cfg.audio_objective),
                                   TRIAL_RESOURCES)
    experiment = f"{path.rstrip('/')}/{tune_cfg.name}"
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        print(f"[musiclora] restoring Tune experiment {tune_cfg.storage_path}/{tune_cfg.name}", flush=True)
        tuner = tune.Tuner.restore(experiment, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        scheduler = None
        if tune_cfg.asha:
            grace_period, max_t = asha_schedule(tune_cfg.asha, cfg, tune_cfg.metric)
            scheduler = ASHAScheduler(time_attr="step", grace_period=grace_period, max_t=max_t,
                                      reduction_factor=tune_cfg.asha.reduction_factor)
        at_once = trials_at_once(tune_cfg, cfg, ray.cluster_resources())
        print(f"[musiclora] tune {tune_cfg.name}: {tune_cfg.num_samples} trials, at most {at_once} at once",
              flush=True)
        tuner = tune.Tuner(
            trainable, param_space=param_space(tune_cfg),
            tune_config=tune.TuneConfig(
                metric=tune_cfg.metric, mode=tune_cfg.mode, num_samples=tune_cfg.num_samples, scheduler=scheduler,
                # the limit goes on the generator: Tune ignores max_concurrent_trials with a SearchGenerator
                search_alg=BasicVariantGenerator(random_state=tune_cfg.seed, max_concurrent=at_once),
            ),
            run_config=tune.RunConfig(name=tune_cfg.name, storage_path=path, storage_filesystem=fs,
                                      callbacks=[CSVLoggerCallback(), JsonLoggerCallback(), TBXLoggerCallback(),
                                                 _mlflow_callback(tune_cfg)]),
        )
    grid = tuner.fit()
    trials = [_trial_row(r) for r in grid]
    for t in trials:
        if t["status"] == "errored":
            print(f"[musiclora] trial {t['trial_id']} errored: ...{t['error'][-600:]}", flush=True)
    metric, mode = selection(tune_cfg)
    best = pick_best(trials, metric, mode)
    if best is None:
        raise RuntimeError(f"tune {tune_cfg.name}: no trial finished with metric {metric!r} "
                           f"({sum(t['status'] == 'errored' for t in trials)} of {len(trials)} errored)")
    return {"best": best, "trials": trials, "metric": metric, "mode": mode,
            "registry": _publish_best(tune_cfg, best, metric)}


def _mlflow_callback(tune_cfg: TuneConfig):
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    uri = tune_cfg.mlflow_tracking_uri or f"sqlite:///{Path('.musiclora/mlflow.db').resolve()}"
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MLflowLoggerCallback(tracking_uri=uri, experiment_name=tune_cfg.name, save_artifact=False)


def _trial_row(result) -> dict[str, Any]:
    """One trial's config, metrics (its last report) and how it ended.

    `status` is "finished" (trained to the end, adapter published), "stopped" (ASHA cut it) or
    "errored" (it raised, e.g. its workers never started; `error` says why).
    """
    metrics = dict(result.metrics or {})
    row = {k: v for k, v in (result.config or {}).items() if "." in k}
    row.update({k: metrics.get(k) for k in TRIAL_METRICS})
    if result.error is not None:
        text = f"{type(result.error).__name__}: {result.error}"  # Ray's cause comes last, after tracebacks
        row["status"], row["error"] = "errored", text if len(text) <= 2000 else f"{text[:400]} ... {text[-1600:]}"
    else:
        row["status"] = "finished" if metrics.get("done_training") and metrics.get("adapter_url") else "stopped"
    row["stopped_early"] = row["status"] == "stopped"
    row["trial_id"] = metrics.get("trial_id") or _trial_id(result)
    if row.get("loss") is None and row.get("last_loss_mean") is not None:
        row["loss"] = row["last_loss_mean"]
    return row


def _trial_id(result) -> str | None:
    """The trial id from the trial's folder name (`_trial_<experiment>_<index>_<tag>`, as Tune
    names it): an errored trial that never reported has no `trial_id` metric."""
    match = re.match(r"_trial_([0-9a-z]+_\d{5})_", Path(str(getattr(result, "path", "") or "")).name)
    return match.group(1) if match else None


def _publish_best(tune_cfg: TuneConfig, best: dict[str, Any], metric: str) -> str:
    """Publish the winner's adapter as a new promoted version of `registry_name` (or the search's name)."""
    from musiclora.adapter_registry import Registry

    registry = Registry(tune_cfg.registry_url or os.environ.get("MUSICLORA_REGISTRY_URL"))
    card = {"tune": {"experiment": tune_cfg.name, "trial_id": best.get("trial_id"),
                     "trial_config": {k: v for k, v in best.items() if "." in k},
                     "metric": metric, "value": best[metric],
                     **{k: best[k] for k in ("val_loss", "kad", "kad_embedder") if best.get(k) is not None}}}
    version = registry.publish(best["adapter_url"], tune_cfg.registry_name or tune_cfg.name, promote=True,
                               card_updates=card)
    return version.ref
