"""MusicGen-Melody training matches its sampling: condition dropout, zero chroma on padding, melody_path."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from musiclora.models.base import Segment
from musiclora.models.chroma import null_chroma, zero_padded_chroma
from musiclora.models.families import get_family
from musiclora.models.musicgen import MusicgenOptions, drop_conditions

SR = 32000


@pytest.fixture(scope="module")
def loaded():
    return get_family("musicgen-melody").load("tiny")


def _tone(hz: float, seconds: float, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.4 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def _decode(samples):
    return [{"codes.npy": np.load(io.BytesIO(s["codes.npy"])), "chroma.npy": np.load(io.BytesIO(s["chroma.npy"])),
             "json": s["json"]} for s in samples]


def test_padded_tail_gets_zero_chroma_not_a_c(loaded):
    fam = get_family("musicgen-melody")
    audio = np.zeros(4 * SR, np.float32)
    audio[: SR] = _tone(440.0, 1.0)  # 1 s of A, then 3 s of zero padding
    (sample,) = _decode(fam.encode_segments(loaded, [Segment("a", audio, SR, "a tone")]))
    chroma = sample["chroma.npy"]
    frames = np.arange(chroma.shape[0]) * 4096
    assert chroma[frames < SR].sum(axis=1).min() == 1  # real audio: one-hot rows
    assert chroma[frames >= SR].sum() == 0  # padding: all-zero rows (was one-hot C)
    assert chroma[frames < SR - 4096].argmax(axis=1).tolist() == [9] * int((frames < SR - 4096).sum())  # A


def test_collate_zeroes_padding_chroma_of_older_shards(loaded):
    fam = get_family("musicgen-melody")
    old = {"codes.npy": np.zeros((4, 200), np.int16), "chroma.npy": null_chroma(32).numpy().astype(np.uint8),
           "json": {"caption": "x", "num_frames": 50}}  # 1 s valid of 4 s, padding stored as one-hot C
    batch = fam.collate([old], loaded)
    centres = torch.arange(32) * 4096
    assert batch["chroma"][0, centres < SR].sum() == int((centres < SR).sum())
    assert batch["chroma"][0, centres >= SR].sum() == 0


def test_zero_padded_chroma_checks_shapes():
    with pytest.raises(ValueError, match="valid_samples"):
        zero_padded_chroma(torch.zeros(2, 5, 12), torch.tensor([1]))


def test_drop_conditions_rates_and_null_values():
    torch.manual_seed(0)
    b = 4000
    mask = torch.ones(b, 7, dtype=torch.long)
    chroma = torch.zeros(b, 9, 12)
    chroma[:, :, 4] = 1
    new_mask, new_chroma = drop_conditions(mask, chroma, MusicgenOptions(cond_dropout=0.2, melody_dropout=0.5))
    text_dropped = new_mask.sum(1) == 0
    melody_dropped = (new_chroma[:, :, 0] == 1).all(1)
    assert abs(text_dropped.float().mean().item() - 0.2) < 0.03
    assert abs(melody_dropped.float().mean().item() - (0.2 + 0.8 * 0.5)) < 0.03
    assert bool(melody_dropped[text_dropped].all())  # dropping all conditions drops the melody too
    assert torch.equal(new_chroma[melody_dropped][0], null_chroma(9))
    assert torch.equal(new_chroma[~melody_dropped], chroma[~melody_dropped])
    assert mask.sum() == b * 7 and chroma[:, :, 4].all()  # inputs untouched
    none_mask, none_chroma = drop_conditions(mask, chroma, MusicgenOptions(cond_dropout=0.0, melody_dropout=0.0))
    assert torch.equal(none_mask, mask) and torch.equal(none_chroma, chroma)


def _no_dropout_layers(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def test_training_loss_sees_the_null_condition_guidance_uses(loaded):
    """With condition dropout near 1, the training loss is the loss on guidance's null branch."""
    fam = get_family("musicgen-melody").configure({"cond_dropout": 0.999, "melody_dropout": 0.0})
    model = fam.load("tiny").model
    _no_dropout_layers(model)
    segs = [Segment(f"s{i}", _tone(220.0 * (i + 1), 2.0), 2 * SR, "calm piano melody") for i in range(2)]
    batch = fam.collate(_decode(fam.encode_segments(loaded, segs)), loaded)
    torch.manual_seed(1)
    train_loss = fam.loss(model.train(), batch)
    null = dict(batch, attention_mask=torch.zeros_like(batch["attention_mask"]),
                chroma=null_chroma(batch["chroma"].shape[1])[None].expand_as(batch["chroma"]).clone())
    with torch.no_grad():
        null_loss = fam.loss(model.eval(), null)
        cond_loss = fam.loss(model.eval(), batch)
    assert torch.allclose(train_loss, null_loss, atol=1e-5)
    assert not torch.allclose(null_loss, cond_loss, atol=1e-4)  # the condition matters to the model


def test_options_are_validated_by_name():
    with pytest.raises(ValueError, match="model.options.cond_dropout"):
        get_family("musicgen-melody").configure({"cond_dropout": 1.5})
    with pytest.raises(ValueError, match="model.options.nope"):
        get_family("musicgen-melody").configure({"nope": 1})


def test_melody_path_conditions_instead_of_the_mix(loaded, tmp_path):
    """A sung / hummed take in `melody_path` gives the chroma; the mix gives the codes."""
    fam = get_family("musicgen-melody")
    mix = _tone(261.63, 3.0)  # C4
    melody_file = tmp_path / "hum.wav"
    sf.write(melody_file, np.concatenate([np.zeros(SR // 2, np.float32), _tone(392.0, 3.0)]), SR)  # G4 from 0.5 s
    seg = Segment("m", mix, 2 * SR, "a tune", meta={"melody_path": str(melody_file), "source_start_s": 0.5})
    plain = Segment("p", mix, 2 * SR, "a tune")
    with_melody, without = _decode(fam.encode_segments(loaded, [seg, plain]))
    body = slice(1, 12)  # frames well inside the 2 s window
    assert set(with_melody["chroma.npy"][body].argmax(axis=1)) == {7}  # G
    assert set(without["chroma.npy"][body].argmax(axis=1)) == {0}  # C
    assert with_melody["json"]["chroma_source"] == "melody_path"
    assert np.array_equal(with_melody["codes.npy"], without["codes.npy"])


def test_melody_path_in_metadata_is_resolved_beside_the_file(tmp_path):
    from musiclora.data.metadata import load_metadata

    (tmp_path / "meta.jsonl").write_text('{"path": "a.wav", "caption": "x", "melody_path": "stems/a_voice.wav"}\n')
    (track,) = load_metadata(str(tmp_path / "meta.jsonl"))
    assert track.melody_path == str(tmp_path / "stems" / "a_voice.wav")
