"""EnCodec-latent embedder on the real transformers EncodecModel (the tiny MusicGen-Melody's codec)."""

import numpy as np
import pytest
import torch
from torch import nn

from musiclora.eval.embeddings import Embedder, EncodecEmbedder, describe_embedder, load_encodec
from musiclora.eval.metrics import kad

SR = 32000


def _tone(freq_hz: float, seconds: float = 0.5, amp: float = 0.3, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (amp * np.sin(2 * np.pi * freq_hz * t) + 0.01 * noise).astype(np.float32)


@pytest.fixture(scope="module")
def codec():
    from musiclora.models.musicgen import build_tiny_musicgen_melody

    return build_tiny_musicgen_melody(seed=0)[0].audio_encoder


def test_encodec_embedding_shape_is_mean_and_std_of_the_encoder_latents(codec):
    emb = EncodecEmbedder(codec)
    assert isinstance(emb, Embedder) and emb.sample_rate == SR
    clips = [_tone(220), _tone(440, seconds=1.0)]
    out = emb(clips)
    d = codec.config.hidden_size
    assert out.shape == (2, 2 * d) and out.dtype == np.float32 and np.isfinite(out).all()
    with torch.no_grad():
        z = codec.encoder(torch.from_numpy(clips[1])[None, None])[0]  # [D, T]
    np.testing.assert_allclose(out[1, :d], z.mean(dim=1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1, d:], z.std(dim=1, unbiased=False).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out, emb(clips))  # deterministic


def test_encodec_kad_is_near_zero_for_one_set_and_larger_for_another(codec):
    emb = EncodecEmbedder(codec)
    tones = emb([_tone(f, seed=i) for i, f in enumerate((200, 250, 300, 350, 400, 450))])
    same = emb([_tone(f, seed=10 + i) for i, f in enumerate((200, 250, 300, 350, 400, 450))])
    noise = emb(
        [(0.3 * np.random.default_rng(i).standard_normal(SR // 2)).astype(np.float32) for i in range(6)]
    )
    assert abs(kad(tones, same)) < kad(tones, noise)


def test_normalising_codec_ignores_the_clip_level():
    from transformers import EncodecConfig, EncodecModel

    config = EncodecConfig(
        sampling_rate=SR,
        audio_channels=1,
        num_filters=4,
        num_residual_layers=1,
        upsampling_ratios=[8, 5, 4, 4],
        codebook_size=16,
        codebook_dim=8,
        hidden_size=8,
        num_lstm_layers=1,
        target_bandwidths=[2.2],
        normalize=True,
    )
    torch.manual_seed(0)
    emb = EncodecEmbedder(EncodecModel(config))
    quiet, loud = _tone(330, amp=0.05), _tone(330, amp=0.05) * 8
    out = emb([quiet, loud])
    np.testing.assert_allclose(out[0], out[1], rtol=1e-4, atol=1e-5)


def test_encodec_embedder_rejects_bad_input(codec):
    emb = EncodecEmbedder(codec)
    with pytest.raises(ValueError, match="wavs is empty"):
        emb([])
    with pytest.raises(ValueError, match=r"wavs\[0\] must be mono"):
        emb([np.zeros(100, np.float32)])  # shorter than one 640-sample hop
    with pytest.raises(ValueError, match="EncodecModel"):
        EncodecEmbedder(nn.Linear(2, 2))


def test_load_encodec_names_the_missing_model(tmp_path):
    with pytest.raises(ValueError, match="cannot load an EnCodec model from"):
        load_encodec(str(tmp_path / "nothing-here"))


def test_a_codec_folder_loads_through_from_pretrained_and_a_tiny_one_is_labelled_random(codec, tmp_path):
    codec.save_pretrained(tmp_path / "codec")
    emb = load_encodec(str(tmp_path / "codec"))
    clip = [_tone(220)]
    np.testing.assert_allclose(emb(clip), EncodecEmbedder(codec)(clip), rtol=1e-5, atol=1e-6)
    assert describe_embedder(emb) == {
        "name": f"encodec:{tmp_path / 'codec'}", "model": str(tmp_path / "codec"), "random_weights": True,
        "label": f"encodec ({tmp_path / 'codec'}; random — not a real score)",
    }
    real = EncodecEmbedder(codec, source="facebook/encodec_32khz", random_weights=False)
    assert describe_embedder(real)["label"] == "encodec (facebook/encodec_32khz)"


class _Seen(Exception):
    """Raised by a forward pre-hook once it has seen the device of the codec's input."""


@pytest.mark.parametrize("use", ["embedder", "codes_decoder"])
def test_codec_inputs_go_to_the_codecs_device(use):
    """A base evaluated on a GPU keeps its codec there: the embedder and the reference decoder move
    their inputs to it (the `meta` device stands in: a CPU tensor left behind would not be on it)."""
    from musiclora.eval.evaluate import codes_decoder
    from musiclora.models.musicgen import build_tiny_musicgen_melody

    meta_codec = build_tiny_musicgen_melody(seed=0)[0].audio_encoder.to("meta")
    seen = []

    def hook(_module, args):
        seen.append(args[0].device.type)
        raise _Seen

    if use == "embedder":
        meta_codec.encoder.register_forward_pre_hook(hook)
        call = lambda: EncodecEmbedder(meta_codec)([_tone(220)])
    else:
        meta_codec.quantizer.decode = lambda codes: hook(None, (codes,))  # the first to see the codes
        codes = np.zeros((len(meta_codec.quantizer.layers), 8), np.int64)  # [K, T]
        call = lambda: codes_decoder(meta_codec)(codes)
    with pytest.raises(_Seen):
        call()
    assert seen == ["meta"]
