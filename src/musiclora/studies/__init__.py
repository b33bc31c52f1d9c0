"""Experiments built from the library's pieces: the adaptation study (`adaptation.py`) and its tiny codec."""
