"""musiclora: LoRA adaptation of text-to-music models at cluster scale."""

__version__ = "0.1.0"
