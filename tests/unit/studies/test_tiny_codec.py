"""Fitting the tiny preset's EnCodec: k-means codebooks make the codes informative, the decoder loss falls."""

import itertools

import numpy as np
import pytest
import torch

from musiclora.models.musicgen import build_tiny_musicgen_melody
from musiclora.studies.tiny_codec import codebooks_degenerate, data_init, fit_codebooks, fit_decoder, kmeans

SR = 32000


def _clips(n: int, seconds: float = 0.4) -> torch.Tensor:
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(0)
    rows = [
        0.3 * np.sin(2 * np.pi * (110 * (i + 1)) * t) + 0.05 * rng.standard_normal(t.size) for i in range(n)
    ]
    return torch.from_numpy(np.stack(rows).astype(np.float32))


@pytest.fixture
def codec():
    return build_tiny_musicgen_melody(seed=0)[0].audio_encoder


def test_kmeans_finds_separated_blobs():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    points = torch.cat([c + 0.1 * torch.randn(50, 2, generator=gen) for c in centres])
    found = kmeans(points, 3, seed=1)
    assert torch.cdist(centres, found).min(dim=1).values.max() < 0.2
    with pytest.raises(ValueError, match="2 points for 3 centroids"):
        kmeans(points[:2], 3)


def test_zero_codebooks_are_degenerate_and_fitting_makes_codes_informative(codec):
    clips = _clips(6)
    for layer in codec.quantizer.layers:  # transformers' raw init: every entry zero, every frame code 0
        layer.codebook.embed.zero_()
    assert codebooks_degenerate(codec)
    with torch.no_grad():
        assert codec.encode(clips[:, None]).audio_codes.unique().tolist() == [0]
    stats = fit_codebooks(codec, clips, entries=16, iters=10)
    assert not codebooks_degenerate(codec)
    residual = stats["relative_residual"]
    assert len(residual) == 4 and all(a > b for a, b in itertools.pairwise(residual)) and residual[0] < 1
    with torch.no_grad():
        codes = codec.encode(clips[:, None]).audio_codes[0]  # [N, K, T]
    assert codes.max() < 16  # only the fitted entries are used
    assert len(codes[:, 0].unique()) > 4
    assert not torch.equal(codes[0], codes[-1])  # different audio, different codes
    with pytest.raises(ValueError, match="entries must be in"):
        fit_codebooks(codec, clips, entries=5000)


def test_fitted_codebooks_quantise_better_than_the_presets(codec):
    clips = _clips(6)
    with torch.no_grad():
        latents = codec.encoder(clips[:, None])
        before = (latents - codec.quantizer.decode(codec.quantizer.encode(latents))).norm()
        fit_codebooks(codec, clips, entries=16, iters=10)
        after = (latents - codec.quantizer.decode(codec.quantizer.encode(latents))).norm()
    assert after < 0.5 * before


def test_decoder_fit_lowers_its_reconstruction_loss(codec):
    clips = _clips(4, seconds=0.2)
    fit_codebooks(codec, clips, entries=8, iters=5)
    encoder_before = {k: v.clone() for k, v in codec.encoder.state_dict().items()}
    losses = fit_decoder(codec, clips, steps=8, batch_size=2, crop_s=0.06, lr=3e-3)
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    for k, v in codec.encoder.state_dict().items():
        assert torch.equal(v, encoder_before[k]), f"encoder weight {k} changed"


def test_data_init_makes_the_decoder_depend_on_its_input(codec):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 10, generator=gen)

    def input_share() -> float:
        with torch.no_grad():
            out, blank = codec.decoder(latents), codec.decoder(torch.zeros_like(latents))
        return float((out - blank).std() / out.std())

    assert input_share() < 0.1  # default init: the biases decide the output
    stds = data_init(codec.decoder, latents, out_std=0.2)
    assert len(stds) == 18  # every weight-normed conv of the tiny decoder
    with torch.no_grad():
        assert float(codec.decoder(latents).std()) == pytest.approx(0.2, rel=0.05)
    assert input_share() > 0.5


def _tones(freqs, seconds: float = 1.0) -> torch.Tensor:
    t = np.arange(int(seconds * SR)) / SR
    return torch.from_numpy(np.stack([0.3 * np.sin(2 * np.pi * f * t) for f in freqs]).astype(np.float32))


def test_mel_frames_change_slowly_and_need_fitting():
    from musiclora.studies.tiny_codec import MelFrames

    frames = MelFrames(SR, hop=640, dim=4)
    wavs = _tones([220, 880, 3000])
    with pytest.raises(RuntimeError, match="fit"):
        frames(wavs)
    assert 0.5 < frames.fit(wavs) <= 1.0
    z = frames(wavs)
    assert z.shape == (3, 4, SR // 640)
    # a steady tone gives (almost) the same frame throughout; different tones give different frames
    inner = z[..., 2:-2]
    assert float((inner - inner.mean(dim=-1, keepdim=True)).norm()) < 0.05 * float(inner.norm())
    assert float((inner[0] - inner[2]).norm(dim=0).min()) > 1.0


def test_mel_codec_codes_tell_tones_apart_and_feed_the_decoder(codec):
    from musiclora.studies.tiny_codec import fit_mel_codec, mel_codes

    wavs = _tones([220, 330, 1760, 2640])
    frames, stats = fit_mel_codec(codec, wavs, entries=4, decoder_steps=3, seed=0)
    assert stats["lag1_autocorrelation"] > 0.8 and len(stats["relative_residual"]) == 4
    codes = mel_codes(codec, frames, wavs)
    assert codes.shape == (4, 4, SR // 640) and codes.dtype == torch.int64
    low, high = set(codes[:2, 0, 2:-2].flatten().tolist()), set(codes[2:, 0, 2:-2].flatten().tolist())
    assert not low & high  # level 1 separates low from high tones
    audio = codec.decode(codes[:1, None], [None]).audio_values
    assert audio.shape[-1] == SR and torch.isfinite(audio).all()
