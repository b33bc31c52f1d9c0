"""Mixed-adapter batches: a request gives the same audio alone and inside a batch of 8 requests for
different adapters (and the base), seeds, guidance scales and durations, in fp32 on CPU; a row's
adapter is the adapter the ordinary attach path runs; adapters do change the audio."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from musiclora.models.base import GenerationRequest
from musiclora.models.batching import BASE_ROW, row_adapters
from musiclora.models.families import get_family
from tests.serve_helpers import make_random_adapter

NAMES = ["a1", "a2", BASE_ROW, "a3", "a1", BASE_ROW, "a2", "a3"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["musicgen-melody", "audioldm"])
def world(request, tmp_path_factory):
    torch.set_num_threads(1)
    fam = get_family(request.param)
    loaded = fam.load("tiny")
    model = loaded.model
    for seed in (1, 2, 3):
        folder = make_random_adapter("tiny", str(tmp_path_factory.mktemp(f"a{seed}")), seed, family=request.param)
        model = fam.attach_adapter(model, folder, f"a{seed}")
    return fam, model, loaded.tokenizer


def _requests(fam) -> list[GenerationRequest]:
    sr = 32_000 if fam.name == "musicgen-melody" else 16_000
    t = np.arange(sr // 2) / sr
    melody = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    durations = [0.3, 0.5, 0.3, 0.4, 0.5, 0.3, 0.4, 0.3]
    prompts = ["calm piano", "epic orchestral strings with choir", "", "lofi beat", "calm piano", "jazz", "x", "folk"]
    return [
        GenerationRequest(p, d, guidance_scale=1.0 if i == 3 else 3.0 + i % 2, seed=10 + i, steps=4,
                          melody=melody if i == 6 else None, melody_sample_rate=sr if i == 6 else None)
        for i, (p, d) in enumerate(zip(prompts, durations))
    ]


def test_a_request_gives_the_same_audio_alone_and_in_a_mixed_batch(world):
    fam, model, tok = world
    reqs = _requests(fam)
    batch = fam.generate_batch(model, tok, reqs, NAMES)
    for i, (req, name) in enumerate(zip(reqs, NAMES)):
        alone = fam.generate_batch(model, tok, [req], [name])[0]
        assert not isinstance(alone, Exception) and not isinstance(batch[i], Exception), (alone, batch[i])
        assert alone[0].shape == batch[i][0].shape == (round(req.duration_s * fam.sample_rate),)
        assert np.abs(alone[0] - batch[i][0]).max() <= 1e-4, f"row {i} ({name}) differs inside the batch"


def test_musicgen_samples_the_same_codes_alone_and_in_the_batch(world):
    fam, model, tok = world
    if fam.name != "musicgen-melody":
        pytest.skip("codes are MusicGen's")
    from musiclora.models.musicgen import MAX_TEXT_TOKENS, _unwrap
    from musiclora.models.musicgen_sampling import sample_codes

    reqs = _requests(fam)
    kw = {"frame_rate": fam.frame_rate(_unwrap(model)), "sample_rate": fam.sample_rate, "text_tokens": MAX_TEXT_TOKENS}
    batch = sample_codes(_unwrap(model), fam.lora_root(model), tok, reqs, NAMES, **kw)
    for i, (req, name) in enumerate(zip(reqs, NAMES)):
        alone = sample_codes(_unwrap(model), fam.lora_root(model), tok, [req], [name], **kw)[0]
        assert torch.equal(alone, batch[i]), f"row {i} ({name}) sampled other codes inside the batch"


def test_a_row_runs_its_adapter_as_the_attach_path_does_and_adapters_matter(world):
    fam, model, tok = world
    req = _requests(fam)[1]
    root = fam.lora_root(model)
    per_row = {name: fam.generate_batch(model, tok, [req], [name])[0][0] for name in ("a1", "a2", BASE_ROW)}
    root.set_adapter("a2")
    np.testing.assert_allclose(fam.generate(model, tok, req)[0], per_row["a2"], atol=1e-5)
    with root.disable_adapter():
        np.testing.assert_allclose(fam.generate(model, tok, req)[0], per_row[BASE_ROW], atol=1e-5)
    assert np.abs(per_row["a1"] - per_row["a2"]).max() > 1e-3
    assert np.abs(per_row["a1"] - per_row[BASE_ROW]).max() > 1e-3


def test_unknown_row_adapter_is_refused_naming_it(world):
    fam, model, tok = world
    out = fam.generate_batch(model, tok, _requests(fam)[:2], ["a1", "nope"])
    assert isinstance(out[1], ValueError) and "nope" in str(out[1])
    with pytest.raises(ValueError, match="no adapter attached"), row_adapters(torch.nn.Linear(2, 2), ["a1"]):
        pass
