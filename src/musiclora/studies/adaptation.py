"""The small-scale adaptation study: a tiny base learns one style, then LoRA and full fine-tuning adapt it.

The analogue, on a 2-core CPU machine, of the seed studies' base-vs-LoRA tables:

1. Real music: the bundled corpus (`musiclora.data.corpus`); the base style is one Debian
   package (wesnoth: orchestral), the target style another (singularity: electronic). Tracks
   are split by track, never by segment: every Nth track of each package is held out.
2. Codec: no pretrained EnCodec can be downloaded here, and the tiny preset's random encoder
   gives codes with no temporal structure (white from frame to frame), so no language model can
   learn music from them. The study's tokenizer is `musiclora.studies.tiny_codec.fit_mel_codec`:
   log-mel principal components at the codec's 50 Hz frame rate, quantised by the tiny EnCodec's
   residual quantiser (k-means codebooks), decoded by its decoder fitted to the audio. It is
   fitted once, on the training tracks of both styles (a pretrained codec has heard all kinds
   of music; the held-out tracks are never used), and shared by all seeds.
3. Base: the tiny MusicGen-Melody language model (text encoder, projections, decoder; codec frozen),
   built with the seed (`study_model`: its vocabulary is the codec's 64 codes, its chroma prefix
   30 frames), trained on the base style with `family.loss` in a plain torch loop. The table sets
   its held-out loss beside count models of the same codes (`musiclora.studies.ngram`): below the
   previous-frame model, it has learned the order of its style's codes, not only their frequencies.
4. Adaptation to the target style's training tracks, from the same base: peft LoRA (preset
   `attn+ffn+heads` by default: attention, FFN and the per-codebook output heads), and full
   fine-tuning of every LM parameter, the reference LoRA is measured against.
5. Figures, per seed: held-out cross-entropy on both styles (random init, base, LoRA, full
   fine-tuning), the share of the base-to-full gap on the target style that LoRA closes, and KAD
   (`musiclora.eval.metrics.kad`) between audio generated from held-out target prompts (their
   captions, their audio as the melody) and those held-out segments, on `mel-stats` embeddings
   (log-mel statistics: no model, nothing random). Each figure is given over the seeds.

Everything runs in-process on CPU; no Ray, no object store. The numbers are whatever they are:
the table says whether the targets (LoRA closes >= 50 % of the gap; LoRA lowers KAD) are met.
"""

from __future__ import annotations

import copy
import io
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from musiclora.adapters import apply_lora, trainable_report
from musiclora.audio import AudioDecodeError, is_silent, load_audio, preprocess, segment
from musiclora.config import AdapterConfig
from musiclora.models.base import GenerationRequest, Segment
from musiclora.models.families import get_family
from musiclora.train.schedule import lr_at


@dataclass
class AdaptationSettings:
    """What the study does; the defaults made the table in `bench/results/adaptation/`.

    Attributes:
        cache_dir: corpus cache (packages unpacked under `<cache_dir>/packages/`).
        base_package / target_package: Debian music packages for the base and the held-out style.
        base_tracks / target_tracks: tracks used per package (first by path; None: all).
        heldout_every: every Nth track of a package (index % N == N - 1) is held out.
        segment_s: training segment length in seconds.
        segments_per_track: segments taken per track, evenly spaced over its first `max_track_s`.
        max_track_s: seconds decoded per track.
        codec_entries / codec_steps: k-means centroids per quantiser level (also the codebook size of
            the study's tiny MusicGen, so its LM's vocabulary); decoder fitting steps.
        chroma_length: chroma frames the study's LM takes (`build_tiny_musicgen_melody`); 30 cover
            3.7 s at the feature extractor's 4096-sample hop, so segments and generated clips fit.
        base_steps / base_lr: training of the base LM on the base style.
        full_steps / full_lr: full fine-tuning of the base on the target style.
        lora_steps / lora_lr / preset / r / lora_alpha / lora_dropout: the LoRA stage.
        batch_size: segments per step (every stage).
        schedule: learning-rate schedule after the linear warm-up, every stage: "constant" or "cosine".
        curve_points: held-out evaluations per training stage (the loss-curve plot).
        eval_prompts / eval_duration_s: generation prompts (held-out target segments), seconds
            generated per prompt.
        guidance_scales: classifier-free guidance of the generated clips, one KAD figure each. The
            first is the one the KAD target is judged on: 1.0 is plain conditional sampling, the
            distribution the held-out loss scores; 3.0 is MusicGen's sampling default, reported too.
        embedder: the KAD embedder (a name of `musiclora.eval.embeddings.EMBEDDERS`).
        seeds: one run per seed (LM init, batch order, LoRA init, condition dropout, sampling);
            the codec is fitted once with the first.
    """

    cache_dir: str = ".musiclora/cache/corpus"
    base_package: str = "wesnoth-1.16-music"
    target_package: str = "singularity-music"
    base_tracks: int | None = None
    target_tracks: int | None = None
    heldout_every: int = 4
    segment_s: float = 3.0
    segments_per_track: int = 20
    max_track_s: float = 120.0
    codec_entries: int = 64
    codec_steps: int = 120
    chroma_length: int = 30
    base_steps: int = 1200
    base_lr: float = 5e-3
    full_steps: int = 200
    full_lr: float = 1e-3
    lora_steps: int = 200
    lora_lr: float = 2e-3
    preset: str = "attn+ffn+heads"
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    batch_size: int = 8
    schedule: str = "constant"
    curve_points: int = 6
    eval_prompts: int = 40
    eval_duration_s: float = 3.0
    guidance_scales: tuple[float, ...] = (1.0, 3.0)
    embedder: str = "mel-stats"
    seeds: tuple[int, ...] = (0, 1, 2)


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


def encode(
    family, loaded, segments: list[Segment], batch: int = 8, codes: torch.Tensor | None = None
) -> list[dict[str, Any]]:
    """Family features of segments as decoded shard samples (what `family.collate` takes).

    Args:
        codes: int64 [N, K, T] codes of the N segments that replace the family's own `codes.npy`
            (the study's tokenizer, `musiclora.studies.tiny_codec.mel_codes`); None keeps them.

    Raises:
        ValueError: `codes` does not match the segments' count or the family's code shape.
    """
    samples = []
    for i in range(0, len(segments), batch):
        for raw in family.encode_segments(loaded, segments[i : i + batch]):
            samples.append({k: np.load(io.BytesIO(v)) if k.endswith(".npy") else v for k, v in raw.items()})
    if codes is not None:
        if len(codes) != len(samples) or tuple(codes.shape[1:]) != samples[0]["codes.npy"].shape:
            raise ValueError(
                f"codes: expected [{len(samples)}, {', '.join(map(str, samples[0]['codes.npy'].shape))}], "
                f"got {list(codes.shape)}"
            )
        for sample, c in zip(samples, codes):
            sample["codes.npy"] = c.numpy().astype(np.int16)
    return samples


def train(
    model,
    family,
    loaded,
    samples,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    probe=None,
    points: int = 0,
    curve: list | None = None,
    schedule: str = "constant",
) -> list[float]:
    """AdamW (weight decay 0.01) on the trainable parameters, linear warm-up (5 % of steps), then
    constant (`schedule="constant"`) or cosine decay to zero (`"cosine"`, `musiclora.train.schedule.lr_at`).

    The study uses the constant rate: its runs are short, and each stage's loss curve shows where it
    flattens.

    Args:
        probe: optional callable () -> held-out loss, called (in eval mode) `points` times, evenly
            spaced, the last after the last step; (step, loss) pairs are appended to `curve`.

    Returns:
        The loss per step (cross-entropy in nats, mean over codebooks).
    """
    at = {round(steps * (i + 1) / points) for i in range(points)} if probe is not None and points else set()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    model.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(schedule, step, lr, max(1, steps // 20), steps)
        batch = family.collate(
            [samples[j] for j in rng.choice(len(samples), batch_size, replace=False)], loaded
        )
        loss = family.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if step + 1 in at:
            model.eval()
            if curve is not None:
                curve.append((step + 1, probe()))
            model.train()
    model.eval()
    return losses


def scheduled_lr(schedule: str, step: int, lr: float, warmup: int, steps: int) -> float:
    """Learning rate at 0-based `step`: linear warm-up over `warmup` steps, then `lr` ("constant")
    or cosine decay to zero at `steps` ("cosine": `musiclora.train.schedule.lr_at`).

    Raises:
        ValueError: unknown `schedule`.
    """
    if schedule == "cosine":
        return lr_at(step, lr, warmup, steps)
    if schedule == "constant":
        return lr * min(1.0, (step + 1) / warmup)
    raise ValueError(f"schedule: expected 'constant' or 'cosine', got {schedule!r}")


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


def study_model(family, s: AdaptationSettings, seed: int, folder: Path):
    """The study's tiny MusicGen-Melody, built with `seed`, saved to `folder` and loaded from it.

    Its codebooks have `s.codec_entries` entries, so the LM's vocabulary is the codes its codec
    uses, and it takes `s.chroma_length` chroma frames.

    Raises:
        ValueError: `s.chroma_length` frames are shorter than a segment or a generated clip.
    """
    from musiclora.models.chroma import HOP_LENGTH as CHROMA_HOP

    longest = max(s.segment_s, s.eval_duration_s)
    if s.chroma_length * CHROMA_HOP < longest * family.sample_rate + CHROMA_HOP:
        raise ValueError(
            f"chroma_length: {s.chroma_length} frames of {CHROMA_HOP} samples do not cover {longest} s"
        )
    return family.load(
        family.save_tiny(str(folder), seed=seed, codebook_size=s.codec_entries, chroma_length=s.chroma_length)
    )


def _log(msg: str, t0: float) -> None:
    print(f"[adaptation {time.perf_counter() - t0:6.0f} s] {msg}", file=sys.stderr, flush=True)


def _clips(segments: list[Segment]) -> torch.Tensor:
    return torch.from_numpy(np.stack([seg.audio for seg in segments])).float()


@dataclass
class StudyData:
    """What every seed shares: the fitted codec's state, the encoded splits, the generation inputs."""

    base: StyleData
    target: StyleData
    codec_state: dict[str, torch.Tensor]
    codec_stats: dict[str, Any]
    sets: dict[str, list[dict[str, Any]]]
    prompts: list[Segment]
    reference: list[np.ndarray]


def prepare_data(s: AdaptationSettings, rows: dict[str, list[dict[str, Any]]], family) -> StudyData:
    """Decode and split both styles, fit the study's codec (`fit_mel_codec`) on their training
    tracks, encode the four splits with it, pick the evaluation prompts (held-out target segments).

    Raises:
        ValueError: too few usable tracks for a split, or `s.chroma_length` too short (`study_model`).
    """
    from musiclora.studies.tiny_codec import fit_mel_codec, mel_codes

    with tempfile.TemporaryDirectory() as tmp:  # first: a chroma_length too short fails before decoding
        loaded = study_model(family, s, s.seeds[0], Path(tmp))
    base = style_data(s.base_package, rows[s.base_package][: s.base_tracks], family.sample_rate, s)
    target = style_data(s.target_package, rows[s.target_package][: s.target_tracks], family.sample_rate, s)
    codec = loaded.model.audio_encoder
    frames, stats = fit_mel_codec(
        codec,
        torch.cat([_clips(base.train), _clips(target.train)]),
        entries=s.codec_entries,
        decoder_steps=s.codec_steps,
        seed=s.seeds[0],
    )
    sets = {}
    for name, data in (("base", base), ("target", target)):
        for split in ("train", "heldout"):
            segs = getattr(data, split)
            sets[f"{name}_{split}"] = encode(
                family, loaded, segs, codes=mel_codes(codec, frames, _clips(segs))
            )
    held = target.heldout
    picks = sorted({int(i) for i in np.linspace(0, len(held) - 1, min(s.eval_prompts, len(held))).round()})
    n = round(s.eval_duration_s * family.sample_rate)
    return StudyData(
        base,
        target,
        {k: v.clone() for k, v in codec.state_dict().items()},
        stats,
        sets,
        prompts=[held[i] for i in picks],
        reference=[seg.audio[:n] for seg in held],
    )


def generated_kad(
    family,
    model,
    tokenizer,
    data: StudyData,
    embedder,
    ref_emb: np.ndarray,
    s: AdaptationSettings,
    seed: int,
    guidance_scale: float,
) -> float:
    """KAD between the held-out target segments and one clip generated per prompt (caption + melody),
    sampled with classifier-free guidance `guidance_scale` (1: plain conditional sampling).

    Returns:
        `musiclora.eval.metrics.kad` (x100, kadtk's scale) of the `embedder` embeddings.

    Raises:
        RuntimeError: generation failed.
    """
    from musiclora.audio import resample
    from musiclora.eval.metrics import kad

    requests = [
        GenerationRequest(
            seg.caption,
            s.eval_duration_s,
            guidance_scale,
            seed * 1000 + j,
            melody=seg.audio[: round(s.eval_duration_s * family.sample_rate)],
            melody_sample_rate=family.sample_rate,
        )
        for j, seg in enumerate(data.prompts)
    ]
    results = family.generate_batch(model, tokenizer, requests)
    failed = [out for out in results if isinstance(out, Exception)]
    if failed:
        raise RuntimeError(f"generation failed: {failed[0]}") from failed[0]
    return kad(ref_emb, embedder([resample(audio, sr, embedder.sample_rate) for audio, sr in results]))


def run_seed(
    seed: int, s: AdaptationSettings, family, data: StudyData, embedder, ref_emb, work: Path, t_all: float
) -> dict[str, Any]:
    """One seed: a fresh tiny LM (built with `seed`), its base training, then LoRA and full fine-tuning.

    Returns:
        {"heldout_loss": {model: {"base": nats, "target": nats}}, "kad": {model: kad at the first
        guidance scale}, "kad_by_guidance": {"<scale>": {model: kad}},
        "curves": {stage: [(step, held-out nats)]}, "train_loss": {stage: [first10, last10]},
        "parameters": {...}, "timings_s": {...}} for models init / base / lora / full.
    """
    loaded = study_model(family, s, seed, work / f"init_{seed}")
    model = loaded.model
    model.audio_encoder.load_state_dict(data.codec_state)
    sets, bs, timings = data.sets, s.batch_size, {}

    def held(m, split: str) -> float:
        return heldout_loss(m, family, loaded, sets[f"{split}_heldout"], bs)

    def both(m) -> dict[str, float]:
        return {split: held(m, split) for split in ("base", "target")}

    def stage(m, name, split, steps, lr, offset):
        torch.manual_seed(seed * 7919 + offset)  # condition dropout draws
        curve, t0 = [], time.perf_counter()
        losses = train(
            m,
            family,
            loaded,
            sets[f"{split}_train"],
            steps,
            lr,
            bs,
            seed * 7919 + offset,
            probe=lambda: held(m, split),
            points=s.curve_points,
            curve=curve,
            schedule=s.schedule,
        )
        timings[f"{name}_train_s"] = time.perf_counter() - t0
        _log(
            f"seed {seed}: {name} trained, {steps} steps in {timings[name + '_train_s']:.0f} s; "
            f"held-out {split} loss {[round(v, 3) for _, v in curve]}",
            t_all,
        )
        return curve, [float(np.mean(losses[:10])), float(np.mean(losses[-10:]))]

    loss, curves, train_loss = {"init": both(model)}, {}, {}
    by_guidance: dict[str, dict[str, float]] = {f"{g:g}": {} for g in s.guidance_scales}

    def score(m, name: str) -> None:
        for g in s.guidance_scales:
            by_guidance[f"{g:g}"][name] = generated_kad(
                family, m, loaded.tokenizer, data, embedder, ref_emb, s, seed, g
            )

    for p in model.parameters():
        p.requires_grad_(True)
    for p in model.audio_encoder.parameters():
        p.requires_grad_(False)
    lm_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    curves["base"], train_loss["base"] = stage(model, "base", "base", s.base_steps, s.base_lr, 1)
    loss["base"] = both(model)
    score(model, "base")

    full = copy.deepcopy(model)
    curves["full"], train_loss["full"] = stage(full, "full", "target", s.full_steps, s.full_lr, 2)
    loss["full"] = both(full)
    score(full, "full")
    del full

    torch.manual_seed(seed * 7919 + 3)  # LoRA init
    cfg = AdapterConfig(preset=s.preset, r=s.r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout)
    model = apply_lora(model, family, cfg)
    lora_params = trainable_report(model)
    curves["lora"], train_loss["lora"] = stage(model, "lora", "target", s.lora_steps, s.lora_lr, 4)
    loss["lora"] = both(model)
    score(model, "lora")
    _log(f"seed {seed}: held-out loss {loss}, KAD by guidance {by_guidance}", t_all)
    return {
        "heldout_loss": loss,
        "kad": by_guidance[f"{s.guidance_scales[0]:g}"],
        "kad_by_guidance": by_guidance,
        "curves": curves,
        "train_loss": train_loss,
        "parameters": {"lm": lm_params, "lora": lora_params["trainable"], "total": lora_params["total"]},
        "timings_s": timings,
    }


def run_adaptation(
    s: AdaptationSettings, out_dir: str | Path, rows: dict[str, list[dict[str, Any]]] | None = None
) -> dict[str, Any]:
    """Run the study for every seed; write adaptation_table.md, adaptation.json and loss_curves.png.

    Progress goes to stderr.

    Args:
        s: the settings.
        out_dir: output folder (created).
        rows: corpus metadata rows by package (`corpus_rows`); None reads (and on first use
            fetches) the bundled corpus.

    Returns:
        The figures as a dict (as in `adaptation.json`): per seed, aggregated over seeds, the
        targets, "markdown" holding the table.

    Raises:
        RuntimeError: a corpus package cannot be fetched, or generation fails.
        ValueError: too few usable tracks for a split, or no seed.
    """
    from musiclora.eval.embeddings import build_embedder
    from musiclora.eval.report import clean_json
    from musiclora.studies.adaptation_report import adaptation_markdown, plot_curves, summarize
    from musiclora.studies.ngram import code_model_loss

    if not s.seeds:
        raise ValueError("seeds: need at least one")
    if not s.guidance_scales or min(s.guidance_scales) < 1.0:
        raise ValueError(f"guidance_scales: need at least one, each >= 1, got {s.guidance_scales}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all, cpu0, timings = time.perf_counter(), time.process_time(), {}
    torch.manual_seed(s.seeds[0])
    family = get_family("musicgen-melody")
    rows = rows if rows is not None else corpus_rows(s.cache_dir, [s.base_package, s.target_package])
    data = prepare_data(s, rows, family)
    timings["prepare_s"] = time.perf_counter() - t_all
    _log(f"data and codec ready: {data.codec_stats}", t_all)
    references = {
        split: {
            f"order{o}": code_model_loss(data.sets["base_train"], data.sets[f"{split}_heldout"], s.codec_entries, o)
            for o in (0, 1)
        }
        for split in ("base", "target")
    }
    _log(f"count models of the base style's codes, held-out nats: {references}", t_all)
    embedder = build_embedder(s.embedder)
    from musiclora.audio import resample

    ref_emb = embedder([resample(w, family.sample_rate, embedder.sample_rate) for w in data.reference])
    with tempfile.TemporaryDirectory() as tmp:
        seeds = {
            seed: run_seed(seed, s, family, data, embedder, ref_emb, Path(tmp), t_all) for seed in s.seeds
        }
    timings["total_s"] = time.perf_counter() - t_all
    timings["cpu_s"] = time.process_time() - cpu0
    timings["load_average_1_5_15"] = list(os.getloadavg())
    result = {
        "settings": asdict(s),
        "timings_s": timings,
        "codec": data.codec_stats,
        "data": {
            k: {"tracks": d.tracks, "train_segments": len(d.train), "heldout_segments": len(d.heldout)}
            for k, d in (("base", data.base), ("target", data.target))
        },
        "eval": {"prompts": len(data.prompts), "reference_clips": len(data.reference)},
        "seeds": seeds,
    }
    result["references"] = references
    result.update(summarize(seeds, references))
    result["markdown"] = adaptation_markdown(result)
    plot_curves(seeds, s, str(out / "loss_curves.png"), references)
    (out / "adaptation.json").write_text(json.dumps(clean_json(result), indent=2))
    (out / "adaptation_table.md").write_text(result["markdown"])
    return result
