"""The `tiny` AudioLDM preset: the real classes (diffusers UNet2DConditionModel, AutoencoderKL,
DDIMScheduler; transformers CLAP and SpeechT5HifiGan) from small configs with random weights.

It keeps what shapes the data path of `cvssp/audioldm-s-full-v2`: 16 kHz audio, 64-band log-mel
at hop 160, a VAE that down-samples time and frequency by 4 into 8 latent channels, the UNet's
class-embedding conditioning on an L2-normalised CLAP embedding (concatenated to the time
embedding), AudioLDM's DDIM noise schedule, and a HiFi-GAN that up-samples by 160. It shrinks
widths and depths (about 0.4 M parameters in all). The CLAP text and audio towers come from one
tiny `ClapModel` (`musiclora.eval.embeddings.build_tiny_clap`, its locally trained RoBERTa BPE
tokenizer), so text and audio embeddings share a space as in the real CLAP.
"""

from __future__ import annotations

import torch

from musiclora.models.audioldm_components import N_MELS, SAMPLE_RATE, AudioLDM

AUDIOLDM_SCHEDULER = {
    "num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0195, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
}
"""cvssp/audioldm-s-full-v2's scheduler_config.json (AudioLDM's linear_start/linear_end)."""


def build_tiny_audioldm(seed: int = 0):
    """Build the tiny preset.

    Args:
        seed: weight seed; equal seeds give identical models (the global RNG is left untouched).

    Returns:
        (`AudioLDM` in eval mode with `extras["clap_audio"]` set to the tiny CLAP audio embedder and
        `extras["source"]` = {"base": "tiny"}, the CLAP tokenizer).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import ClapTextModelWithProjection, SpeechT5HifiGan, SpeechT5HifiGanConfig

    from musiclora.models.clap import ClapAudioEmbedder, build_tiny_clap

    clap = build_tiny_clap(seed=seed, sample_rate=SAMPLE_RATE, max_length_s=1)
    dim = int(clap.model.config.projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=8, out_channels=8, layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16, 32), cross_attention_dim=(8, 16, 32), attention_head_dim=8,
            class_embed_type="simple_projection", projection_class_embeddings_input_dim=dim,
            class_embeddings_concat=True,
        )
        vae = AutoencoderKL(
            in_channels=1, out_channels=1, latent_channels=8, layers_per_block=1, norm_num_groups=4,
            down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
            block_out_channels=[8, 16, 16], mid_block_add_attention=False, scaling_factor=1.0,
        )
        vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(
            model_in_dim=N_MELS, sampling_rate=SAMPLE_RATE, upsample_initial_channel=32,
            upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[10, 8, 4, 4, 4],
            resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]], normalize_before=False,
            initializer_range=0.18,  # audible output from random weights (the default 0.01 gives ~1e-10 peaks)
        ))
    text_encoder = ClapTextModelWithProjection(clap.model.config.text_config)
    own = {k: v for k, v in clap.model.state_dict().items() if k.startswith(("text_model.", "text_projection."))}
    missing, unexpected = text_encoder.load_state_dict(own, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise RuntimeError(f"tiny CLAP text tower does not fit ClapTextModelWithProjection: {missing} {unexpected}")
    model = AudioLDM(unet, vae, text_encoder.eval(), vocoder, DDIMScheduler(**AUDIOLDM_SCHEDULER))
    model.extras["clap_audio"] = ClapAudioEmbedder(clap.model, clap.feature_extractor, name="clap-tiny")
    model.extras["source"] = {"base": "tiny", "revision": None}
    return model.eval(), clap.tokenizer
