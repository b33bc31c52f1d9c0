"""MusicGen-Melody (transformers `MusicgenMelodyForConditionalGeneration`) as a musiclora family.

The only module that knows transformers' token layouts: inside musiclora codec tokens are
`[B, K, T]`; here they become the decoder's `input_ids` `(B*K, S)` with MusicGen's delay pattern
(codebook k shifted right by k frames, audiocraft's `DelayedPatternProvider`) and the loss is
cross-entropy averaged over the K codebooks, padding masked (audiocraft `solvers/musicgen.py`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from musiclora.models.base import GenerationRequest, Loaded, ModelFamily, Segment, npy_bytes
from musiclora.models.chroma import HOP_LENGTH as CHROMA_HOP
from musiclora.models.chroma import melody_chroma, null_chroma, zero_padded_chroma
from musiclora.models.tiny_tokenizer import build_t5_tokenizer

MAX_TEXT_TOKENS = 64


def codes_to_delayed(codes: torch.Tensor, valid: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lay codec tokens out in MusicGen's delay pattern, with a BOS column in front.

    Codebook k's frame t lands at position t + k + 1; position 0 and every position outside a
    codebook's window hold `pad_id` (MusicGen uses the same id for BOS and padding), exactly as
    `MusicgenMelodyForCausalLM.build_delay_pattern_mask` lays out generation.

    Args:
        codes: int64 tokens, shape [B, K, T].
        valid: bool frame mask, shape [B, T]; False marks padded frames of a short segment.
        pad_id: the decoder's pad/BOS token id (codebook size, 2048 for facebook/musicgen-melody).

    Returns:
        (delayed int64 [B, K, T + K + 1], delayed_valid bool [B, K, T + K + 1]).

    Raises:
        ValueError: if `codes` is not 3-D or `valid` is not [B, T].
    """
    if codes.dim() != 3 or valid.shape != (codes.shape[0], codes.shape[2]):
        raise ValueError(f"codes must be [B, K, T] and valid [B, T]; got {tuple(codes.shape)} and {tuple(valid.shape)}")
    b, k, t = codes.shape
    delayed = torch.full((b, k, t + k + 1), pad_id, dtype=torch.long, device=codes.device)
    dvalid = torch.zeros((b, k, t + k + 1), dtype=torch.bool, device=codes.device)
    for q in range(k):
        delayed[:, q, q + 1 : q + 1 + t] = codes[:, q]
        dvalid[:, q, q + 1 : q + 1 + t] = valid
    return delayed, dvalid


def delayed_to_codes(delayed: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Inverse of `codes_to_delayed`: int64 [B, K, S] -> int64 [B, K, num_frames]."""
    k = delayed.shape[1]
    return torch.stack([delayed[:, q, q + 1 : q + 1 + num_frames] for q in range(k)], dim=1)


def build_tiny_musicgen_melody(seed: int = 0, codebook_size: int = 2048, chroma_length: int = 235):
    """The `tiny` preset: real transformers classes, small config, random weights.

    Keeps what shapes the data path: 32 kHz mono EnCodec at 50 Hz frames with K = 4 codebooks of
    2048 entries (2.2 kbps, as facebook/musicgen-melody), 12-bin chroma; shrinks widths and depths.

    Args:
        seed: seed of the random weights and codebooks.
        codebook_size: entries per EnCodec codebook, which is also the decoder's vocabulary (its
            pad/BOS id is `codebook_size`, as 2048 is for facebook/musicgen-melody). The
            adaptation study uses its codec's 64: a 2048-way head that only ever sees 64 codes
            spends most of a CPU step on logits no target uses, and learns slowly.
        chroma_length: chroma frames the decoder takes in front of the text (235, 30 s at the
            feature extractor's 4096-sample hop, as facebook/musicgen-melody). transformers tiles
            shorter chroma to this length, so clips much shorter than 30 s can use fewer.

    Returns:
        (MusicgenMelodyForConditionalGeneration in eval mode, T5Tokenizer), about 1.1 M parameters
        with the defaults.

    Raises:
        ValueError: `codebook_size` below 2 or `chroma_length` below 1.
    """
    if codebook_size < 2 or chroma_length < 1:
        raise ValueError(
            f"codebook_size must be >= 2 and chroma_length >= 1, got {codebook_size} and {chroma_length}"
        )
    from transformers import (
        EncodecConfig,
        MusicgenMelodyConfig,
        MusicgenMelodyDecoderConfig,
        MusicgenMelodyForConditionalGeneration,
        T5Config,
    )

    tokenizer = build_t5_tokenizer()
    torch.manual_seed(seed)
    kbps = round(4 * 50 * math.ceil(math.log2(codebook_size)) / 1000, 6)  # K = 4 levels at 50 Hz: 2.2 for 2048
    audio = EncodecConfig(
        sampling_rate=32_000, audio_channels=1, num_filters=4, num_residual_layers=1, upsampling_ratios=[8, 5, 4, 4],
        codebook_size=codebook_size, codebook_dim=16, hidden_size=16, num_lstm_layers=1, target_bandwidths=[kbps],
        use_causal_conv=False, normalize=False,
    )
    if audio.num_quantizers != 4:
        raise ValueError(f"codebook_size {codebook_size}: {kbps} kbps gives {audio.num_quantizers} levels, not 4")
    text = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    decoder = MusicgenMelodyDecoderConfig(
        vocab_size=codebook_size, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        num_codebooks=4, pad_token_id=codebook_size, bos_token_id=codebook_size, max_position_embeddings=4096,
    )
    config = MusicgenMelodyConfig(
        text_encoder=text.to_dict(), audio_encoder=audio.to_dict(), decoder=decoder.to_dict(),
        chroma_length=chroma_length,
    )
    model = MusicgenMelodyForConditionalGeneration(config).eval()
    _randomise_codebooks(model, seed)
    model.generation_config.pad_token_id = codebook_size
    model.generation_config.decoder_start_token_id = codebook_size
    model.generation_config.bos_token_id = codebook_size
    return model, tokenizer


class MusicgenOptions(BaseModel):
    """`model.options` of a MusicGen-Melody run: condition dropout, so guidance has a trained null branch.

    Generation uses classifier-free guidance (scale 3.0 by default), which also runs the model on the
    null condition (zero text states, all-C chroma: transformers' `null_audio_hidden_states`). Without
    dropout the adapter never sees that branch. Defaults are audiocraft's `conditioner/chroma2music.yaml`.

    Attributes:
        cond_dropout: probability, per training sample, of dropping text and melody together
            (audiocraft `classifier_free_guidance.training_dropout: 0.2`).
        melody_dropout: probability, per training sample, of dropping the melody alone (audiocraft
            `attribute_dropout.wav.self_wav: 0.5`), so text-only prompts stay in distribution.
    """

    model_config = ConfigDict(extra="forbid")

    cond_dropout: float = Field(0.2, ge=0.0, lt=1.0)
    melody_dropout: float = Field(0.5, ge=0.0, lt=1.0)


class MusicgenMelodyFamily(ModelFamily):
    """MusicGen-Melody: EnCodec codes + melody chroma + caption -> LoRA on the decoder."""

    name = "musicgen-melody"
    default_base = "facebook/musicgen-melody"
    lora_presets = {
        "attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"],
        "attn+ffn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"],
        # + the per-codebook output heads: in a small LM a new style is largely a new choice of codes,
        # which adapters inside the blocks alone barely reach (bench/results/adaptation).
        "attn+ffn+heads": [
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2",
            "lm_heads.0", "lm_heads.1", "lm_heads.2", "lm_heads.3",
        ],
        "attn+cond": [
            "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
            "enc_to_dec_proj", "audio_enc_to_dec_proj",
        ],
    }
    sample_rate = 32_000
    takes_melody = True
    licence_note = ("the adapter is a derivative of the base model: its licence terms apply "
                    "(facebook/musicgen-melody: CC-BY-NC-4.0 weights)")

    options_model = MusicgenOptions

    def load(self, base: str, dtype: torch.dtype = torch.float32, revision: str | None = None) -> Loaded:
        from transformers import AutoTokenizer, MusicgenMelodyForConditionalGeneration

        if base == self.tiny_id:
            model, tokenizer = build_tiny_musicgen_melody()
        else:
            try:
                model = MusicgenMelodyForConditionalGeneration.from_pretrained(base, revision=revision, dtype=dtype)
                tokenizer = AutoTokenizer.from_pretrained(base, revision=revision)
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"cannot load MusicGen-Melody base {base!r}: expected 'tiny', a save_pretrained folder or a hub id "
                    f"({exc})"
                ) from exc
        return Loaded(model=model.to(dtype).eval(), tokenizer=tokenizer, base=base, family=self.name)

    def skeleton(self, base: str, revision: str | None = None) -> nn.Module:
        from transformers import MusicgenMelodyConfig, MusicgenMelodyForConditionalGeneration

        if base == self.tiny_id:
            return build_tiny_musicgen_melody()[0]
        try:
            config = MusicgenMelodyConfig.from_pretrained(base, revision=revision)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the config of MusicGen-Melody base {base!r} ({exc})") from exc
        with torch.device("meta"):
            return MusicgenMelodyForConditionalGeneration(config)

    def save_tiny(self, out_dir: str, seed: int = 0, codebook_size: int = 2048, chroma_length: int = 235) -> str:
        """Write the tiny preset (`build_tiny_musicgen_melody`, whose arguments these are) to `out_dir`."""
        model, tokenizer = build_tiny_musicgen_melody(seed, codebook_size, chroma_length)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        return out_dir

    def frame_rate(self, model: nn.Module) -> int:
        """Codec frames per second (50 Hz for the 32 kHz EnCodec)."""
        return int(model.config.audio_encoder.frame_rate)

    def feature_spec(self, loaded: Loaded) -> dict[str, Any]:
        cfg = loaded.model.config
        return {
            "family": self.name,
            "codec": "encodec",
            "codec_sample_rate": int(cfg.audio_encoder.sampling_rate),
            "frame_rate": self.frame_rate(loaded.model),
            "num_codebooks": int(cfg.decoder.num_codebooks),
            "codebook_size": int(cfg.audio_encoder.codebook_size),
            "fields": {
                "codes.npy": "int16 [K, T] EnCodec tokens",
                "chroma.npy": "uint8 [T_c, 12] one-hot melody chroma (MusicgenMelodyFeatureExtractor) of the mix "
                              "or of the track's melody_path; all-zero rows past the valid audio",
                "json": "caption, num_frames (valid frames), source, start_s, duration_s",
            },
        }

    @torch.no_grad()
    def encode_segments(self, loaded: Loaded, segments: list[Segment]) -> list[dict[str, Any]]:
        """EnCodec codes, chroma and caption per segment.

        Returns:
            one WebDataset sample per segment: `__key__`, `codes.npy` (int16 [K, T]),
            `chroma.npy` (uint8 [T_c, 12]) and `json` (caption, num_frames, ...), as bytes.
        """
        model = loaded.model
        wav = torch.from_numpy(np.stack([s.audio for s in segments])).float()
        codes = model.audio_encoder.encode(wav[:, None, :].to(model.device, model.dtype)).audio_codes[0].cpu()  # [B, K, T]
        melody = torch.from_numpy(np.stack([_melody_audio(s, self.sample_rate) for s in segments])).float()
        valid = torch.tensor([s.num_valid for s in segments])
        chroma = zero_padded_chroma(melody_chroma(melody, self.sample_rate), valid, CHROMA_HOP)
        hop = model.config.audio_encoder.sampling_rate // self.frame_rate(model)
        out = []
        for i, seg in enumerate(segments):
            meta = dict(seg.meta, caption=seg.caption, num_frames=int(np.ceil(seg.num_valid / hop)),
                        chroma_source="melody_path" if seg.meta.get("melody_path") else "mix")
            out.append({
                "__key__": seg.key,
                "codes.npy": npy_bytes(codes[i].to(torch.int16).numpy()),
                "chroma.npy": npy_bytes(chroma[i].to(torch.uint8).numpy()),
                "json": meta,
            })
        return out

    def collate(self, samples: list[dict[str, Any]], loaded: Loaded) -> dict[str, torch.Tensor]:
        """Decoded samples -> `codes` [B, K, T] int64, `valid` [B, T] bool, `chroma` [B, T_c, 12] float32
        (zero past the valid frames), `input_ids`/`attention_mask` [B, N] from the tokenizer (captions
        truncated to 64 tokens)."""
        codes = torch.stack([torch.as_tensor(s["codes.npy"].astype(np.int64)) for s in samples])
        t = codes.shape[-1]
        frames = torch.tensor([min(int(s["json"]["num_frames"]), t) for s in samples])
        valid = torch.arange(t)[None, :] < frames[:, None]
        chroma = torch.stack([torch.as_tensor(s["chroma.npy"].astype(np.float32)) for s in samples])
        codec_hop = self.sample_rate // self.frame_rate(loaded.model)
        chroma = zero_padded_chroma(chroma, frames * codec_hop, CHROMA_HOP)  # also shards made before the fix
        text = loaded.tokenizer(
            [s["json"]["caption"] for s in samples], padding=True, truncation=True,
            max_length=MAX_TEXT_TOKENS, return_tensors="pt",
        )
        return {
            "codes": codes, "valid": valid, "chroma": chroma,
            "input_ids": text["input_ids"], "attention_mask": text["attention_mask"],
        }

    def num_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Valid codec tokens: valid frames x K codebooks."""
        return int(batch["valid"].sum()) * int(batch["codes"].shape[1])

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy over the K codebooks in the delay pattern, padding masked, mean over K.

        Source: audiocraft `MusicGenSolver._compute_cross_entropy` (per-codebook CE, averaged).
        While the model is in training mode, conditions are dropped per sample as `options` says
        (`drop_conditions`), so classifier-free guidance has a trained unconditional branch.
        """
        codes, valid = batch["codes"], batch["valid"]
        b, k, t = codes.shape
        pad_id = _pad_id(model)
        delayed, dvalid = codes_to_delayed(codes, valid, pad_id)
        decoder_input_ids = delayed[:, :, :-1].reshape(b * k, t + k)
        labels = delayed[:, :, 1:].masked_fill(~dvalid[:, :, 1:], -100)  # [B, K, T + K]
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        attention_mask, chroma = batch["attention_mask"], batch["chroma"]
        if model.training:
            attention_mask, chroma = drop_conditions(attention_mask, chroma, self.options)
        out = model(
            input_ids=batch["input_ids"], attention_mask=attention_mask,
            input_features=chroma.to(dtype), decoder_input_ids=decoder_input_ids,
        )
        logits = out.logits[:, -(t + k):].reshape(b, k, t + k, -1).float()
        per_codebook = [
            nn.functional.cross_entropy(logits[:, q].reshape(-1, logits.shape[-1]), labels[:, q].reshape(-1))
            for q in range(k)
        ]
        return torch.stack(per_codebook).mean()

    @torch.no_grad()
    def generate(self, model, tokenizer, request: GenerationRequest) -> tuple[np.ndarray, int]:
        """Sample audio for `request.prompt` (top-k 250 sampling, classifier-free guidance as MusicGen).

        One request of `generate_batch`, with the model's active adapter: the same request and
        seed give the same audio alone and inside any batch. `request.melody` (float mono [L] at
        `melody_sample_rate`, resampled to 32 kHz) conditions through its chroma; `request.steps`
        is ignored (autoregressive: one step per frame).

        Returns:
            (float32 waveform [L] on the CPU, 32000).

        Raises:
            ValueError / RuntimeError: what the sampler raises for this request.
        """
        result = self.generate_batch(model, tokenizer, [request])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @torch.no_grad()
    def generate_batch(self, model, tokenizer, requests: list[GenerationRequest],
                       adapter_names: list[str] | None = None) -> list[tuple[np.ndarray, int] | Exception]:
        """Sample a batch in one decoder pass per step, each request with its own adapter, seed and
        guidance (`musicgen_sampling.sample_codes`), then EnCodec-decode each request.

        The text is cut/padded to `MAX_TEXT_TOKENS` (64, as in training), so the decoder positions
        of a request never depend on its batch mates.

        Returns:
            per request, (float32 waveform [round(duration_s * 50) * 640] on the CPU, 32000), or
            the exception of a batch that could not run (it then fails every request).
        """
        from musiclora.models.musicgen_sampling import decode_codes, sample_codes

        inner = _unwrap(model)
        try:
            codes = sample_codes(inner, self.lora_root(model), tokenizer, requests, adapter_names,
                                 frame_rate=self.frame_rate(inner), sample_rate=self.sample_rate,
                                 text_tokens=MAX_TEXT_TOKENS)
        except (ValueError, RuntimeError) as exc:
            return [exc] * len(requests)
        return [(decode_codes(inner, c).numpy(), self.sample_rate) for c in codes]


def drop_conditions(
    attention_mask: torch.Tensor, chroma: torch.Tensor, options: MusicgenOptions
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free-guidance dropout of the conditions, per sample (training only).

    A dropped text gets an all-zero attention mask: MusicGen-Melody multiplies the text states by
    the mask, which gives the zero text states its guidance uses as the null condition. A dropped
    melody becomes `null_chroma` (all C), transformers' `null_audio_hidden_states`. Draws come from
    torch's global generator (seeded per rank by the trainer, saved in checkpoints).

    Args:
        attention_mask: int64 [B, N] text mask.
        chroma: float32 [B, T_c, 12] melody chroma.
        options: the dropout rates (`cond_dropout` for both, `melody_dropout` for the melody alone).

    Returns:
        (attention_mask [B, N], chroma [B, T_c, 12]), new tensors; the inputs are not modified.
    """
    b = attention_mask.shape[0]
    drop_all = torch.rand(b) < options.cond_dropout
    drop_melody = drop_all | (torch.rand(b) < options.melody_dropout)
    mask = attention_mask.masked_fill(drop_all.to(attention_mask.device)[:, None], 0)
    null = null_chroma(chroma.shape[1], dtype=chroma.dtype, device=chroma.device)
    chroma = torch.where(drop_melody.to(chroma.device)[:, None, None], null[None], chroma)
    return mask, chroma


def _melody_audio(seg: Segment, sample_rate: int) -> np.ndarray:
    """The waveform whose chroma conditions a segment: its track's `melody_path` over the same window
    (a stem, or a hummed / sung take, as in voice-to-music), else the segment's own audio.

    Returns:
        float32 [L] at `sample_rate`, zero-padded or cut to the segment's length.

    Raises:
        AudioDecodeError: the melody file cannot be decoded.
        ValueError: the melody is silent over the segment's window.
    """
    path = seg.meta.get("melody_path")
    if not path:
        return seg.audio
    from musiclora.audio import is_silent, load_window

    start = float(seg.meta.get("source_start_s", seg.meta.get("start_s", 0.0)))
    clip = load_window(path, start, seg.num_valid / sample_rate, sample_rate)
    if clip.size == 0 or is_silent(clip):
        raise ValueError(f"melody_path {path}: silent or empty over the window of segment {seg.key}")
    out = np.zeros_like(seg.audio)
    n = min(clip.size, seg.num_valid)
    out[:n] = clip[:n]
    return out


@torch.no_grad()
def _randomise_codebooks(model: nn.Module, seed: int) -> None:
    """Give the tiny EnCodec random codebooks (seeded).

    EnCodec's codebooks are buffers that only `from_pretrained` fills; a freshly built model keeps
    them at zero, so every frame would encode to code 0 and every code decode to the same audio
    (generated audio would not depend on the tokens, hence not on the seed or an adapter).
    """
    g = torch.Generator().manual_seed(seed)
    for layer in model.audio_encoder.quantizer.layers:
        book = layer.codebook
        book.embed.copy_(torch.randn(book.embed.shape, generator=g))
        book.embed_avg.copy_(book.embed)
        book.cluster_size.fill_(1.0)


def _pad_id(model: nn.Module) -> int:
    """The decoder's pad/BOS id of a (wrapped) MusicGen-Melody model (2048 for facebook/musicgen-melody)."""
    return int(_unwrap(model).config.decoder.pad_token_id)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers `PreTrainedModel` under peft / DeepSpeed / DDP wrappers.

    Unwraps by type, not by attribute: a `DeepSpeedEngine` has a `config` attribute too (its own
    dict), so "has a config" does not mean "is the transformers model".

    Raises:
        TypeError: no transformers model inside `model`.
    """
    from transformers import PreTrainedModel

    seen = model
    for _ in range(8):
        if isinstance(seen, PreTrainedModel):
            return seen
        if hasattr(seen, "get_base_model"):
            seen = seen.get_base_model()
        elif hasattr(seen, "module"):
            seen = seen.module
        else:
            break
    raise TypeError(f"expected a MusicGen-Melody transformers model (or a wrapper of one), got {type(model).__name__}")

