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
    cvssp--audioldm2-music/{unet,vae}/config.json   AudioLDM2-music UNet (346.9 M; the card says 350 M),
                                                    log-mel VAE (55.4 M)
    stabilityai--stable-audio-open-1.0/{transformer,vae}/config.json
                                                    Stable Audio Open DiT (1.057 B), Oobleck VAE (156.1 M)

Only the components a skeleton reads are shipped for the two newer bases (AudioLDM2: unet, vae;
Stable Audio Open: transformer, vae). Neither hub repository's own config.json was available
offline, so these two are written from the conversion that produced them, as follows.

cvssp--audioldm2-music/unet: diffusers `scripts/convert_original_audioldm2_to_diffusers.py`
(`create_unet_diffusers_config`, huggingface/diffusers 58eb52c) applied to the original model config,
`get_basic_config()` of haoheliu/AudioLDM2 `audioldm2/utils.py` (1712dec), which the music checkpoint
uses unchanged (`default_audioldm_config` only overrides "-large-" / "-speech-" names). Copied or
derived: block_out_channels = model_channels 128 x channel_mult [1, 2, 3, 5]; block types from
attention_resolutions [8, 4, 2]; layers_per_block = num_res_blocks 2; transformer_layers_per_block =
transformer_depth 1; in/out_channels 8. cross_attention_dim [[null, 768, 1024]] x 4: the original
UNet's `extra_sa_layer=True` adds a self-attention-only transformer before the 768 (GPT-2) and 1024
(T5) ones, as the script's DEFAULT_CONFIG `context_dim: [None, 768, 1024]` says; diffusers' AudioLDM2
blocks feed index 1 the GPT-2 states and index 2 the T5 states, so null comes first. Reconstructed:
sample_size 256 (the script's image_size 1024 // VAE factor 4), attention_head_dim 8 (the script sets
none: the class default; head counts change neither parameter count nor LoRA targets) and every other
key (class defaults, as `save_pretrained` writes them).

cvssp--audioldm2-music/vae: the same script's `create_vae_diffusers_config` on the original ddconfig
(ch 128, ch_mult [1, 2, 4], z_channels 8, in 1, out 1, num_res_blocks 2); sample_size 1024 is the
image_size default (reconstructed). `scaling_factor` is left out: the script takes the checkpoint's
learnt `scale_factor` (scale_by_std), which no available source states; a skeleton never reads it,
and a real load reads the hub's config.

stabilityai--stable-audio-open-1.0/transformer: diffusers `scripts/convert_stable_audio.py` applied to
the original stable-audio-tools `model_config.json` (as stored in yukara-ikemiya/friendly-stable-
audio-tools, `stable_audio_tools/configs/model_configs/txt2audio/stable_audio_open_1_0.json`):
sample_size = 2097152 / downsampling_ratio 2048 = 1024; in/out_channels = io_channels 64;
num_layers = depth 24; num_attention_heads 24; attention_head_dim = embed_dim 1536 / 24 = 64;
cross_attention_dim and cross_attention_input_dim = cond_token_dim 768; num_key_value_attention_heads
= 768 / 64 = 12; global_states_input_dim = global_cond_dim 1536; time_proj_dim 256 (fixed in the
script). All copied or derived; they equal `StableAudioDiTModel`'s defaults.

stabilityai--stable-audio-open-1.0/vae: the same script on the same config's pretransform:
encoder_hidden_size = encoder channels 128, downsampling_ratios = strides [2, 4, 4, 8, 8],
channel_multiples = c_mults [1, 2, 4, 8, 16], decoder_channels 128, decoder_input_channels = decoder
latent_dim 64, audio_channels = io_channels 2, sampling_rate 44100. All copied; they equal
`AutoencoderOobleck`'s defaults.
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
