"""metallic: run GGUF language models natively quantized, on NVIDIA GPUs and on the CPU.

`metallic.load(path=None) -> Engine` is the entry point; the names below import on first use so
that the file-level tools (`metallic.gguf`, `metallic.quant`) stay light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Engine", "MetallicError", "SamplingParams", "load"]

if TYPE_CHECKING:
    from metallic.engine.engine import Engine, load
    from metallic.engine.sampling import SamplingParams
    from metallic.errors import MetallicError


def __getattr__(name: str) -> Any:
    if name in ("Engine", "load"):
        from metallic.engine import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from metallic.engine.sampling import SamplingParams

        return SamplingParams
    if name == "MetallicError":
        from metallic.errors import MetallicError

        return MetallicError
    raise AttributeError(f"module 'metallic' has no attribute {name!r}")
