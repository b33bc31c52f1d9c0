"""`--dry-run`: every check of a prepare / train / tune config that needs no weights and starts
no worker.

Model structure comes from a skeleton on the `meta` device, built from the config files musiclora
ships for the public bases (`musiclora.models.configs`), else from the base's own config (a local
folder or `tiny`), so a real-size dry-run never downloads or allocates 1.5 B weights. When the
shards of a training config do not exist yet, the config is checked against the prepare config
that would make them (`data.prepare_config`), and the report says so.

Each function returns a report `{"ok", "checks", "problems", "notes", ...}`: `checks` passed,
`problems` would make the run fail (the CLI exits non-zero), `notes` are worth knowing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from musiclora.config import ConfigError, PrepareConfig, TrainConfig, TuneConfig, load_config, validate_config
from musiclora.models.base import Loaded
from musiclora.models.configs import config_dir
from musiclora.models.families import get_family
from musiclora.train.deepspeed import build_ds_config, model_dtype
from musiclora.train.device import ds_accelerator


class Report:
    """What a dry-run found; `as_dict()` is the JSON the CLI prints."""

    def __init__(self, kind: str, source: str):
        self.data: dict[str, Any] = {"kind": kind, "config": source, "checks": [], "problems": [], "notes": []}

    def check(self, ok: bool, good: str, bad: str) -> bool:
        (self.data["checks"] if ok else self.data["problems"]).append(good if ok else bad)
        return ok

    def note(self, text: str) -> None:
        self.data["notes"].append(text)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": not self.data["problems"], **self.data}


def skeleton_for(family, base: str, revision: str | None = None):
    """The base's module tree on the meta device: from the shipped config of a public base, else
    from `base` itself (tiny or a local folder); returns (module, where the config came from)."""
    shipped = config_dir(base)
    if shipped:
        return family.skeleton(shipped), f"shipped config {Path(shipped).name}"
    return family.skeleton(base, revision), f"config of {base}"


def _model_checks(report: Report, family, base: str, revision: str | None) -> Any:
    try:
        skeleton, origin = skeleton_for(family, base, revision)
    except ValueError as exc:
        report.check(False, "", f"model.base: {exc}")
        return None
    n = sum(p.numel() for p in skeleton.parameters())
    report.check(True, f"model skeleton of {base} from {origin}: {n / 1e6:.1f} M parameters, no weights loaded", "")
    report.data["model_params"] = n
    return skeleton


def _resolve(path: str, relative_to: str | None) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists() or relative_to is None:
        return p
    return Path(relative_to).parent / p


def _manifest(url: str, offline: bool, report: Report) -> dict[str, Any] | None:
    if offline:
        report.note(f"offline: {url} was not read")
        return None
    from musiclora.data.shards import load_manifest

    try:
        return load_manifest(url)
    except FileNotFoundError:
        report.note(f"no shards at {url} yet")
    except Exception as exc:  # noqa: BLE001 - unreachable store: say so, the other checks go on
        report.note(f"shards at {url} could not be read ({type(exc).__name__}: {exc})")
    return None


def dry_run_train(cfg: TrainConfig, source: str | None = None, offline: bool = False) -> dict[str, Any]:
    """Check a training config without weights or workers.

    Args:
        cfg: the validated config.
        source: the YAML it came from (`data.prepare_config` is relative to it).
        offline: do not touch object storage (no manifest read, no write probe).

    Returns:
        the report dict (see the module docstring); `feature_spec`, `resources`, `model_params`.
    """
    from musiclora.adapters import check_targets

    report = Report("train", source or "config")
    family = get_family(cfg.model.family)
    try:
        family.configure(cfg.model.options)
    except ValueError as exc:
        report.check(False, "", str(exc))
    skeleton = _model_checks(report, family, cfg.model.base, cfg.model.revision)
    expected = None
    if skeleton is not None:
        try:
            targets = check_targets(family.lora_root(skeleton), family, cfg.adapter)
            report.check(True, f"adapter targets {targets} match modules of the base", "")
        except ValueError as exc:
            report.check(False, "", f"adapter: {exc}")
        expected = {k: v for k, v in family.feature_spec(Loaded(skeleton, None, cfg.model.base, family.name)).items()
                    if k != "fields"}
        report.data["feature_spec"] = expected
    _runtime_checks(report, cfg)
    manifest = _manifest(cfg.data.shards_url, offline, report)
    if manifest is not None:
        _check_manifest(report, cfg, manifest, expected)
    elif cfg.data.prepare_config:
        _check_pairing(report, cfg, source, expected, offline)
    else:
        report.check(False, "", f"data.shards_url {cfg.data.shards_url} could not be checked and data.prepare_config "
                                "is unset: name the prepare config that makes these shards")
    if not offline:
        from musiclora.train.trainer import PreflightError, _check_writable

        for key, url in (("run.storage_path", cfg.run.storage_path), ("run.adapters_url", cfg.run.adapters_url)):
            try:
                _check_writable(key, url)
                report.check(True, f"{key} {url} is writable", "")
            except PreflightError as exc:
                report.check(False, "", str(exc))
    return report.as_dict()


def _runtime_checks(report: Report, cfg: TrainConfig) -> None:
    """Accelerator vs use_gpu, precision, offload vs optimizer, worker resources."""
    accel = ds_accelerator(cfg.run.use_gpu)
    report.check(True, f"workers get DS_ACCELERATOR={accel} and the {'nccl' if cfg.run.use_gpu else 'gloo'} "
                       f"backend (run.use_gpu={cfg.run.use_gpu})", "")
    driver = os.environ.get("DS_ACCELERATOR")
    if driver and driver != accel:
        report.note(f"this shell has DS_ACCELERATOR={driver}; the workers get {accel} from run.use_gpu")
    if cfg.run.use_gpu and cfg.deepspeed.precision != "bf16":
        report.note("run.use_gpu with deepspeed.precision fp32: bf16 halves memory and is the GPU default")
    ds = build_ds_config(cfg)
    if cfg.deepspeed.offload_optimizer:
        report.check(ds.get("zero_force_ds_cpu_optimizer") is False,
                     "offload_optimizer: the client AdamW steps on the CPU (zero_force_ds_cpu_optimizer false)",
                     "offload_optimizer without zero_force_ds_cpu_optimizer false: DeepSpeed would refuse AdamW")
    report.data["deepspeed"] = ds
    report.data["dtype"] = str(model_dtype(cfg)).removeprefix("torch.")
    res = {"CPU": cfg.run.num_workers * cfg.run.cpus_per_worker, "GPU": cfg.run.num_workers if cfg.run.use_gpu else 0}
    report.data["resources"] = {"workers": cfg.run.num_workers, **res}
    _check_cluster(report, res)


def _check_cluster(report: Report, need: dict[str, float]) -> None:
    """Compare with the connected Ray cluster, if this process is connected to one."""
    try:
        import ray
    except ImportError:
        return
    if not ray.is_initialized():
        report.note(f"not connected to Ray: the run needs {need['CPU']:g} CPUs and {need['GPU']:g} GPUs in all")
        return
    have = ray.cluster_resources()
    for key in ("CPU", "GPU"):
        report.check(have.get(key, 0) >= need[key], f"cluster has {have.get(key, 0):g} {key} (needs {need[key]:g})",
                     f"cluster has {have.get(key, 0):g} {key} but the run needs {need[key]:g} (autoscaling may add them)")


def _check_manifest(report: Report, cfg: TrainConfig, manifest: dict, expected: dict | None) -> None:
    report.check(True, f"shards found at {cfg.data.shards_url}: {manifest.get('num_samples')}", "")
    report.check(manifest.get("family") == cfg.model.family, f"shards were prepared for {cfg.model.family}",
                 f"data.shards_url: shards were prepared for {manifest.get('family')!r}, not {cfg.model.family!r}")
    for key, value in (expected or {}).items():
        got = manifest.get("feature_spec", {}).get(key)
        report.check(got == value, f"shards' {key} = {value!r}",
                     f"data.shards_url: shards have {key}={got!r}, model {cfg.model.base!r} expects {value!r}")
    n = manifest.get("num_samples", {})
    if cfg.run.eval_every:
        report.check(bool(n.get("val")), f"{n.get('val')} validation samples for eval_every {cfg.run.eval_every}",
                     "run.eval_every is set but the shards have no 'val' split (prepare with val_fraction > 0)")
    need = cfg.run.num_workers * cfg.data.batch_size
    report.check(n.get("train", 0) >= need, f"{n.get('train')} training samples >= one batch per worker ({need})",
                 f"data: {n.get('train', 0)} training samples, fewer than one batch per worker ({need})")


def _check_pairing(report: Report, cfg: TrainConfig, source: str | None, expected: dict | None, offline: bool) -> None:
    """The shards do not exist yet: check the train config against the prepare config that makes them."""
    path = _resolve(cfg.data.prepare_config, source)
    try:
        prep = load_config(path, [], PrepareConfig)
    except ConfigError as exc:
        report.check(False, "", f"data.prepare_config: {exc}")
        return
    report.note(f"shards not read: checked against the prepare config {path} that makes them")
    report.check(prep.output_url.rstrip("/") == cfg.data.shards_url.rstrip("/"),
                 f"{path.name} writes data.shards_url {cfg.data.shards_url}",
                 f"data.prepare_config {path.name} writes {prep.output_url}, not data.shards_url {cfg.data.shards_url}")
    report.check(prep.family == cfg.model.family and prep.base == cfg.model.base,
                 f"{path.name} encodes with the same base {prep.base}",
                 f"data.prepare_config {path.name} encodes with {prep.family} {prep.base!r}, "
                 f"not the trained {cfg.model.family} {cfg.model.base!r}")
    if cfg.run.eval_every:
        report.check(prep.val_fraction > 0, f"{path.name} holds out val_fraction {prep.val_fraction} for eval_every",
                     f"run.eval_every is set but {path.name} has val_fraction 0: the shards would have no 'val' split")
    prep_report = dry_run_prepare(prep, str(path), offline=True)
    for problem in prep_report["problems"]:
        report.check(False, "", f"{path.name}: {problem}")
    if expected and prep_report.get("feature_spec") and prep_report["feature_spec"] != expected:
        report.check(False, "", f"{path.name} would write feature_spec {prep_report['feature_spec']}, "
                                f"the model expects {expected}")


def dry_run_prepare(cfg: PrepareConfig, source: str | None = None, offline: bool = False) -> dict[str, Any]:
    """Check a prepare config without loading encoders: base skeleton, the feature spec it would
    write, segment length, val split, encoder resources, and (online) the metadata and output URLs.
    """
    report = Report("prepare", source or "config")
    family = get_family(cfg.family)
    skeleton = _model_checks(report, family, cfg.base, None)
    if skeleton is not None:
        spec = {k: v for k, v in family.feature_spec(Loaded(skeleton, None, cfg.base, family.name)).items()
                if k != "fields"}
        report.data["feature_spec"] = spec
        frames = cfg.segment_s * spec["frame_rate"]
        report.check(True, f"segment_s {cfg.segment_s} = {frames:g} frames at {spec['frame_rate']:g} Hz", "")
    trained = getattr(family, "default_segment_s", None)
    if trained and cfg.segment_s != trained:
        report.note(f"segment_s {cfg.segment_s}: {family.name} was trained on {trained} s clips")
    if cfg.val_fraction == 0:
        report.note("val_fraction 0: no 'val' split, so training configs must keep run.eval_every 0")
    actor = {"CPU": cfg.encoder_cpus, "GPU": cfg.encoder_gpus}
    need = {k: v * cfg.encoder_actors for k, v in actor.items()}
    report.data["resources"] = {"encoder_actors": cfg.encoder_actors, "encoder_actor": actor, **need,
                                "encode_batch_size": cfg.encode_batch_size,
                                "encode_precision": cfg.encode_precision if cfg.encoder_gpus else "fp32"}
    if cfg.encode_precision == "bf16" and not cfg.encoder_gpus:
        report.note("encode_precision bf16 applies on GPU actors only; CPU actors encode in fp32")
    _check_cluster(report, need)
    if not offline:
        from musiclora.storage import get_fs

        fs, path = get_fs(cfg.metadata)
        report.check(fs.exists(path), f"metadata {cfg.metadata} exists", f"metadata: {cfg.metadata} does not exist")
    return report.as_dict()


def dry_run_tune(tune_cfg: TuneConfig, base: dict[str, Any], source: str | None = None,
                 offline: bool = False) -> dict[str, Any]:
    """Check a Tune config: the base training config (as `dry_run_train`), every search value
    (already validated by `load_tune_config`), adapter targets of every preset in the space, and
    the resources of concurrent trials."""
    from musiclora.adapters import check_targets
    from musiclora.config import apply_overrides

    cfg = validate_config(base, TrainConfig, source="train_config")
    train_source = str(_resolve(tune_cfg.train_config, source))
    out = dry_run_train(cfg, train_source, offline=offline)
    out.update(kind="tune", config=source or "config", train_config=train_source)
    family = get_family(cfg.model.family)
    skeleton = skeleton_for(family, cfg.model.base, cfg.model.revision)[0] if out.get("model_params") else None
    for key, dim in tune_cfg.search_space.items():
        if skeleton is None or not key.startswith("adapter."):
            continue
        for value in dim.probe_values():
            trial = validate_config(apply_overrides(base, {key: value}), TrainConfig)
            try:
                check_targets(family.lora_root(skeleton), family, trial.adapter)
            except ValueError as exc:
                out["problems"].append(f"search_space.{key}={value!r}: {exc}")
    per_trial = out["resources"]
    trials = tune_cfg.max_concurrent or tune_cfg.num_samples
    out["resources"] = {"per_trial": per_trial, "concurrent_trials": trials,
                        "CPU": per_trial["CPU"] * trials, "GPU": per_trial["GPU"] * trials}
    out["checks"].append(f"{len(tune_cfg.search_space)} search dimensions, every probe value a valid config")
    out["ok"] = not out["problems"]
    return out


def emit(report: dict[str, Any]) -> int:
    """Print the report as JSON on stdout; returns the exit code (0 ok, 1 problems found)."""
    import json

    print(json.dumps(report, indent=2, default=str), flush=True)
    return 0 if report["ok"] else 1
