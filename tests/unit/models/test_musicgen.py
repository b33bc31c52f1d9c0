"""MusicGen-Melody family: delay-pattern layout, loss, tiny preset, generation."""

import numpy as np
import pytest
import torch

from musiclora.models.base import GenerationRequest, Segment
from musiclora.models.families import get_family
from musiclora.models.musicgen import codes_to_delayed, delayed_to_codes


@pytest.fixture(scope="module")
def fam():
    return get_family("musicgen-melody")


@pytest.fixture(scope="module")
def loaded(fam):
    return fam.load("tiny")


def test_delay_pattern_matches_transformers_generation_layout(loaded):
    """Our teacher-forcing layout is the one transformers' build_delay_pattern_mask generates into."""
    b, k, t = 2, 4, 6
    pad = 2048
    codes = torch.randint(0, 2048, (b, k, t))
    delayed, dvalid = codes_to_delayed(codes, torch.ones(b, t, dtype=torch.bool), pad)
    # transformers: prompt = [BOS] then the codes; positions it would keep from the prompt
    prompt = torch.cat([torch.full((b, k, 1), pad), codes], dim=-1).reshape(b * k, t + 1)
    ids, mask = loaded.model.decoder.build_delay_pattern_mask(prompt, pad, max_length=t + k + 1)
    hf = mask.reshape(b, k, -1)[..., : t + k + 1]
    known = hf != -1  # -1: frames past T that generation would go on to predict; ours hold padding there
    assert known.float().mean() > 0.8
    assert torch.equal(hf[known], delayed[known])
    assert (delayed[~known] == pad).all()
    assert torch.equal(delayed_to_codes(delayed, t), codes)
    assert int(dvalid.sum()) == b * k * t


def test_padded_frames_are_masked(fam):
    codes = torch.randint(0, 2048, (1, 4, 5))
    valid = torch.tensor([[True, True, True, False, False]])
    delayed, dvalid = codes_to_delayed(codes, valid, 2048)
    assert int(dvalid.sum()) == 4 * 3
    with pytest.raises(ValueError, match="valid"):
        codes_to_delayed(codes, valid[:, :3], 2048)


def _batch(fam, loaded, n=2, seconds=2.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 32000)) / 32000
    segs = [
        Segment(key=f"s{i}", audio=(0.3 * np.sin(2 * np.pi * 220 * (i + 1) * t) + 0.01 * rng.standard_normal(t.size))
                .astype(np.float32), num_valid=t.size, caption="calm piano melody")
        for i in range(n)
    ]
    import io

    raw = fam.encode_segments(loaded, segs)
    dec = [{"codes.npy": np.load(io.BytesIO(s["codes.npy"])), "chroma.npy": np.load(io.BytesIO(s["chroma.npy"])),
            "json": s["json"]} for s in raw]
    return fam.collate(dec, loaded), dec


def test_encode_collate_shapes(fam, loaded):
    batch, dec = _batch(fam, loaded)
    assert dec[0]["codes.npy"].shape == (4, 100)  # K=4 codebooks, 50 Hz x 2 s
    assert dec[0]["chroma.npy"].shape[1] == 12 and set(np.unique(dec[0]["chroma.npy"])) <= {0, 1}
    assert batch["codes"].shape == (2, 4, 100) and batch["codes"].dtype == torch.int64
    assert batch["valid"].all()


def test_initial_loss_is_near_uniform_and_falls_on_one_batch(fam, loaded):
    batch, _ = _batch(fam, loaded)
    model = fam.load("tiny").model.train()
    loss0 = fam.loss(model, batch)
    assert abs(loss0.item() - np.log(2048)) < 0.5  # random init: about ln(vocab)
    opt = torch.optim.AdamW(model.decoder.parameters(), lr=3e-3)
    for _ in range(15):
        loss = fam.loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fam.loss(model, batch).item() < loss0.item() - 0.5


def test_generate_length_and_seed(fam, loaded):
    a, sr = fam.generate(loaded.model, loaded.tokenizer, GenerationRequest("epic orchestral", 0.5, seed=1))
    b, _ = fam.generate(loaded.model, loaded.tokenizer, GenerationRequest("epic orchestral", 0.5, seed=1))
    assert sr == 32000 and a.shape == (16000,) and np.array_equal(a, b)
    melody = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000).astype(np.float32)
    c, _ = fam.generate(loaded.model, loaded.tokenizer, GenerationRequest("epic orchestral", 0.5, seed=1,
                                                                      melody=melody, melody_sample_rate=16000))
    assert c.shape == a.shape


def test_melody_chroma_conditions_the_decoder(loaded):
    from musiclora.models.chroma import melody_chroma

    text = loaded.tokenizer(["epic"], return_tensors="pt")
    ids = torch.full((4, 3), 2048)
    tone = lambda f: melody_chroma(np.sin(2 * np.pi * f * np.arange(32000) / 32000).astype(np.float32)[None])
    with torch.no_grad():
        a = loaded.model(**text, input_features=tone(440.0), decoder_input_ids=ids).logits
        b = loaded.model(**text, input_features=tone(261.63), decoder_input_ids=ids).logits
    assert tone(440.0)[0].argmax(-1).mode().values.item() == 9  # A
    assert (a - b).abs().max() > 1e-4


def test_tiny_saves_as_a_plain_transformers_folder(tiny_musicgen_dir):
    from transformers import AutoTokenizer, MusicgenMelodyForConditionalGeneration

    model = MusicgenMelodyForConditionalGeneration.from_pretrained(tiny_musicgen_dir)
    tok = AutoTokenizer.from_pretrained(tiny_musicgen_dir)
    assert model.config.decoder.num_codebooks == 4 and len(tok("orchestral music")["input_ids"]) > 1


def test_unknown_base_is_a_clear_error(fam, tmp_path):
    with pytest.raises(ValueError, match="cannot load MusicGen-Melody base"):
        fam.load(str(tmp_path / "no-such-model"))


def test_heads_preset_resolves_to_every_output_head_and_block_layer(fam):
    from musiclora.adapters import apply_lora, check_targets, matching_modules
    from musiclora.config import AdapterConfig

    model = fam.load("tiny").model
    cfg = AdapterConfig(preset="attn+ffn+heads", r=4)
    names = matching_modules(model, check_targets(model, fam, cfg))
    heads = sorted(n for n in names if ".lm_heads." in n)
    assert heads == [f"decoder.lm_heads.{k}" for k in range(model.config.decoder.num_codebooks)]
    assert set(matching_modules(model, fam.target_modules("attn+ffn"))) < set(names)
    peft_model = apply_lora(model, fam, cfg)
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trained)
    assert any(".lm_heads.3.lora_B" in n for n in trained) and any(".fc2.lora_A" in n for n in trained)


def test_tiny_preset_sizes_codebook_and_chroma_together(fam, tmp_path):
    """A 64-entry tiny preset: codec, LM vocabulary, pad id and chroma length agree end to end."""
    from musiclora.models.musicgen import build_tiny_musicgen_melody

    sized = fam.load(fam.save_tiny(str(tmp_path / "t64"), seed=0, codebook_size=64, chroma_length=30))
    model = sized.model
    assert model.config.audio_encoder.codebook_size == 64 and model.config.chroma_length == 30
    assert model.config.decoder.vocab_size == 64 and model.config.decoder.pad_token_id == 64
    assert model.generation_config.pad_token_id == 64
    assert all(head.out_features == 64 for head in model.decoder.lm_heads)
    batch, _ = _batch(fam, sized)
    assert int(batch["codes"].max()) < 64 and fam.feature_spec(sized)["codebook_size"] == 64
    assert abs(fam.loss(model.train(), batch).item() - np.log(64)) < 0.5  # random init: ln(vocab)
    melody = np.sin(2 * np.pi * 440 * np.arange(32000) / 32000).astype(np.float32)
    audio, sr = fam.generate(model.eval(), sized.tokenizer,
                             GenerationRequest("epic", 1.0, seed=1, melody=melody, melody_sample_rate=32000))
    assert sr == 32000 and audio.shape == (32000,) and np.isfinite(audio).all()
    with pytest.raises(ValueError, match="codebook_size must be >= 2"):
        build_tiny_musicgen_melody(codebook_size=1)
