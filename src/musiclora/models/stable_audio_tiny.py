"""The `tiny` Stable Audio Open preset: the real classes (diffusers StableAudioDiTModel,
AutoencoderOobleck, StableAudioProjectionModel; transformers T5EncoderModel) from small configs
with random weights, no hub access.

It keeps what shapes the data path of `stabilityai/stable-audio-open-1.0`: 44.1 kHz stereo audio,
an Oobleck VAE that down-samples by 2048 (21.5 latent frames per second), timing conditioning on
seconds_start / seconds_total (0-512 s), the DiT's cross-attention to [T5 states; start; total]
and its global condition [start, total], the v-objective noise schedule of the scheduler config.
It shrinks widths and depths; the DiT window is 128 latent frames (5.9 s) instead of 1024 (47.6 s).
"""

from __future__ import annotations

import torch

from musiclora.models.stable_audio_components import SAMPLE_RATE, StableAudio

SCHEDULER_CONFIG = {
    "_class_name": "CosineDPMSolverMultistepScheduler", "sigma_min": 0.3, "sigma_max": 500.0, "sigma_data": 1.0,
    "sigma_schedule": "exponential", "num_train_timesteps": 1000, "solver_order": 2,
    "prediction_type": "v_prediction", "rho": 7.0, "solver_type": "midpoint", "final_sigmas_type": "zero",
}
"""stabilityai/stable-audio-open-1.0's scheduler/scheduler_config.json (v-objective, sigma 0.3-500)."""
T5_DIM = 32
COND_DIM = 16


def build_tiny_stable_audio(seed: int = 0):
    """Build the tiny preset.

    Args:
        seed: weight seed; equal seeds give identical models (the global RNG is left untouched).

    Returns:
        (`StableAudio` in eval mode with `extras["source"]` = {"base": "tiny"}, the T5 tokenizer).
    """
    from diffusers import AutoencoderOobleck, StableAudioDiTModel, StableAudioProjectionModel
    from transformers import T5Config, T5EncoderModel

    from musiclora.models.tiny_tokenizer import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    tokenizer.model_max_length = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = StableAudioDiTModel(
            sample_size=128, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
            num_key_value_attention_heads=2, out_channels=4, cross_attention_dim=32, time_proj_dim=16,
            global_states_input_dim=2 * COND_DIM, cross_attention_input_dim=COND_DIM,
        )
        vae = AutoencoderOobleck(
            encoder_hidden_size=8, downsampling_ratios=[2, 4, 4, 8, 8], channel_multiples=[1, 1, 2, 2, 4],
            decoder_channels=4, decoder_input_channels=4, audio_channels=2, sampling_rate=SAMPLE_RATE,
            # latent channels = encoder_hidden_size / 2 (mean and scale), as 128 -> 64 at real size
        )
        text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=T5_DIM, d_kv=8, d_ff=64,
                                               num_layers=2, num_heads=4))
        projection = StableAudioProjectionModel(text_encoder_dim=T5_DIM, conditioning_dim=COND_DIM, min_value=0,
                                                max_value=512)
    model = StableAudio(transformer, vae, text_encoder.eval(), projection.eval(), dict(SCHEDULER_CONFIG))
    model.extras["source"] = {"base": "tiny", "revision": None}
    return model.eval(), tokenizer
