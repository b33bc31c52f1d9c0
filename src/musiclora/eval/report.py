"""Write an evaluation as files: metrics.json, report.md, report.html, WAVs and spectrogram PNGs.

Layout of `out_dir`:

    metrics.json           every figure: flat metrics, deltas, per-prompt values, counts, settings
    report.md              summary table, KAD/FAD per embedder, one section per prompt
    report.html            the same, self-contained (inline CSS, no script), an <audio> player per clip
    audio/<id>_{base,adapter,melody}.wav, audio/reference_<i>.wav     PCM 16
    spectrograms/<id>.png  log-mel spectrograms of melody (if any), base and adapter, one above the other

All links are relative, so the folder can be copied or served as is. Text from prompts and
paths is escaped. Every KAD/FAD figure and the CLAP score name the model behind them (`embedders`,
`clap` in metrics.json; a figure from random weights is labelled "random — not a real score"), and
what was left out is listed with the reason (`left_out`).
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from musiclora.audio import save_audio, to_mono
from musiclora.eval import scoring

MODELS = ("base", "adapter")
REFERENCE_PLAYERS = 4
LABELS = {
    "clap_score": "CLAP score (text-audio cosine)",
    "kad": "KAD (first embedder, x100)",
    "fad": "FAD (first embedder)",
    "mel_mse": "spectral distance: mel MSE to reference (dB²)",
    "audio_feature_distance": "audio feature distance to reference (cosine)",
    "harmonic_accuracy": "harmonic accuracy (%)",
    "melodic_complexity": "melodic complexity (distinct pitches)",
    "rhythmic_inconsistency": "rhythmic inconsistency (% of a beat)",
    "chroma_cosine": "chroma cosine, melody vs output",
}


def fmt(value: Any) -> str:
    """A number for a table: 4 significant digits, "n/a" for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{float(value):.4g}"


def clean_json(obj: Any) -> Any:
    """JSON-safe copy (strict JSON: no NaN): NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def metric_label(metric: str) -> str:
    if metric.startswith(("kad_", "fad_")):
        kind, emb = metric.split("_", 1)
        return f"{kind.upper()} on {emb} embeddings" + (" (x100)" if kind == "kad" else "")
    return LABELS.get(metric, metric)


def _describe(ev) -> dict[str, Any]:
    """The models behind the figures: `embedders` (key -> description), `clap` (or None), `left_out`."""
    from musiclora.eval.embeddings import describe_clap, describe_embedder

    return {
        "embedders": {k: describe_embedder(e) for k, e in ev.embedders.items()},
        "kad_fad_embedder": next(iter(ev.embedders), None),
        "clap": describe_clap(ev.clap) if ev.clap is not None else None,
        "left_out": dict(ev.left_out),
    }


def _row_label(metric: str, clap: dict[str, Any] | None) -> str:
    """`metric_label`, with the CLAP model behind the CLAP score ("..., clap (tiny random — not a real score)")."""
    label = metric_label(metric)
    return f"{label}, {clap['label']}" if metric == "clap_score" and clap else label


def _arrow(metric: str) -> str:
    d = scoring.direction(metric)
    return "higher" if d else ("lower" if d is False else "-")


def comparison_to_dict(result) -> dict[str, Any]:
    """Everything in a `Comparison` except the audio, JSON-ready (NaN as null)."""
    ev = result.evaluator
    ref_music = ev.reference_music() if ev.music else None
    reference_means = {}
    if ref_music:
        for k in ("harmonic_accuracy", "melodic_complexity", "rhythmic_inconsistency"):
            vals = [r[k] for r in ref_music if r.get(k) is not None]
            reference_means[k] = float(np.mean(vals)) if vals else None
    prompts = []
    for i, p in enumerate(ev.prompts):
        prompts.append(
            {
                "id": p.id,
                "prompt": p.text,
                "seed": p.seed,
                "melody": p.melody_source,
                **{m: result.scores[m].per_clip[i] for m in MODELS},
            }
        )
    return clean_json(
        {
            "metrics": {m: result.scores[m].metrics for m in MODELS},
            "delta": result.delta(),
            "counts": {m: result.scores[m].counts for m in MODELS},
            "undefined_reasons": {m: result.scores[m].errors for m in MODELS},
            "reference": {
                "origin": ev.reference.origin,
                "clips": len(ev.reference.wavs),
                "clip_s": ev.duration_s,
                "sample_rate": ev.reference.sample_rate,
                "labels": ev.reference.labels,
                "notes": ev.reference.notes,
                "music_means": reference_means,
            },
            **_describe(ev),
            "prompts": prompts,
            "info": result.info,
        }
    )


def _write_wav(path: Path, wav: np.ndarray, sample_rate: int) -> None:
    """16-bit WAV of a clip [L] or [C, L], keeping its channels (a stereo family's clips stay stereo)."""
    save_audio(path, wav, sample_rate)


def _spectrograms(path: Path, rows: list[tuple[str, np.ndarray]], sample_rate: int, title: str) -> None:
    """One PNG with a log-mel spectrogram (128 bins, dB re. each clip's max) per row ([L], or [C, L] as its downmix)."""
    import librosa
    import librosa.display
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 2.2 * len(rows)), squeeze=False)
    for ax, (name, wav) in zip(axes[:, 0], rows):
        mel = librosa.feature.melspectrogram(y=to_mono(wav), sr=sample_rate, n_mels=128)
        db = librosa.power_to_db(mel, ref=np.max(mel) if mel.max() > 0 else 1.0)
        img = librosa.display.specshow(db, sr=sample_rate, x_axis="time", y_axis="mel", ax=ax)
        fig.colorbar(img, ax=ax, format="%+2.0f dB")
        ax.set_title(name, fontsize=9)
    fig.suptitle(title[:110], fontsize=9)
    fig.tight_layout()
    fig.savefig(str(path), dpi=90)
    plt.close(fig)


def _summary_rows(data: dict[str, Any]) -> list[list[str]]:
    """Per-clip metrics: label, direction, base, adapter, delta, reference-clip mean, clips defined."""
    base, adapter, delta = data["metrics"]["base"], data["metrics"]["adapter"], data["delta"]
    ref, counts = data["reference"]["music_means"], data["counts"]
    rows = []
    for k in scoring.PER_CLIP:
        if k not in adapter:
            continue
        n = f"{counts['base'].get(k, 0)}/{counts['adapter'].get(k, 0)} of {len(data['prompts'])}"
        rows.append(
            [
                _row_label(k, data.get("clap")),
                _arrow(k),
                fmt(base.get(k)),
                fmt(adapter.get(k)),
                fmt(delta.get(k)),
                fmt(ref.get(k)) if k in ref else "",
                n,
            ]
        )
    return rows


def _set_rows(data: dict[str, Any]) -> list[list[str]]:
    """KAD and FAD per embedder: embedder (the model behind it), figures, KAD and FAD base/adapter/delta."""
    base, adapter, delta = data["metrics"]["base"], data["metrics"]["adapter"], data["delta"]
    rows = []
    for key, desc in data["embedders"].items():
        names = f"kad_{key}, fad_{key}" + (" (= kad, fad)" if key == data.get("kad_fad_embedder") else "")
        rows.append(
            [desc["label"], names]
            + [fmt(d.get(f"{kind}_{key}")) for kind in ("kad", "fad") for d in (base, adapter, delta)]
        )
    return rows


def _left_out_note(data: dict[str, Any]) -> str:
    """One sentence per reason: the figures left out and why ("" when nothing was left out)."""
    by_reason: dict[str, list[str]] = {}
    for metric, reason in data.get("left_out", {}).items():
        by_reason.setdefault(reason, []).append(metric)
    return " ".join(f"Left out {', '.join(m)}: {r}." for r, m in by_reason.items())


SET_HEADER = [
    "embedder", "figures", "KAD base", "KAD adapter", "KAD delta", "FAD base", "FAD adapter", "FAD delta",
]
SUMMARY_HEADER = [
    "metric",
    "better",
    "base",
    "adapter",
    "adapter - base",
    "reference clips",
    "clips defined (b/a)",
]


def md_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _prompt_rows(entry: dict[str, Any], clap: dict[str, Any] | None) -> list[list[str]]:
    keys = [k for k in scoring.PER_CLIP if k in entry["base"] or k in entry["adapter"]]
    return [[_row_label(k, clap), fmt(entry["base"].get(k)), fmt(entry["adapter"].get(k))] for k in keys]


def _settings_rows(data: dict[str, Any]) -> list[list[str]]:
    info, ref = data["info"], data["reference"]
    rows = [[k, str(info[k])] for k in ("family", "base", "adapter", "duration_s", "guidance_scale") if k in info]
    clap = data.get("clap")
    rows.append(["clap (CLAP score)", clap["label"] if clap else f"left out: {data['left_out'].get('clap_score', '')}"])
    rows.append(
        [
            "reference",
            f"{ref['origin']}: {ref['clips']} clips of {ref['clip_s']} s at {ref['sample_rate']} Hz",
        ]
    )
    rows.append(["embedders (KAD/FAD)", ", ".join(v["label"] for v in data["embedders"].values())])
    timings = info.get("timings", {})
    if timings:
        rows.append(["time (s)", ", ".join(f"{k} {v:.1f}" for k, v in timings.items())])
    return rows


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:70rem;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:0.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:0.25rem 0.6rem;text-align:left}
th{background:#f2f2f2}td:nth-child(n+3){font-variant-numeric:tabular-nums}
section{border-top:1px solid #ddd;margin-top:1.5rem;padding-top:0.5rem}img{max-width:100%}
.players{display:flex;gap:1.5rem;flex-wrap:wrap}.players figure{margin:0}figcaption{font-size:0.85rem;color:#555}
code{background:#f5f5f5;padding:0 0.2rem}
"""


def _players_html(items: list[tuple[str, str]]) -> str:
    figs = "".join(
        f"<figure><figcaption>{html.escape(name)}</figcaption>"
        f'<audio controls preload="metadata" src="{html.escape(src)}"></audio></figure>'
        for name, src in items
    )
    return f'<div class="players">{figs}</div>'


def _prompt_section(result, i: int, entry: dict[str, Any], out: Path, clap: dict | None) -> tuple[str, str]:
    """Write prompt i's WAVs and spectrogram PNG; return its Markdown and HTML sections."""
    from musiclora.audio import resample

    p, sr = result.evaluator.prompts[i], result.evaluator.sample_rate
    players: list[tuple[str, str]] = []
    rows: list[tuple[str, np.ndarray]] = []
    if p.melody is not None:
        melody = resample(p.melody, p.melody_sample_rate or sr, sr)
        rows.append(("melody input", melody))
    rows += [(m, result.clips[m][i]) for m in MODELS]
    for name, wav in rows:
        src = f"audio/{p.id}_{'melody' if name == 'melody input' else name}.wav"
        _write_wav(out / src, wav, sr)
        players.append((name, src))
    png = f"spectrograms/{p.id}.png"
    _spectrograms(out / png, rows, sr, f"{p.id}: {p.text}")
    head = f"{p.id}: {p.text}"
    meta = f"seed {p.seed}" + (f", melody {p.melody_source}" if p.melody_source else "")
    table = _prompt_rows(entry, clap)
    links = " · ".join(f"[{name}]({src})" for name, src in players)
    md = f"### {head}\n\n{meta}\n\n{links}\n\n![spectrograms of {p.id}]({png})\n\n" + md_table(
        ["metric", "base", "adapter"], table
    )
    page = (
        f"<section><h3>{html.escape(head)}</h3><p>{html.escape(meta)}</p>{_players_html(players)}"
        f'<img src="{html.escape(png)}" alt="spectrograms of {html.escape(p.id)}">'
        + _html_table(["metric", "base", "adapter"], table)
        + "</section>"
    )
    return md, page


def write_report(
    result, out_dir: str | os.PathLike, title: str = "musiclora evaluation: base vs adapter"
) -> dict[str, str]:
    """Write metrics.json, report.md, report.html, WAVs and spectrogram PNGs for a `Comparison`.

    Args:
        result: a `musiclora.eval.evaluate.Comparison`.
        out_dir: output folder (created).
        title: report heading.

    Returns:
        {"dir", "json", "markdown", "html"}: paths of what was written.
    """
    out = Path(out_dir)
    (out / "audio").mkdir(parents=True, exist_ok=True)
    (out / "spectrograms").mkdir(exist_ok=True)
    ev = result.evaluator
    data = comparison_to_dict(result)
    (out / "metrics.json").write_text(json.dumps(data, indent=2))
    sections = [_prompt_section(result, i, data["prompts"][i], out, data["clap"]) for i in range(len(ev.prompts))]
    ref_players = []
    for j, wav in enumerate(ev.reference.wavs[:REFERENCE_PLAYERS]):
        _write_wav(out / "audio" / f"reference_{j}.wav", wav, ev.sample_rate)
        ref_players.append((ev.reference.labels[j], f"audio/reference_{j}.wav"))

    summary, sets, settings = _summary_rows(data), _set_rows(data), _settings_rows(data)
    note = (
        "Per-clip metrics are means over the clips where they are defined; the reference column is the "
        "same metric on the reference clips. Directions are conventions, not verdicts: melodic complexity "
        "has none."
    )
    set_note = (
        "KAD (x100, unbiased MMD², Gaussian kernel, median-distance bandwidth of the reference) and FAD "
        "between the reference clips and each generated set; lower is closer. Both are set statistics: "
        f"with {len(ev.prompts)} generated clips they are noisy, FAD most (it fits a covariance). "
        "Each row names the model behind its figures; a row from random weights is not a real score."
    )
    left_out = _left_out_note(data)
    md = (
        "\n\n".join(
            [
                f"# {title}",
                md_table(["setting", "value"], settings),
                "## Summary",
                md_table(SUMMARY_HEADER, summary),
                note,
                "## Distribution distances",
                md_table(SET_HEADER, sets),
                set_note,
                *([left_out] if left_out else []),
                "## Reference clips",
                " · ".join(f"[{n}]({s})" for n, s in ref_players),
                "## Prompts",
                *(md for md, _ in sections),
            ]
        )
        + "\n"
    )
    (out / "report.md").write_text(md)
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="icon" href="data:,">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{_html_table(['setting', 'value'], settings)}"
        f"<h2>Summary</h2>{_html_table(SUMMARY_HEADER, summary)}<p>{html.escape(note)}</p>"
        f"<h2>Distribution distances</h2>{_html_table(SET_HEADER, sets)}<p>{html.escape(set_note)}</p>"
        + (f"<p>{html.escape(left_out)}</p>" if left_out else "")
        + 
        f"<h2>Reference clips</h2>{_players_html(ref_players)}"
        f"<h2>Prompts</h2>{''.join(page for _, page in sections)}</body></html>\n"
    )
    (out / "report.html").write_text(page)
    return {
        "dir": str(out),
        "json": str(out / "metrics.json"),
        "markdown": str(out / "report.md"),
        "html": str(out / "report.html"),
    }
