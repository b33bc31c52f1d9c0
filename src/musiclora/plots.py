"""Pictures people would rather look at than numbers: loss curves and spectrograms (matplotlib, Agg)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def plot_losses(losses: list[float], path: str, title: str = "training loss", val: list | None = None) -> str:
    """Save a loss-per-step curve (raw, 5-step moving average, validation points) as PNG; returns `path`."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, alpha=0.4, label="loss")
    if len(losses) >= 5:
        ax.plot(steps[4:], np.convolve(losses, np.ones(5) / 5, mode="valid"), label="5-step mean")
    if val:
        ax.plot([v[0] for v in val], [v[1] for v in val], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_spectrogram(wav: np.ndarray, sample_rate: int, path: str, title: str = "") -> str:
    """Save a log-mel spectrogram (128 mel bins, dB) of a mono float waveform [L] as PNG; returns `path`."""
    import librosa
    import librosa.display

    mel = librosa.feature.melspectrogram(y=np.asarray(wav, np.float32), sr=sample_rate, n_mels=128)
    db = librosa.power_to_db(mel, ref=np.max(mel) if mel.max() > 0 else 1.0)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    img = librosa.display.specshow(db, sr=sample_rate, x_axis="time", y_axis="mel", ax=ax)
    fig.colorbar(img, ax=ax, format="%+2.0f dB")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
