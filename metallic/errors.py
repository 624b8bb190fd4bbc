"""User-facing errors: each one renders as a single line naming the file and the problem."""

from __future__ import annotations


class MetallicError(Exception):
    """Base of every error metallic reports to a user; the CLI prints ``str(err)`` and exits 2."""

    exit_code = 2


class GGUFError(MetallicError):
    """A GGUF file that cannot be opened: missing, truncated, corrupt or of an unknown layout."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class UnsupportedTensorType(MetallicError):
    """A tensor stored in a ggml format metallic has no dequantizer for (IQ*, TQ*, MXFP4, ...)."""

    def __init__(self, type_name: str, tensor_name: str) -> None:
        super().__init__(f"unsupported tensor type {type_name} in tensor {tensor_name}")
        self.type_name = type_name
        self.tensor_name = tensor_name


class ConfigError(MetallicError):
    """Model metadata that does not describe a model metallic can build."""


class TokenizerError(MetallicError):
    """Tokenizer metadata metallic cannot reproduce exactly (unknown model or pre-tokenizer)."""
