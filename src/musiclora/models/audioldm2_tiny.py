"""The `tiny` AudioLDM2 preset: the real classes (diffusers AudioLDM2UNet2DConditionModel,
AudioLDM2ProjectionModel, AutoencoderKL, DDIMScheduler; transformers ClapModel, T5EncoderModel,
GPT2Model, SpeechT5HifiGan) from small configs with random weights, no hub access.

It keeps what shapes the data path of `cvssp/audioldm2-music`: 16 kHz audio, 64-band log-mel at
hop 160, a VAE that down-samples time and frequency by 4 into 8 latent channels, a UNet that
cross-attends to GPT-2's 8 generated states and to the T5 states, the DDIM noise schedule, a
HiFi-GAN that up-samples by 160. Tokenizers: CLAP's RoBERTa BPE trained locally
(`models/clap.py`), T5 from an in-memory vocabulary (`models/tiny_tokenizer.py`).
"""

from __future__ import annotations

import torch

from musiclora.models.audioldm2_components import MAX_NEW_TOKENS, AudioLDM2, AudioLDM2Tokenizers
from musiclora.models.audioldm_components import N_MELS, SAMPLE_RATE
from musiclora.models.audioldm_tiny import AUDIOLDM_SCHEDULER

GPT_DIM = 16
T5_DIM = 32


def build_tiny_audioldm2(seed: int = 0):
    """Build the tiny preset.

    Args:
        seed: weight seed; equal seeds give identical models (the global RNG is left untouched).

    Returns:
        (`AudioLDM2` in eval mode with `extras["source"]` = {"base": "tiny"}, `AudioLDM2Tokenizers`).
    """
    from diffusers import (
        AudioLDM2ProjectionModel,
        AudioLDM2UNet2DConditionModel,
        AutoencoderKL,
        DDIMScheduler,
    )
    from transformers import (
        ClapTextModelWithProjection,
        GPT2Config,
        GPT2Model,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        T5Config,
        T5EncoderModel,
    )

    from musiclora.models.clap import build_tiny_clap
    from musiclora.models.tiny_tokenizer import build_t5_tokenizer

    clap = build_tiny_clap(seed=seed, sample_rate=48000, max_length_s=1)
    t5_tok = build_t5_tokenizer()
    t5_tok.model_max_length = 64
    clap_dim = int(clap.model.config.projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = AudioLDM2UNet2DConditionModel(
            sample_size=64, in_channels=8, out_channels=8, layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(8, 16, 32), cross_attention_dim=[[None, GPT_DIM, T5_DIM]] * 3, attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=1, out_channels=1, latent_channels=8, layers_per_block=1, norm_num_groups=4,
            down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
            block_out_channels=[8, 16, 16], mid_block_add_attention=False, scaling_factor=1.0,
        )
        t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=T5_DIM, d_kv=8, d_ff=64, num_layers=2,
                                     num_heads=4))
        gpt = GPT2Model(GPT2Config(n_embd=GPT_DIM, n_head=2, n_layer=2, vocab_size=64, n_positions=128,
                                    bos_token_id=0, eos_token_id=0))
        gpt.config.max_new_tokens = MAX_NEW_TOKENS
        projection = AudioLDM2ProjectionModel(text_encoder_dim=clap_dim, text_encoder_1_dim=T5_DIM,
                                              langauge_model_dim=GPT_DIM)
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
    model = AudioLDM2(unet, vae, text_encoder.eval(), t5.eval(), projection.eval(), gpt.eval(), vocoder,
                      DDIMScheduler(**AUDIOLDM_SCHEDULER))
    model.extras["source"] = {"base": "tiny", "revision": None}
    model.extras["clap"] = clap.model.eval()
    return model.eval(), AudioLDM2Tokenizers(clap.tokenizer, t5_tok, clap.feature_extractor)
