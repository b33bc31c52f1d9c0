"""Evaluation metrics: distribution distances (KAD, FAD), per-clip distances, music-theory metrics, embedders.

The CLAP model itself lives in `musiclora.models.clap` (AudioLDM needs it); its names are
reachable here too. `metrics` and `music` need only numpy/scipy/librosa and are imported here; the
embedders (`embeddings`, which imports torch and transformers) load on first use.
"""

from musiclora.eval.metrics import (
    KAD_SCALE,
    audio_feature_distance,
    chroma_cosine,
    clap_score,
    fad,
    kad,
    log_mel,
    median_pairwise_distance,
    mel_mse,
)
from musiclora.eval.music import (
    best_key,
    detected_pitches,
    harmonic_accuracy,
    melodic_complexity,
    rhythmic_inconsistency,
)

_EMBEDDING_NAMES = {
    "Embedder",
    "MelStatsEmbedder",
    "CrepeEmbedder",
    "ClapAudioEmbedder",
    "ClapTextEmbedder",
    "ClapBundle",
    "EncodecEmbedder",
    "load_encodec",
    "build_tiny_clap",
    "load_clap",
    "build_embedder",
    "describe_embedder",
    "describe_clap",
    "EMBEDDERS",
}

__all__ = [
    "EMBEDDERS",
    "KAD_SCALE",
    "ClapAudioEmbedder",
    "ClapBundle",
    "ClapTextEmbedder",
    "CrepeEmbedder",
    "Embedder",
    "EncodecEmbedder",
    "MelStatsEmbedder",
    "audio_feature_distance",
    "best_key",
    "build_embedder",
    "build_tiny_clap",
    "chroma_cosine",
    "clap_score",
    "describe_clap",
    "describe_embedder",
    "detected_pitches",
    "fad",
    "harmonic_accuracy",
    "kad",
    "load_clap",
    "load_encodec",
    "log_mel",
    "median_pairwise_distance",
    "mel_mse",
    "melodic_complexity",
    "rhythmic_inconsistency",
]


def __getattr__(name: str):
    """Import the embedders lazily (torch, transformers) when one of their names is asked for."""
    if name in _EMBEDDING_NAMES:
        from musiclora.eval import embeddings
        from musiclora.models import clap

        return getattr(embeddings, name) if hasattr(embeddings, name) else getattr(clap, name)
    raise AttributeError(f"module 'musiclora.eval' has no attribute {name!r}")
