"""`musiclora tune report`: PNG plots of the metric against each searched value and a Markdown table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from musiclora.storage import join_url, open_url

SUMMARY = "musiclora_summary.json"


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


def write_report(summary: dict[str, Any], out_dir: str, metric: str = "loss") -> dict[str, str]:
    """Write `<out_dir>/tune_report.md` and one `<key>.png` per searched numeric key.

    Returns:
        {"markdown": path, "<key>": png path, ...}.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trials = summary["trials"]
    keys = sorted({k for t in trials for k in t if "." in k})
    paths: dict[str, str] = {}
    for key in keys:
        pts = [(t[key], t[metric]) for t in trials if isinstance(t.get(key), (int, float)) and t.get(metric) is not None]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts])
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        if key in ("optim.lr",):
            ax.set_xscale("log")
        ax.set_title(f"{metric} vs {key}", fontsize=9)
        fig.tight_layout()
        png = out / f"{key.replace('.', '_')}.png"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        paths[key] = str(png)
    cols = keys + [metric, "step", "status"]  # finished / stopped (ASHA) / errored
    lines = ["| trial | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for t in sorted(trials, key=lambda t: (t.get(metric) is None, t.get(metric) or 0)):
        cells = [f"{t.get(c):.4g}" if isinstance(t.get(c), float) else str(t.get(c)) for c in cols]
        lines.append(f"| {t.get('trial_id')} | " + " | ".join(cells) + " |")
    best = summary.get("best", {})
    md = [f"# Tune report: {summary.get('name')}", "", (f"Best trial: `{best.get('trial_id')}` "
          f"({metric} = {best.get(metric)}), registry: `{summary.get('registry')}`"), "", *lines, ""]
    md += [f"![{k}]({Path(p).name})" for k, p in paths.items()]
    (out / "tune_report.md").write_text("\n".join(md) + "\n")
    paths["markdown"] = str(out / "tune_report.md")
    return paths
