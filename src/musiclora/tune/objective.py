"""The search's objectives: the held-out validation loss (every report) and, optionally, KAD of
generated audio against the validation audio (end of each trial).

The validation loss comes from the training loop (`musiclora.train.loop.latest_val`): measured at
step 0 and every `run.eval_every` steps, carried in every report. This module holds what the
search adds on top: the checks that a search can report its metric at all (before any trial
starts), the value a finished trial is judged by, and the audio objective, which reuses
`musiclora.eval` (its prompts, generation through the family's `generate`, embedders and KAD).
"""

from __future__ import annotations

import math
from typing import Any

from musiclora.config import AudioObjective, ConfigError, TrainConfig, TuneConfig


def check_objective(tune_cfg: TuneConfig, cfg: TrainConfig) -> None:
    """Refuse a search whose metric cannot be in every report of every trial (config only, no I/O).

    Shards without a `val` split are refused by `musiclora.train.trainer.preflight` (and the
    dry-run), since `run.eval_every > 0` needs one.

    Args:
        tune_cfg: the search.
        cfg: the trials' base TrainConfig (after `train_overrides`).

    Raises:
        ConfigError: an unknown audio-objective embedder, or `clap` without a checkpoint; metric `val_loss` with `run.eval_every`
            0; an explicit `asha.grace_period`
            that is not a multiple of `run.eval_every` (ASHA's rungs are grace_period x
            reduction_factor^k: a rung off a validation step would judge a value measured earlier).
    """
    if tune_cfg.audio_objective is not None:
        check_embedder(tune_cfg.audio_objective.embedder)
        if tune_cfg.audio_objective.embedder == "clap" and not tune_cfg.audio_objective.clap:
            raise ConfigError("audio_objective.embedder clap needs audio_objective.clap: a CLAP checkpoint (hub id "
                              "or folder, e.g. laion/larger_clap_music); a random CLAP gives no real score")
    if tune_cfg.metric != "val_loss":
        return
    every = cfg.run.eval_every
    if not every:
        raise ConfigError("metric val_loss needs validation: set run.eval_every > 0 in the train config (or "
                          "train_overrides) and prepare the shards with val_fraction > 0; or use metric: loss")
    grace = tune_cfg.asha.grace_period if tune_cfg.asha else None
    if grace and grace % every:
        raise ConfigError(f"asha.grace_period {grace} is not a multiple of run.eval_every {every}: with metric "
                          "val_loss every ASHA rung must fall on a validation step (or leave it unset to derive it)")


def check_embedder(spec: str) -> None:
    """Refuse an embedder spec `musiclora.eval.evaluate.build_embedders` would not resolve (no weights loaded).

    Raises:
        ConfigError: naming `audio_objective.embedder` and the known specs.
    """
    from musiclora.eval.embeddings import EMBEDDERS

    if spec not in ("clap", "encodec", *EMBEDDERS) and not spec.startswith("encodec:"):
        raise ConfigError(f"audio_objective.embedder {spec!r}: expected one of clap, encodec, encodec:<hub id or "
                          f"folder>, {', '.join(sorted(EMBEDDERS))}")


def check_val_clips(tune_cfg: TuneConfig, manifest: dict[str, Any]) -> None:
    """The audio objective needs at least 2 validation samples (KAD compares sets); checked on the driver.

    Raises:
        ValueError: fewer than 2 samples in the shards' `val` split.
    """
    n = manifest.get("num_samples", {}).get("val", 0)
    if tune_cfg.audio_objective is not None and n < 2:
        raise ValueError(f"audio_objective: the shards' 'val' split has {n} sample(s); KAD needs at least 2 "
                         "(prepare with a larger val_fraction)")


def trial_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """What a trial that trained to the end is judged by, from `run_training`'s summary.

    `val_loss` is the best validation loss of the run (the published adapter is the
    best-by-validation one), else the latest (step 0's when no later pass ran); `last_val_loss`
    is the latest pass's.

    Returns:
        {"loss", "last_loss_mean", "val_base"} and, when the run validated, {"val_loss",
        "val_step", "last_val_loss"}.
    """
    out = {"loss": summary["losses"][-1], "last_loss_mean": summary["last_loss_mean"],
           "val_base": summary.get("val_base")}
    vals = summary.get("val") or ([[0, summary["val_base"]]] if summary.get("val_base") is not None else [])
    if vals:
        best = summary.get("best")
        out.update(val_loss=best["val_loss"] if best else vals[-1][1], val_step=best["step"] if best else vals[-1][0],
                   last_val_loss=vals[-1][1])
    return out


def selection(tune_cfg: TuneConfig) -> tuple[str, str]:
    """(metric, mode) that picks the winner: `select_by` (KAD: lower is better) or Tune's metric."""
    return ("kad", "min") if tune_cfg.select_by == "kad" else (tune_cfg.metric, tune_cfg.mode)


def pick_best(trials: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The finished trial with the best finite `metric` (None when there is none)."""
    ok = [t for t in trials if t.get("status") == "finished" and isinstance(t.get(metric), (int, float))
          and math.isfinite(t[metric])]
    if not ok:
        return None
    return (min if mode == "min" else max)(ok, key=lambda t: t[metric])


def prompts_from_reference(reference, with_melody: bool) -> list:
    """One prompt per reference clip: its caption, seed = its index, and (where the family follows
    a melody, `ModelFamily.takes_melody`) the clip itself as the melody.

    Args:
        reference: a `musiclora.eval.inputs.ReferenceSet` read from shards (it has captions).
        with_melody: pass each clip as `melody` (float32 [L] at `reference.sample_rate`).

    Returns:
        list of `musiclora.eval.inputs.PromptSpec`.

    Raises:
        ValueError: the reference has no captions (read from audio files, not shards).
    """
    from musiclora.eval.inputs import PromptSpec

    if len(reference.captions) != len(reference.wavs):
        raise ValueError(f"reference {reference.origin}: no captions (the audio objective reads shards)")
    return [PromptSpec(id=f"val{i:03d}", text=caption or "music", seed=i,
                       melody=wav if with_melody else None,
                       melody_sample_rate=reference.sample_rate if with_melody else None,
                       melody_source=label if with_melody else None)
            for i, (caption, wav, label) in enumerate(zip(reference.captions, reference.wavs, reference.labels))]


def audio_score(adapter_url: str, shards_url: str, objective: AudioObjective) -> dict[str, Any]:
    """KAD of clips generated by the adapter from the validation captions, against the validation audio.

    Runs where it is called: `score_trial_audio` runs it in a Ray task holding one GPU when the
    trial trained on GPUs (its workers are gone by then), else in the trial's process on the CPU.
    Generation and scoring are `musiclora.eval`'s
    (`Evaluator.generate`: the family's `generate` per prompt, same seeds; embeddings and KAD of
    `scoring.distribution_scores`).

    Args:
        adapter_url: the trial's published adapter (its card names family and base).
        shards_url: the trial's shards; their `val` split gives captions, melodies and reference.
        objective: embedder, clip count and length, guidance.

    Returns:
        {"kad": KAD x100 (kadtk units), "kad_embedder": the embedder spec, "kad_clips": clips scored}.

    Raises:
        ValueError: fewer than 2 usable validation clips, an unknown embedder (named).
    """
    from musiclora.adapters import load_for_inference
    from musiclora.eval.evaluate import (
        EvalSettings,
        build_evaluator,
        codec_of,
        codes_decoder,
        model_placement,
    )
    from musiclora.eval.inputs import load_reference

    settings = EvalSettings(clap=objective.clap, embedders=(objective.embedder,),
                            duration_s=objective.duration_s, guidance_scale=objective.guidance_scale,
                            max_reference_clips=objective.num_clips, reference_split="val", music=False)
    device, dtype = model_placement(settings)  # the GPU of `score_trial_audio`'s task, else the CPU
    family, loaded = load_for_inference(adapter_url, dtype=dtype, device=device)
    codec = codec_of(loaded)
    reference = load_reference(shards_url, family.sample_rate, objective.duration_s, objective.num_clips, "val",
                               decode_codes=codes_decoder(codec) if codec is not None else None)
    prompts = prompts_from_reference(reference, family.takes_melody)
    evaluator = build_evaluator(family, loaded, prompts, reference, settings)
    metrics = evaluator(loaded.model, loaded.tokenizer)
    return {"kad": float(metrics["kad"]), "kad_embedder": objective.embedder, "kad_clips": len(prompts)}


def score_trial_audio(cfg: TrainConfig, adapter_url: str, objective: AudioObjective) -> dict[str, Any]:
    """`audio_score` for a trial that trained to the end, on the device the trial trained on.

    With `run.use_gpu` it runs as a Ray task that reserves one GPU and `run.cpus_per_worker` CPUs
    (the trial function itself reserves none: `search.TRIAL_RESOURCES`), so a real-size model
    generates on a GPU in bf16; otherwise it runs in the calling process on the CPU.

    Returns / Raises:
        as `audio_score`.
    """
    if not cfg.run.use_gpu:
        return audio_score(adapter_url, cfg.data.shards_url, objective)
    import ray

    task = ray.remote(audio_score).options(**audio_task_resources(cfg))
    return ray.get(task.remote(adapter_url, cfg.data.shards_url, objective))


def audio_task_resources(cfg: TrainConfig) -> dict[str, float]:
    """Ray resources of the GPU audio-scoring task: one GPU and one worker's CPUs."""
    return {"num_gpus": 1, "num_cpus": cfg.run.cpus_per_worker}
