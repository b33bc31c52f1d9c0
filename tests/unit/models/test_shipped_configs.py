"""The configs shipped for AudioLDM2-music and Stable Audio Open 1.0 (`musiclora.models.configs`)
build real-size skeletons on the meta device, of the published sizes, and their conditioning
inputs fit: a meta forward pass takes the shapes the families feed them."""

from __future__ import annotations

import pytest
import torch

from musiclora.models.base import Loaded
from musiclora.models.configs import config_dir, shipped_bases
from musiclora.models.families import get_family


def _skeleton(family: str, base: str):
    assert base in shipped_bases()
    return get_family(family).skeleton(config_dir(base))


def _millions(module: torch.nn.Module) -> float:
    assert all(p.device.type == "meta" for p in module.parameters())
    return sum(p.numel() for p in module.parameters()) / 1e6


def test_audioldm2_music_unet_is_350m_and_takes_gpt2_then_t5_states():
    skel = _skeleton("audioldm2", "cvssp/audioldm2-music")
    assert 340 < _millions(skel.unet) < 355  # the model card: UNet 350 M (AudioLDM 2 paper: 346 M)
    assert 50 < _millions(skel.vae) < 60
    family = get_family("audioldm2")
    spec = family.feature_spec(Loaded(skel, None, "cvssp/audioldm2-music", family.name))
    assert spec["frame_rate"] == 25.0 and spec["latent_channels"] == 8 and spec["vae_scale_factor"] == 4
    frames = round(family.default_segment_s * spec["frame_rate"])  # 10.24 s -> latents [8, 256, 16]
    with torch.device("meta"):  # index 1 of each block attends to GPT-2 (768), index 2 to T5 (1024)
        out = skel.unet(torch.zeros(2, 8, frames, 64 // 4), torch.zeros(2),
                        encoder_hidden_states=torch.zeros(2, 8, 768),
                        encoder_hidden_states_1=torch.zeros(2, 20, 1024),
                        encoder_attention_mask_1=torch.ones(2, 20)).sample
    assert out.shape == (2, 8, 256, 16)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_stable_audio_open_dit_is_1_06b_over_the_47_s_window():
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    skel = _skeleton("stable-audio-open", "stabilityai/stable-audio-open-1.0")
    assert 1050 < _millions(skel.transformer) < 1065  # stable-audio-open-1.0's DiT: 1.06 B
    assert 150 < _millions(skel.vae) < 160
    config = skel.transformer.config
    family = get_family("stable-audio-open")
    assert skel.hop_length == 2048
    assert config.sample_size * skel.hop_length / 44_100 == pytest.approx(family.default_segment_s, abs=0.01)
    rotary = tuple(r.to("meta") for r in get_1d_rotary_pos_embed(
        config.attention_head_dim // 2, config.sample_size + 1, use_real=True, repeat_interleave_real=False))
    with torch.device("meta"):  # cross input: 128 T5-base tokens + 2 timing tokens; global: [start, total]
        out = skel.transformer(torch.zeros(1, 64, config.sample_size), torch.zeros(1),
                               encoder_hidden_states=torch.zeros(1, 130, 768),
                               global_hidden_states=torch.zeros(1, 1, 1536), rotary_embedding=rotary).sample
    assert out.shape == (1, 64, 1024)
