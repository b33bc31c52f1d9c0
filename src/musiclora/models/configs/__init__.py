"""Published model configs shipped with musiclora, so real-size skeletons build offline.

Each folder mirrors the config files of a hub repository (`<owner>--<name>/config.json`, or one
sub-folder per component as in diffusers' layout), written from the values the repository
publishes. `config_dir(base)` returns the folder to hand to a family's `skeleton()` (which reads
`from_pretrained`-style config files from a local folder) when the hub cannot be reached: the
`--dry-run` of every shipped config and `bench/gpu_check.py` use them. No weights are shipped.

    facebook--musicgen-melody/config.json           MusicgenMelodyConfig: 48-layer 1536-wide decoder
                                                    (1.38 B), T5-base text encoder, 32 kHz EnCodec
    cvssp--audioldm-s-full-v2/{unet,vae,vocoder,text_encoder}/config.json
                                                    AudioLDM-S UNet (185 M), VAE, HiFi-GAN, CLAP text
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).parent


def config_dir(base: str) -> str | None:
    """The shipped config folder of hub id `base` (e.g. `facebook/musicgen-melody`), or None.

    Returns:
        An absolute folder path laid out like the hub repository's config files, or None when
        musiclora ships no config for `base`.
    """
    folder = ROOT / base.replace("/", "--")
    return str(folder) if "/" in base and folder.is_dir() else None


def shipped_bases() -> list[str]:
    """Hub ids whose configs are shipped (sorted)."""
    return sorted(p.name.replace("--", "/", 1) for p in ROOT.iterdir() if p.is_dir() and "--" in p.name)
