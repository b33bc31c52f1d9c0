"""`musiclora tune report`: the search's objectives against each searched value, a parallel-coordinates
view of all trials (PNG, matplotlib) and a Markdown table that embeds them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from musiclora.storage import join_url, open_url

SUMMARY = "musiclora_summary.json"
LOG_KEYS = ("optim.lr",)
"""Searched keys drawn on a log axis (sampled log-uniformly)."""


def save_summary(storage_path: str, name: str, summary: dict[str, Any]) -> str:
    """Write the search's trial table next to Tune's experiment; returns its URL."""
    url = join_url(storage_path, name, SUMMARY)
    with open_url(url, "wb") as f:
        f.write(json.dumps(summary, indent=2, default=str).encode())
    return url


def load_summary(storage_path: str, name: str) -> dict[str, Any]:
    """Read the trial table written by `save_summary`.

    Raises:
        FileNotFoundError: the experiment has no summary (not run, or still running).
    """
    url = join_url(storage_path, name, SUMMARY)
    try:
        with open_url(url, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"no Tune summary at {url}: run the search first") from None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        else None


def objectives(summary: dict[str, Any], metric: str | None = None) -> list[str]:
    """The objectives to plot: `metric` (default: the summary's selection metric, else `val_loss`),
    `val_loss` and `kad` where some trial has them, without repeats."""
    first = metric or summary.get("metric") or "val_loss"
    found = [m for m in (first, "val_loss", "kad") if any(_number(t.get(m)) is not None for t in summary["trials"])]
    return list(dict.fromkeys(found)) or [first]


def _axis_values(trials: list[dict[str, Any]], key: str) -> tuple[list[float | None], list[str] | None]:
    """Numeric positions of each trial on `key`'s axis; categorical keys (any non-numeric value)
    get category indices and their labels (sorted)."""
    values = [t.get(key) for t in trials]
    if all(v is None or _number(v) is not None for v in values):
        return [_number(v) for v in values], None
    labels = sorted({str(v) for v in values if v is not None})
    return [None if v is None else float(labels.index(str(v))) for v in values], labels


def _scatter_key(plt, trials, key: str, objs: list[str], path: Path) -> bool:
    """One PNG: each objective against `key` (strip plot with jitter for a categorical key);
    finished trials filled, ASHA-stopped ones hollow (their value at the rung they were cut)."""
    xs, labels = _axis_values(trials, key)
    fig, axes = plt.subplots(1, len(objs), figsize=(4.2 * len(objs), 3.2), squeeze=False)
    drawn = False
    for ax, obj in zip(axes[0], objs):
        for status, style in (("finished", {"color": "C0"}), ("stopped", {"facecolors": "none", "edgecolors": "C1"})):
            pts = [(x, _number(t.get(obj))) for x, t in zip(xs, trials)
                   if x is not None and t.get("status") == status and _number(t.get(obj)) is not None]
            if labels is not None:  # strip plot: deterministic jitter so equal values stay visible
                pts = [(x + 0.08 * ((i % 5) - 2), y) for i, (x, y) in enumerate(pts)]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=status, **style)
                drawn = True
        if labels is not None:
            ax.set_xticks(range(len(labels)), labels)
            ax.set_xlim(-0.6, len(labels) - 0.4)
        elif key in LOG_KEYS:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(obj)
        ax.set_title(f"{obj} vs {key}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _parallel(plt, trials, keys: list[str], obj: str, path: Path) -> bool:
    """Parallel coordinates: one vertical axis per searched key and per objective, each scaled to
    [0, 1] over the trials (log10 for `LOG_KEYS`, category index for categorical keys), one line
    per trial coloured by `obj`; trials without `obj` (errored) drawn grey and dashed."""
    import matplotlib as mpl

    cols = keys + [obj]
    scaled, ticks = [], []
    for key in cols:
        xs, labels = _axis_values(trials, key)
        if key in LOG_KEYS:
            xs = [math.log10(x) if x and x > 0 else None for x in xs]
        known = [x for x in xs if x is not None]
        lo, hi = (min(known), max(known)) if known else (0.0, 1.0)
        span = (hi - lo) or 1.0
        scaled.append([None if x is None else (x - lo) / span for x in xs])
        ends = [f"{10 ** v:.2g}" if key in LOG_KEYS else f"{v:.3g}" for v in (lo, hi)]
        ticks.append([(k / max(1, len(labels) - 1), label) for k, label in enumerate(labels)] if labels
                     else [(0.0, ends[0]), (1.0, ends[1])])
    values = [_number(t.get(obj)) for t in trials]
    known = [v for v in values if v is not None]
    if not known:
        return False
    norm = mpl.colors.Normalize(min(known), max(known) if max(known) > min(known) else min(known) + 1e-9)
    cmap = mpl.colormaps["viridis_r"]  # lower (better, for losses and KAD) is brighter
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2, 4))
    for i, t in enumerate(trials):
        pts = [(j, col[i]) for j, col in enumerate(scaled) if col[i] is not None]
        style = {"color": cmap(norm(values[i])), "lw": 1.6} if values[i] is not None else \
            {"color": "0.6", "ls": "--", "lw": 1}
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, **style)
    for j, col_ticks in enumerate(ticks):  # categorical: one label per category; numeric: the two ends
        ax.axvline(j, color="0.3", lw=0.8)
        for y, label in col_ticks:
            ax.text(j + 0.04, y, label, fontsize=7, va="center")
    ax.set_xticks(range(len(cols)), cols, rotation=20, fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(cols) - 0.6)
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=obj)
    ax.set_title(f"all {len(trials)} trials, coloured by {obj}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(summary: dict[str, Any], out_dir: str, metric: str | None = None) -> dict[str, str]:
    """Write `<out_dir>/tune_report.md`, one `<key>.png` per searched key (every objective against
    it) and `parallel_coordinates.png`.

    Args:
        summary: what `musiclora tune run` saved (`save_summary`): trials, best, metric, registry.
        out_dir: folder for the report (created).
        metric: the objective the table is sorted by and the parallel view coloured by (None: the
            summary's selection metric, else `val_loss`); `val_loss` and `kad` are plotted too
            wherever trials report them.

    Returns:
        {"markdown": path, "parallel_coordinates": png path, "<key>": png path, ...}: only PNGs
        that have at least one point.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trials = summary["trials"]
    objs = objectives(summary, metric)
    keys = sorted({k for t in trials for k in t if "." in k})
    paths: dict[str, str] = {}
    for key in keys:
        png = out / f"{key.replace('.', '_')}.png"
        if _scatter_key(plt, trials, key, objs, png):
            paths[key] = str(png)
    if keys and _parallel(plt, trials, keys, objs[0], out / "parallel_coordinates.png"):
        paths["parallel_coordinates"] = str(out / "parallel_coordinates.png")
    cols = keys + objs + ["step", "status"]  # finished / stopped (ASHA) / errored
    lines = ["| trial | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for t in sorted(trials, key=lambda t: (_number(t.get(objs[0])) is None, _number(t.get(objs[0])) or 0)):
        cells = [f"{t.get(c):.4g}" if isinstance(t.get(c), float) else str(t.get(c)) for c in cols]
        lines.append(f"| {t.get('trial_id')} | " + " | ".join(cells) + " |")
    best = summary.get("best", {})
    chosen = summary.get("metric") or objs[0]
    md = [f"# Tune report: {summary.get('name')}", "",
          f"Best trial: `{best.get('trial_id')}` ({chosen} = {best.get(chosen)}), registry: `{summary.get('registry')}`",
          "", (f"Objectives: {', '.join(objs)} (val_loss: held-out validation loss in nats, the best-by-validation "
               "value for finished trials and the value at the rung for trials ASHA stopped; kad: KAD x100 of "
               "generated against validation audio, lower is better)."), "", *lines, ""]
    md += [f"![{k}]({Path(p).name})" for k, p in paths.items()]
    (out / "tune_report.md").write_text("\n".join(md) + "\n")
    paths["markdown"] = str(out / "tune_report.md")
    return paths
