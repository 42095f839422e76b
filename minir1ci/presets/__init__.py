"""Bundled presets: small, real-format model/tokenizer directories (see build_tiny.py)."""
from __future__ import annotations

from pathlib import Path


def tiny_dir() -> Path:
    """Directory of the tiny preset: config.json, tokenizer.json, tokenizer_config.json."""
    return Path(__file__).parent / "tiny"
