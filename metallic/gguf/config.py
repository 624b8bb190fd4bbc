"""Typed model configuration, one builder per architecture, read from GGUF metadata.

The families differ in configuration, not in code: the one transformer in `metallic.models` reads
these fields. A missing required key is a `ConfigError` naming the key and the file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from metallic.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """Everything the transformer needs to know about one model, family quirks included."""

    arch: str
    vocab_size: int
    context_length: int
    hidden_size: int
    n_layers: int
    ffn_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_base: float
    rope_dim: int
    rope_neox: bool  # rotate halves (NeoX) instead of interleaved pairs (GPT-J / llama)
    rope_linear_scale: float = 1.0  # positions are divided by this (rope.scaling.type linear)
    sliding_window: int = 0  # 0 = every layer attends to the whole context
    sliding_layers: tuple[bool, ...] = ()  # per layer: does it use the sliding window?
    local_rope_base: float = 0.0  # rope base of sliding layers when it differs (gemma3)
    qk_norm: bool = False
    qkv_bias: bool = False
    sandwich_norms: bool = False  # gemma: extra norms after attention and after the MLP
    embed_scale: float = 1.0
    activation: str = "silu"  # gate activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    attn_scale: float = 0.0  # softmax scale; 0 means 1/sqrt(head_dim)

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def softmax_scale(self) -> float:
        return self.attn_scale or 1.0 / math.sqrt(self.head_dim)

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_layers) and self.sliding_layers[layer]

    def layer_rope_base(self, layer: int) -> float:
        if self.local_rope_base and self.is_sliding(layer):
            return self.local_rope_base
        return self.rope_base


class _Keys:
    """Reads `{arch}.*` metadata with errors that name the key and the file."""

    def __init__(self, metadata: Mapping[str, Any], arch: str, source: str) -> None:
        self.metadata = metadata
        self.arch = arch
        self.source = source

    def get(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        full = key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"
        value = self.metadata.get(full)
        if value is None:
            if required:
                raise ConfigError(f"{self.source}: missing metadata key {full}")
            return default
        return value

    def int(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default, required=default is None)
        if isinstance(value, list):  # per-layer arrays: metallic supports uniform layers only
            if len(set(value)) != 1:
                raise ConfigError(f"{self.source}: per-layer values of {self.arch}.{key} differ")
            value = value[0]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{self.source}: {self.arch}.{key} must be a non-negative integer")
        return value

    def float(self, key: str, default: float | None = None) -> float:
        value = self.get(key, default, required=default is None)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or not math.isfinite(value):
            raise ConfigError(f"{self.source}: {self.arch}.{key} must be a finite number")
        return float(value)

    def vocab_size(self) -> int:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, list) and tokens:
            return len(tokens)
        return self.int("vocab_size")


def _common(k: _Keys) -> dict[str, Any]:
    hidden = k.int("embedding_length")
    n_heads = k.int("attention.head_count")
    if n_heads == 0 or hidden == 0:
        raise ConfigError(f"{k.source}: {k.arch} has zero heads or zero width")
    n_kv_heads = k.int("attention.head_count_kv", n_heads)
    if n_kv_heads == 0 or n_heads % n_kv_heads:
        raise ConfigError(f"{k.source}: {n_heads} heads do not divide into {n_kv_heads} KV heads")
    head_dim = k.int("attention.key_length", hidden // n_heads)
    if k.int("attention.value_length", head_dim) != head_dim:
        raise ConfigError(f"{k.source}: key and value head sizes differ (unsupported)")
    return dict(
        arch=k.arch,
        vocab_size=k.vocab_size(),
        context_length=k.int("context_length"),
        hidden_size=hidden,
        n_layers=k.int("block_count"),
        ffn_size=k.int("feed_forward_length"),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        rms_eps=k.float("attention.layer_norm_rms_epsilon", 1e-6),
        rope_base=k.float("rope.freq_base", 10000.0),
        rope_dim=k.int("rope.dimension_count", head_dim),
    )


def _rope_linear_scale(k: _Keys) -> float:
    """Linear position scaling; Llama-3's frequency scaling comes as the rope_freqs tensor."""
    kind = k.get("rope.scaling.type", "none")
    if kind == "linear":
        return k.float("rope.scaling.factor", 1.0) or 1.0
    if kind == "none":
        return 1.0
    raise ConfigError(f"{k.source}: unsupported rope scaling type {kind!r}")


def _llama(k: _Keys) -> ModelConfig:
    base = _common(k)
    window = k.int("attention.sliding_window", 0)
    return ModelConfig(
        **base,
        rope_neox=False,
        rope_linear_scale=_rope_linear_scale(k),
        sliding_window=window,
        sliding_layers=(True,) * base["n_layers"] if window else (),
    )


def _qwen2(k: _Keys) -> ModelConfig:
    return ModelConfig(
        **_common(k), rope_neox=True, rope_linear_scale=_rope_linear_scale(k), qkv_bias=True
    )


def _qwen3(k: _Keys) -> ModelConfig:
    return ModelConfig(
        **_common(k), rope_neox=True, rope_linear_scale=_rope_linear_scale(k), qk_norm=True
    )


GEMMA3_SLIDING_PERIOD = 6  # five sliding-window layers, then one global layer
GEMMA3_LOCAL_ROPE_BASE = 10000.0


def _gemma3(k: _Keys) -> ModelConfig:
    base = _common(k)
    n_layers = base["n_layers"]
    sliding = tuple((i + 1) % GEMMA3_SLIDING_PERIOD != 0 for i in range(n_layers))
    return ModelConfig(
        **base,
        rope_neox=True,
        rope_linear_scale=_rope_linear_scale(k),
        sliding_window=k.int("attention.sliding_window"),
        sliding_layers=sliding,
        local_rope_base=GEMMA3_LOCAL_ROPE_BASE,
        qk_norm=True,
        sandwich_norms=True,
        embed_scale=math.sqrt(base["hidden_size"]),
        activation="gelu_tanh",
    )


BUILDERS: dict[str, Callable[[_Keys], ModelConfig]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma3": _gemma3,
}


def config_from_metadata(metadata: Mapping[str, Any], source: str = "model") -> ModelConfig:
    """Build the typed config of a supported architecture, or explain what is missing."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ConfigError(f"{source}: missing metadata key general.architecture")
    builder = BUILDERS.get(arch)
    if builder is None:
        supported = ", ".join(sorted(BUILDERS))
        raise ConfigError(f"{source}: unknown architecture {arch!r} (supported: {supported})")
    return builder(_Keys(metadata, arch, source))
