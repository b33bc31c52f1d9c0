"""Family name -> family object: a plain dict, no reflection strings."""

from __future__ import annotations

from musiclora.models.audioldm import AudioLDMFamily
from musiclora.models.audioldm2 import AudioLDM2Family
from musiclora.models.base import ModelFamily
from musiclora.models.musicgen import MusicgenMelodyFamily
from musiclora.models.stable_audio import StableAudioFamily

FAMILIES: dict[str, type[ModelFamily]] = {
    "musicgen-melody": MusicgenMelodyFamily,
    "audioldm": AudioLDMFamily,
    "audioldm2": AudioLDM2Family,
    "stable-audio-open": StableAudioFamily,
}


def get_family(name: str) -> ModelFamily:
    """Return the family registered under `name`.

    Raises:
        ValueError: unknown name; the message lists the known families.
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]()
