"""`musiclora tune report`: objectives against every searched key and a parallel-coordinates view."""

import numpy as np
from PIL import Image

from musiclora.tune.report import objectives, write_report


def _summary(with_kad: bool) -> dict:
    trials = []
    for i, (r, preset, status) in enumerate([(4, "attn", "finished"), (8, "attn+ffn", "stopped"),
                                              (16, "attn", "finished"), (8, "attn", "errored"),
                                              (4, "attn+ffn", "finished")]):
        t = {"trial_id": f"t{i}", "adapter.r": r, "adapter.lora_alpha": 2 * r, "adapter.lora_dropout": 0.05 * i,
             "optim.lr": 10 ** (-4 + 0.5 * i), "adapter.preset": preset, "status": status, "step": 12}
        if status != "errored":
            t["val_loss"] = 5.0 - 0.1 * i
            if with_kad and status == "finished":
                t["kad"] = 3.0 + i
        trials.append(t)
    return {"name": "s", "trials": trials, "best": trials[4], "metric": "val_loss", "registry": "s:v1"}


def _ink(path: str) -> float:
    """Share of pixels that are not the background: a plot with points and lines, not an empty frame."""
    img = np.asarray(Image.open(path).convert("L"), dtype=np.float32)
    return float((img < 250).mean())


def test_report_plots_both_objectives_against_every_key_and_a_parallel_view(tmp_path):
    paths = write_report(_summary(with_kad=True), str(tmp_path))
    keys = ["adapter.r", "adapter.lora_alpha", "adapter.lora_dropout", "optim.lr", "adapter.preset"]
    assert set(keys + ["parallel_coordinates", "markdown"]) == set(paths)
    for key in keys:
        w, h = Image.open(paths[key]).size
        assert w > 2 * h, key  # one panel per objective: val_loss and kad side by side
        assert _ink(paths[key]) > 0.02, key
    assert _ink(paths["parallel_coordinates"]) > 0.05
    with open(paths["markdown"]) as f:
        md = f.read()
    assert "![parallel_coordinates](parallel_coordinates.png)" in md and "![adapter.preset](adapter_preset.png)" in md
    assert md.index("| t4 |") < md.index("| t0 |")  # sorted by val_loss, best first
    header = next(line for line in md.splitlines() if line.startswith("| trial |"))
    assert "| val_loss | kad |" in header


def test_report_without_audio_objective_plots_val_loss_only(tmp_path):
    summary = _summary(with_kad=False)
    assert objectives(summary) == ["val_loss"]
    paths = write_report(summary, str(tmp_path))
    w, h = Image.open(paths["adapter.preset"]).size
    assert w < 2 * h and _ink(paths["adapter.preset"]) > 0.02


def test_kad_selected_search_puts_kad_first():
    summary = dict(_summary(with_kad=True), metric="kad")
    assert objectives(summary) == ["kad", "val_loss"]
