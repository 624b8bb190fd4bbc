"""Typed model configuration, one builder per architecture, read from GGUF metadata.

The families differ in configuration, not in code: the one transformer in `metallic.models` reads
these fields. A missing required key, or a value out of range, is a one-line `ConfigError` naming
the file, the key, the value and what it must be; every value is checked before anything is sized
by it. What only the tensors can confirm (layer count, shapes) is `metallic.gguf.validate`'s.
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


MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS: no file it loads has more
MAX_SHOWN_VALUES = 4  # elements of a per-layer array quoted in an error message


def _shown(value: Any) -> str:
    """A metadata value as an error message quotes it: short, on one line."""
    if isinstance(value, list) and len(value) > MAX_SHOWN_VALUES:
        head = ", ".join(map(repr, value[:MAX_SHOWN_VALUES]))
        return f"[{head}, ... ({len(value)} values)]"
    return repr(value)


class _Keys:
    """Reads `{arch}.*` metadata; a missing or out-of-range value is a one-line `ConfigError`
    naming the file, the key, the value and what it must be."""

    def __init__(
        self, metadata: Mapping[str, Any], arch: str, source: str, layers_in_file: int | None
    ) -> None:
        self.metadata = metadata
        self.arch = arch
        self.source = source
        self.layers_in_file = layers_in_file
        self.n_layers = 0  # known once block_count is read: the length of per-layer arrays

    def full(self, key: str) -> str:
        return key if key.startswith(("general.", "tokenizer.")) else f"{self.arch}.{key}"

    def fail(self, key: str, value: Any, requirement: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.full(key)} = {_shown(value)} {requirement}")

    def get(self, key: str, default: Any = None, *, required: bool = False) -> Any:
        value = self.metadata.get(self.full(key))
        if value is None:
            if required:
                raise ConfigError(f"{self.source}: missing metadata key {self.full(key)}")
            return default
        return value

    def int(self, key: str, default: int | None = None, *, minimum: int = 0) -> int:
        """An integer >= `minimum`; a per-layer array (one value per layer) must hold the same
        value for every layer, since metallic supports uniform layers only."""
        value = self.get(key, default, required=default is None)
        if isinstance(value, list):
            if not self.n_layers:
                raise self.fail(key, value, "must be a single integer, not an array")
            if len(value) != self.n_layers:
                raise self.fail(
                    key, value, f"must hold one value for each of {self.n_layers} layers"
                )
            if len(set(map(repr, value))) != 1:
                raise self.fail(key, value, "differs between layers (unsupported)")
            value = value[0]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise self.fail(key, value, f"must be an integer >= {minimum}")
        return value

    def float(self, key: str, default: float | None = None, *, zero: bool = False) -> float:
        """A finite number > 0 (>= 0 with `zero`)."""
        value = self.get(key, default, required=default is None)
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise self.fail(key, value, f"must be a finite number {'>=' if zero else '>'} 0")
        return float(value)

    def vocab_size(self) -> int:
        """The token list's length; `{arch}.vocab_size`, where given, must agree with it."""
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            return self.int("vocab_size", minimum=1)
        declared = self.get("vocab_size")
        if declared is not None and declared != len(tokens):
            raise self.fail(
                "vocab_size",
                declared,
                f"must equal the {len(tokens)} tokens of tokenizer.ggml.tokens",
            )
        return len(tokens)


def _layer_count(k: _Keys) -> int:
    """block_count, checked before anything is sized by it: at most llama.cpp's limit and, given
    the file, the number of layers whose `blk.N.*` tensors it holds."""
    n_layers = k.int("block_count", minimum=1)
    if n_layers > MAX_LAYERS:
        raise k.fail("block_count", n_layers, f"must be at most {MAX_LAYERS}")
    if k.layers_in_file is not None and n_layers != k.layers_in_file:
        raise k.fail(
            "block_count",
            n_layers,
            f"must equal the {k.layers_in_file} layers whose blk.N tensors the file holds",
        )
    k.n_layers = n_layers
    return n_layers


def _common(k: _Keys) -> dict[str, Any]:
    n_layers = _layer_count(k)
    hidden = k.int("embedding_length", minimum=1)
    n_heads = k.int("attention.head_count", minimum=1)
    n_kv_heads = k.int("attention.head_count_kv", n_heads, minimum=1)
    if n_heads % n_kv_heads:
        raise k.fail(
            "attention.head_count_kv",
            n_kv_heads,
            f"must divide {k.arch}.attention.head_count = {n_heads}",
        )
    if k.get("attention.key_length") is None and hidden < n_heads:
        raise k.fail(
            "attention.head_count",
            n_heads,
            f"must be at most {k.arch}.embedding_length = {hidden} (a head size of at least 1)",
        )
    head_dim = k.int("attention.key_length", hidden // n_heads, minimum=1)
    if k.int("attention.value_length", head_dim, minimum=1) != head_dim:
        raise k.fail(
            "attention.value_length",
            k.get("attention.value_length"),
            f"must equal {k.arch}.attention.key_length = {head_dim} (unsupported otherwise)",
        )
    rope_dim = k.int("rope.dimension_count", head_dim, minimum=2)
    if rope_dim % 2 or rope_dim > head_dim:
        absent = " (absent, so the head size)" if k.get("rope.dimension_count") is None else ""
        requirement = f"must be even and <= head size {head_dim}{absent}"
        raise k.fail("rope.dimension_count", rope_dim, requirement)
    return dict(
        arch=k.arch,
        vocab_size=k.vocab_size(),
        context_length=k.int("context_length", minimum=1),
        hidden_size=hidden,
        n_layers=n_layers,
        ffn_size=k.int("feed_forward_length", minimum=1),
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        rms_eps=k.float("attention.layer_norm_rms_epsilon", 1e-6),
        rope_base=k.float("rope.freq_base", 10000.0),
        rope_dim=rope_dim,
    )


def _rope_linear_scale(k: _Keys) -> float:
    """Linear position scaling; Llama-3's frequency scaling comes as the rope_freqs tensor. A
    factor of 0 means no scaling, as llama.cpp reads it."""
    kind = k.get("rope.scaling.type", "none")
    if kind == "linear":
        return k.float("rope.scaling.factor", 1.0, zero=True) or 1.0
    if kind == "none":
        return 1.0
    raise k.fail("rope.scaling.type", kind, "is unsupported (supported: 'none', 'linear')")


def _sliding_window(k: _Keys, required: bool) -> int:
    """The local layers' window; 0 when the key is absent and not `required`."""
    if not required and k.get("attention.sliding_window") is None:
        return 0
    return k.int("attention.sliding_window", minimum=1)


def _llama(k: _Keys) -> ModelConfig:
    base = _common(k)
    window = _sliding_window(k, required=False)
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
        sliding_window=_sliding_window(k, required=True),
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


def config_from_metadata(
    metadata: Mapping[str, Any], source: str = "model", *, layers_in_file: int | None = None
) -> ModelConfig:
    """Build the typed config of a supported architecture, or explain what is missing or out of
    range. `layers_in_file` (the number of layers whose tensors the file holds; see
    `metallic.gguf.validate`) must then equal block_count."""
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ConfigError(f"{source}: missing metadata key general.architecture")
    builder = BUILDERS.get(arch)
    if builder is None:
        supported = ", ".join(sorted(BUILDERS))
        raise ConfigError(f"{source}: unknown architecture {arch!r} (supported: {supported})")
    return builder(_Keys(metadata, arch, source, layers_in_file))
