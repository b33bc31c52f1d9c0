"""Data: decoding and preprocessing audio, the bundled corpus, user metadata, shards."""
