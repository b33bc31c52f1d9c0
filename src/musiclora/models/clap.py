"""CLAP (transformers `ClapModel`): the text/audio embedding model AudioLDM conditions on.

AudioLDM's UNet takes a CLAP embedding as its class label, so the family needs CLAP to run;
the evaluation's CLAP score and CLAP-based KAD/FAD reuse the same embedders. Pretrained
(`load_clap`, a hub id or folder) or tiny and random (`build_tiny_clap`, for tests and the demo;
its RoBERTa BPE tokenizer is trained locally with `tokenizers`, no hub). Every bundle and audio
embedder says where its weights come from (`source`) and whether they are random
(`random_weights`), so a report can label a score from random weights as not meaningful.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from musiclora.audio import check_clips

TOKENIZER_CORPUS = (
    "a calm solo piano melody in c major",
    "fast electronic dance music with heavy bass and drums",
    "a traditional folk song played on flute and fiddle",
    "a jazz trio with upright bass, brushed drums and saxophone",
    "slow ambient pads with reverb, a choir singing softly",
    "rock guitar riff with distortion at 120 bpm",
)
"""Sentences the tiny CLAP's byte-level BPE tokenizer is trained on."""


TINY_MAX_PARAMETERS = 1_000_000
"""A model under this many parameters is taken for a tiny preset, not a trained checkpoint: the tiny
CLAP has about 53 k, the tiny MusicGen's EnCodec about 170 k, while the smallest published ones are
far larger (facebook/encodec_24khz 15 M parameters, laion/clap-htsat-unfused 153 M)."""


def looks_tiny(model: nn.Module) -> bool:
    """True if `model` has fewer than `TINY_MAX_PARAMETERS` parameters (a tiny preset, e.g. saved to a folder)."""
    return sum(p.numel() for p in model.parameters()) < TINY_MAX_PARAMETERS


@dataclass
class ClapBundle:
    """A CLAP model with its audio feature extractor and text tokenizer.

    Attributes:
        model: a transformers `ClapModel`.
        feature_extractor: its `ClapFeatureExtractor`.
        tokenizer: its text tokenizer (RoBERTa BPE).
        source: where the weights come from: a hub id, a folder, or "tiny" (`build_tiny_clap`).
        random_weights: True for the tiny random CLAP (its scores mean nothing).
    """

    model: nn.Module
    feature_extractor: object
    tokenizer: object
    source: str = "unknown"
    random_weights: bool = False


def load_clap(name_or_path: str) -> ClapBundle:
    """Load a pretrained CLAP (e.g. "laion/larger_clap_music" or a local copy) with transformers.

    A checkpoint under `TINY_MAX_PARAMETERS` parameters (a saved tiny preset) is marked
    `random_weights`.

    Raises:
        ValueError: it cannot be loaded (names `name_or_path`).
    """
    from transformers import AutoTokenizer, ClapFeatureExtractor, ClapModel

    try:
        model = ClapModel.from_pretrained(name_or_path).eval()
        extractor = ClapFeatureExtractor.from_pretrained(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"cannot load a CLAP model from {name_or_path!r}: expected a hub id such as "
            f"laion/larger_clap_music or a save_pretrained folder ({exc})"
        ) from exc
    return ClapBundle(model, extractor, tokenizer, source=name_or_path, random_weights=looks_tiny(model))


def build_tiny_tokenizer(vocab_size: int = 400):
    """RoBERTa byte-level BPE trained locally on `TOKENIZER_CORPUS`, as a transformers tokenizer.

    Special tokens get RoBERTa's ids: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(
        TOKENIZER_CORPUS, vocab_size=vocab_size, min_frequency=1, special_tokens=specials, show_progress=False
    )
    model = json.loads(bpe._tokenizer.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return RobertaTokenizerFast(vocab=model["vocab"], merges=merges, model_max_length=60)


def build_tiny_clap(seed: int = 0, sample_rate: int = 16000, max_length_s: int = 1) -> ClapBundle:
    """A tiny random-weight `ClapModel` (about 53 k parameters) built from configs; no downloads.

    Same classes as laion/clap-htsat-*: HTSAT audio tower with 2 Swin stages, a
    2-layer RoBERTa text tower, 16-d projections; the feature extractor makes
    32-band log-mels at `sample_rate` over windows of `max_length_s` seconds.
    Weights are drawn from a forked RNG seeded with `seed` (global RNG untouched).

    Args:
        seed: weight seed; equal seeds give identical models.
        sample_rate: rate of the feature extractor (and so of the clips), Hz.
        max_length_s: audio window of the feature extractor, whole seconds.

    Returns:
        `ClapBundle` with the model in eval mode, its feature extractor and tokenizer.
    """
    from transformers import ClapAudioConfig, ClapConfig, ClapFeatureExtractor, ClapModel, ClapTextConfig

    tokenizer = build_tiny_tokenizer()
    text = ClapTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        projection_dim=16,
    )
    audio = ClapAudioConfig(
        window_size=4,
        num_mel_bins=32,
        spec_size=64,
        patch_size=4,
        patch_stride=(4, 4),
        depths=(1, 1),
        num_attention_heads=(1, 2),
        hidden_size=32,
        patch_embeds_hidden_size=16,
        projection_dim=16,
    )
    config = ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ClapModel(config).eval()
    extractor = ClapFeatureExtractor(
        feature_size=32,
        sampling_rate=sample_rate,
        hop_length=sample_rate // 100,
        max_length_s=max_length_s,
        fft_window_size=2 ** math.ceil(math.log2(sample_rate // 40)),
        frequency_min=0,
        frequency_max=sample_rate // 2,
        truncation="rand_trunc",
        padding="repeatpad",
    )
    return ClapBundle(model=model, feature_extractor=extractor, tokenizer=tokenizer, source="tiny",
                      random_weights=True)


def _pooled(output) -> torch.Tensor:
    """Projected embedding from a CLAP get_*_features output (tensor, or ModelOutput in transformers 5)."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ClapAudioEmbedder:
    """CLAP audio embeddings, one unit-norm row per clip.

    A clip longer than the extractor's window (`max_length_s`, 10 s for LAION CLAP)
    is cut into consecutive windows, a trailing piece shorter than half a window is
    dropped (unless it is the only piece), and the window embeddings are averaged and
    re-normalised. This keeps the result deterministic: the extractor's own
    truncation picks a random crop. Shorter pieces are repeat-padded by the extractor.

    Args:
        model: a transformers `ClapModel`; switched to eval mode.
        feature_extractor: its `ClapFeatureExtractor`; fixes `sample_rate`.
        name: label for reports.
        batch_size: windows per forward pass.
        source: where the weights come from (hub id, folder, "tiny"), for reports.
        random_weights: whether the weights are random; None: guessed with `looks_tiny`.
    """

    def __init__(self, model: nn.Module, feature_extractor, name: str = "clap-audio", batch_size: int = 8,
                 source: str = "unknown", random_weights: bool | None = None):
        self.model = model.eval()
        self.feature_extractor = feature_extractor
        self.name = name
        self.source = source
        self.random_weights = looks_tiny(model) if random_weights is None else random_weights
        self.sample_rate = int(feature_extractor.sampling_rate)
        self.batch_size = batch_size

    def _windows(self, wav: np.ndarray) -> list[np.ndarray]:
        size = int(self.feature_extractor.nb_max_samples)
        pieces = [wav[i : i + size] for i in range(0, wav.size, size)]
        if len(pieces) > 1 and pieces[-1].size < size // 2:
            pieces.pop()
        return pieces

    def __call__(self, wavs: list[np.ndarray]) -> np.ndarray:
        """Embed clips at `sample_rate`: float32 [N, D], unit L2 norm. Raises ValueError on bad input."""
        clips = check_clips(wavs)
        windows, owner = [], []
        for i, wav in enumerate(clips):
            pieces = self._windows(wav)
            windows += pieces
            owner += [i] * len(pieces)
        parts = []
        with torch.inference_mode():
            for start in range(0, len(windows), self.batch_size):
                batch = windows[start : start + self.batch_size]
                inputs = self.feature_extractor(batch, sampling_rate=self.sample_rate, return_tensors="pt")
                features = self.model.get_audio_features(
                    input_features=inputs["input_features"], is_longer=inputs.get("is_longer")
                )
                parts.append(_pooled(features))
        emb = torch.cat(parts).float()
        index = torch.tensor(owner)
        summed = torch.zeros(len(clips), emb.shape[1]).index_add_(0, index, emb)
        return F.normalize(summed, dim=-1).numpy().astype(np.float32)


class ClapTextEmbedder:
    """CLAP text embeddings of prompts, one unit-norm row per text.

    Args:
        model: a transformers `ClapModel`; switched to eval mode.
        tokenizer: its tokenizer (RoBERTa BPE); texts are padded and truncated.
        name: label for reports.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str = "clap-text"):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Embed texts: float32 [N, D], unit L2 norm. Raises ValueError if empty, TypeError on a non-str."""
        if len(texts) == 0:
            raise ValueError("texts is empty: need at least one prompt")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            out = self.model.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            )
        return F.normalize(_pooled(out).float(), dim=-1).numpy().astype(np.float32)


# --- EnCodec ------------------------------------------------------------------------------------------
