"""Hub-free T5 tokenizer for the tiny presets: a Unigram vocabulary built in memory.

The real checkpoints ship their own sentencepiece vocabulary (t5-base); no machine here can
download it, so the tiny preset builds a small one: characters, then common caption words,
each as a `▁word` piece (sentencepiece's word-start marker), with log-probability scores.
"""

from __future__ import annotations

import math
import string

CAPTION_WORDS = ["a", "an", "the", "and", "with", "of", "in", "by", "from", "for", "on", "at", "to", "is", "music", "song", "track", "piece", "soundtrack", "game", "album", "artist", "title", "orchestral", "orchestra", "piano", "guitar", "violin", "cello", "strings", "brass", "drums", "percussion", "synth", "electronic", "ambient", "classical", "folk", "traditional", "rock", "pop", "jazz", "blues", "chorale", "choir", "vocal", "melody", "rhythm", "harmony", "bass", "lead", "slow", "fast", "calm", "epic", "dark", "bright", "happy", "sad", "battle", "peaceful", "major", "minor", "key", "tempo", "bpm", "metre", "time", "signature", "genre", "mood", "instrumental", "singularity", "wesnoth", "warzone", "bach", "chorales", "licence"]


def build_t5_tokenizer():
    """A `transformers.T5Tokenizer` over an in-memory Unigram vocabulary (no files, no hub).

    Returns:
        T5Tokenizer with `<pad>`=0, `</s>`=1, `<unk>`=2, about 200 pieces, no `<extra_id_*>`.
    """
    from transformers import T5Tokenizer

    pieces: list[str] = []
    for word in CAPTION_WORDS:
        pieces.append("▁" + word)
    for ch in string.ascii_lowercase + string.digits + string.punctuation:
        pieces += ["▁" + ch, ch]
    pieces += [c for c in string.ascii_uppercase] + ["▁"]
    seen: set[str] = set()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    for i, piece in enumerate(p for p in pieces if not (p in seen or seen.add(p))):
        vocab.append((piece, -math.log(2.0 + i)))
    return T5Tokenizer(vocab=vocab, extra_ids=0)
