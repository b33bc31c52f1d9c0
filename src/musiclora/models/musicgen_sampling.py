"""MusicGen-Melody sampling for a batch of requests, each with its own adapter, guidance and seed.

transformers' `MusicgenMelodyForConditionalGeneration.generate` samples a whole batch from one
global RNG with one guidance scale and one active adapter, so a request's audio depends on its
batch mates. This loop keeps what it does (the conditioning prefix, the delay pattern,
classifier-free guidance against the null condition, top-k 250 sampling, a KV cache) and makes
every row independent of the others:

- the prefix is built per request: chroma (or the null chroma, one-hot C) through
  `audio_enc_to_dec_proj`, repeated/cut to `chroma_length` frames, then the text states padded to
  a fixed `text_tokens` (the decoder's positions are absolute, so a batch-dependent padding would
  move them) and multiplied by the text mask, as transformers does;
- guided requests (w > 1) get a null row: all-zero text states and the null chroma, run with the
  request's own adapter; logits = null + w (cond - null) (transformers'
  `ClassifierFreeGuidanceLogitsProcessor`);
- each request draws its tokens from its own `torch.Generator` seeded with its seed;
- each row follows its own delay pattern (its own frame count), so rows of different durations
  share the batch and a longer neighbour never changes a shorter row's tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from musiclora.models.base import GenerationRequest, model_device
from musiclora.models.batching import BASE_ROW, row_adapters
from musiclora.models.chroma import melody_chroma

TOP_K = 250
"""Top-k of MusicGen's sampling (audiocraft and transformers' generation_config)."""


@torch.no_grad()
def sample_codes(
    model: nn.Module,
    root: nn.Module,
    tokenizer,
    requests: Sequence[GenerationRequest],
    adapter_names: Sequence[str] | None = None,
    *,
    frame_rate: int,
    sample_rate: int,
    text_tokens: int,
) -> list[torch.Tensor]:
    """Sample EnCodec codes for every request in one batched decoder pass per step.

    Args:
        model: the transformers `MusicgenMelodyForConditionalGeneration` (LoRA layers inside it
            when adapters are attached).
        root: the family's LoRA root (the `PeftModel`, or `model` without adapters).
        tokenizer: the T5 tokenizer.
        requests: what to generate; `steps` is ignored.
        adapter_names: per request, the peft adapter name or `BASE_ROW` (None: the active adapter).
        frame_rate: codec frames per second (50 Hz).
        sample_rate: Hz of the chroma front end (32 kHz); melodies are resampled to it.
        text_tokens: the fixed text length (prompts are cut to it, shorter ones padded).

    Returns:
        per request, int64 codes [K, T] on the model's device, T = max(1, round(duration_s * frame_rate)).

    Raises:
        ValueError: `adapter_names` of the wrong length or naming an adapter that is not attached.
    """
    if adapter_names is not None and len(adapter_names) != len(requests):
        raise ValueError(f"adapter_names: expected one per request ({len(requests)}), got {len(adapter_names)}")
    device = model_device(model)
    k = int(model.decoder.config.num_codebooks)
    pad = int(model.config.decoder.pad_token_id)
    frames = [max(1, round(r.duration_s * frame_rate)) for r in requests]
    guided = [i for i, r in enumerate(requests) if r.guidance_scale > 1.0]
    rows = list(range(len(requests))) + guided  # conditional rows, then the null rows of guided requests
    names = None if adapter_names is None else [adapter_names[i] for i in rows]

    cond, null = [], []
    for i, r in enumerate(requests):  # per request: its prefix cannot depend on its batch mates
        with row_adapters(root, None if adapter_names is None else [adapter_names[i]]):
            cond.append(_prefix(model, tokenizer, r, sample_rate, text_tokens))
            if i in guided:
                null.append(_null_prefix(model, cond[-1].shape[1] - int(model.config.chroma_length)))
    prefix = torch.cat(cond + null)  # [R, P, D]

    steps = max(frames) + k - 1  # the delay pattern costs K - 1 steps after the last frame
    seq = torch.full((len(requests), k, steps + 1), pad, dtype=torch.long, device=device)  # position 0: BOS
    gens = [torch.Generator(device=device).manual_seed(r.seed) for r in requests]
    scale = torch.tensor([requests[i].guidance_scale for i in guided], device=device)[:, None, None]
    codebook = torch.arange(k, device=device)[None, :]
    last = torch.tensor(frames, device=device)[:, None] + codebook  # [B, K] last position of each codebook
    cache = None
    with row_adapters(root, names):
        for s in range(1, steps + 1):
            out = model.decoder(input_ids=seq[rows, :, s - 1].reshape(-1, 1),
                                encoder_hidden_states=prefix if cache is None else None,
                                past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1].float().reshape(len(rows), k, -1)
            scores = logits[: len(requests)].clone()
            if guided:  # transformers' ClassifierFreeGuidanceLogitsProcessor, per request
                un = logits[len(requests):]
                scores[guided] = un + scale * (scores[guided] - un)
            probs = _top_k_probs(scores, TOP_K)
            tokens = torch.stack([torch.multinomial(probs[b], 1, generator=gens[b])[:, 0] for b in range(len(gens))])
            free = (codebook < s) & (s <= last)  # delay pattern: BOS before, pad after each codebook's window
            seq[:, :, s] = torch.where(free, tokens, pad)
    return [torch.stack([seq[b, q, q + 1 : q + 1 + frames[b]] for q in range(k)]) for b in range(len(requests))]


def _prefix(model: nn.Module, tokenizer, request: GenerationRequest, sample_rate: int, text_tokens: int) -> torch.Tensor:
    """The conditioning prefix of one request: [1, chroma_length + text_tokens, D]."""
    from musiclora.audio import resample

    device, dtype = model_device(model), model.dtype
    text = tokenizer([request.prompt], padding="max_length", truncation=True, max_length=text_tokens,
                     return_tensors="pt").to(device)
    states = model.text_encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).last_hidden_state
    if model.text_encoder.config.hidden_size != model.decoder.config.hidden_size:
        states = model.enc_to_dec_proj(states)
    states = states * text["attention_mask"][..., None].to(states.dtype)
    if request.melody is not None:
        wav = resample(request.melody, request.melody_sample_rate, sample_rate)
        chroma = melody_chroma(wav[None], sample_rate).to(device, dtype)  # [1, T_c, 12]
    else:
        chroma = _null_chroma(model)
    return torch.cat([_project_chroma(model, chroma), states], dim=1)


def _null_prefix(model: nn.Module, n_text: int) -> torch.Tensor:
    """The guidance null condition: null chroma, all-zero text states: [1, chroma_length + n_text, D]."""
    audio = _project_chroma(model, _null_chroma(model))
    return torch.cat([audio, audio.new_zeros(1, n_text, audio.shape[-1])], dim=1)


def _null_chroma(model: nn.Module) -> torch.Tensor:
    """One frame of one-hot C, [1, 1, num_chroma] (transformers' `null_audio_hidden_states`)."""
    out = torch.zeros(1, 1, int(model.config.num_chroma), device=model_device(model), dtype=model.dtype)
    out[..., 0] = 1
    return out


def _project_chroma(model: nn.Module, chroma: torch.Tensor) -> torch.Tensor:
    """Chroma [1, T_c, 12] -> decoder states [1, chroma_length, D], repeated or cut as transformers does."""
    states = chroma
    if model.config.num_chroma != model.decoder.config.hidden_size:
        states = model.audio_enc_to_dec_proj(states)
    length = int(model.config.chroma_length)
    if states.shape[1] < length:
        states = states.repeat(1, -(-length // states.shape[1]), 1)
    return states[:, :length]


def _top_k_probs(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Softmax over the `top_k` largest scores of the last axis, zero elsewhere (transformers' TopKLogitsWarper)."""
    kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
    return torch.softmax(scores.masked_fill(scores < kth, float("-inf")), dim=-1)


def decode_codes(model: nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """EnCodec-decode one request's codes [K, T] to a float32 waveform [T * hop] on the CPU."""
    audio = model.audio_encoder.decode(codes[None, None], audio_scales=[None]).audio_values  # [1, 1, L]
    return audio[0, 0].float().cpu()


__all__ = ["BASE_ROW", "TOP_K", "decode_codes", "sample_codes"]
