"""Write GGUF models of real architectures with random weights, at any size and quantization mix.

Tests need small models of every supported architecture, and benchmarks need full-size ones
(an 8B Q4_K_M is 4.9 GB), neither of which can be downloaded or committed. The files written here
carry the tensor names, shapes and metadata keys llama.cpp expects, the per-tensor types its
quantizer would choose for a named mix, and random weights of realistic magnitude.

Speed comes from never quantizing a full model: each ggml type gets one pool of randomly
quantized blocks (a prime number of them, so rows don't repeat in step), and every tensor is that
pool tiled from a random start. ``fill="sparse"`` writes only the header and leaves the tensor data
as a file hole, for tests that open multi-GB files without paying for their bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import itertools
import os
import string
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType

from metallic.errors import MetallicError
from metallic.gguf.reader import open_gguf
from metallic.quant.quantize import quantize

T = GGMLQuantizationType

ARCHES = ("llama", "qwen2", "qwen3", "gemma3")
WEIGHT_STD = 0.02  # std of the matrices' values, as in trained models of these sizes
NORM_SPREAD = 0.05  # norm weights are 1 +- this (gemma3's files store 1 + w too)
QUANTIZATION_VERSION = 2  # ggml's current block layout version, written by llama.cpp's quantizer
# Blocks per pool, by block size: primes, so a pool never lines up with a power-of-two row.
_POOL_BLOCKS = {1: 262_139, 32: 8_191, 256: 1_021}


@dataclass(frozen=True)
class ModelShape:
    """The hyperparameters that fix a decoder's tensors and metadata."""

    arch: str
    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    rope_base: float
    rms_eps: float
    tied_embeddings: bool
    qkv_bias: bool = False  # qwen2 only
    sliding_window: int = 0  # gemma3 only: local layers' window; 0 makes every layer global
    name: str = "synthetic"

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise MetallicError(f"unknown architecture {self.arch!r} (known: {', '.join(ARCHES)})")
        for field in ("n_layers", "hidden", "ffn", "n_heads", "n_kv_heads", "head_dim"):
            if getattr(self, field) <= 0:
                raise MetallicError(f"model shape {self.name}: {field} must be positive")
        if self.n_heads % self.n_kv_heads:
            raise MetallicError(
                f"model shape {self.name}: {self.n_heads} heads are not a multiple of "
                f"{self.n_kv_heads} kv heads"
            )
        if self.qkv_bias and self.arch != "qwen2":
            raise MetallicError(f"model shape {self.name}: only qwen2 has q/k/v biases")
        if self.sliding_window and self.arch != "gemma3":
            raise MetallicError(f"model shape {self.name}: only gemma3 has a sliding window")
        if self.arch == "qwen2" and self.n_heads * self.head_dim != self.hidden:
            raise MetallicError(
                f"model shape {self.name}: qwen2 needs n_heads * head_dim == hidden"
            )

    @property
    def qk_norm(self) -> bool:
        """Whether q and k are RMS-normed per head; llama.cpp requires it exactly for these."""
        return self.arch in ("qwen3", "gemma3")

    @property
    def post_norms(self) -> bool:
        """Whether the attention and FFN outputs are normed again before the residual add."""
        return self.arch == "gemma3"


PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("llama", 32, 4096, 14336, 32, 8, 128, 128256, 8192, 500000.0, 1e-5, False,
                   name="llama3-8b"),
        ModelShape("llama", 22, 2048, 5632, 32, 4, 64, 32000, 2048, 10000.0, 1e-5, False,
                   name="tinyllama-1.1b"),
        ModelShape("qwen2", 24, 896, 4864, 14, 2, 64, 151936, 32768, 1e6, 1e-6, True,
                   qkv_bias=True, name="qwen2-0.5b"),
        ModelShape("qwen3", 28, 1024, 3072, 16, 8, 128, 151936, 40960, 1e6, 1e-6, True,
                   name="qwen3-0.6b"),
        ModelShape("gemma3", 18, 640, 2048, 4, 1, 256, 262144, 32768, 1e6, 1e-6, True,
                   sliding_window=512, name="gemma3-270m"),
        # Tiny shapes for tests. tiny-qwen3's heads are wider than hidden / n_heads like the real
        # ones; tiny-gemma3's hidden is no multiple of 256 (like the 270M's 640, so K-quants fall
        # back as there) and its 6 layers hold 5 local and 1 global, with a window short prompts
        # reach.
        ModelShape("llama", 2, 256, 512, 4, 2, 64, 512, 2048, 10000.0, 1e-5, False,
                   name="tiny-llama"),
        ModelShape("qwen2", 2, 256, 768, 4, 2, 64, 512, 2048, 1e6, 1e-6, True,
                   qkv_bias=True, name="tiny-qwen2"),
        ModelShape("qwen3", 3, 256, 768, 4, 2, 128, 512, 2048, 1e6, 1e-6, True,
                   name="tiny-qwen3"),
        ModelShape("gemma3", 6, 128, 512, 2, 1, 128, 512, 2048, 1e6, 1e-6, True,
                   sliding_window=16, name="tiny-gemma3"),
    )
}  # fmt: skip

# Named mixes: the type most matrices get and the general.file_type llama.cpp records for it.
MIXES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "F32": (T.F32, LlamaFileType.ALL_F32),
    "F16": (T.F16, LlamaFileType.MOSTLY_F16),
    "BF16": (T.BF16, LlamaFileType.MOSTLY_BF16),
    "Q8_0": (T.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "Q4_0": (T.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "Q4_1": (T.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "Q5_0": (T.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "Q5_1": (T.Q5_1, LlamaFileType.MOSTLY_Q5_1),
    "Q2_K": (T.Q2_K, LlamaFileType.MOSTLY_Q2_K),
    "Q3_K_S": (T.Q3_K, LlamaFileType.MOSTLY_Q3_K_S),
    "Q3_K_M": (T.Q3_K, LlamaFileType.MOSTLY_Q3_K_M),
    "Q3_K_L": (T.Q3_K, LlamaFileType.MOSTLY_Q3_K_L),
    "Q4_K_S": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_S),
    "Q4_K_M": (T.Q4_K, LlamaFileType.MOSTLY_Q4_K_M),
    "Q5_K_S": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_S),
    "Q5_K_M": (T.Q5_K, LlamaFileType.MOSTLY_Q5_K_M),
    "Q6_K": (T.Q6_K, LlamaFileType.MOSTLY_Q6_K),
}
WEIGHT_TYPES = frozenset(t for t, _ in MIXES.values())

# A K-quant cannot hold a row that is not whole 256-blocks; llama.cpp's quantizer then uses these.
_ROW_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_FLOAT_TYPES = (T.F32, T.F16, T.BF16)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the plan: torch-order shape and its role for the mix rules."""

    name: str
    shape: tuple[int, ...]
    role: str  # "token_embd", "output", "attn_v", "ffn_down", ... or "vector" for 1-D
    layer: int = -1


def resolve_shape(shape: ModelShape | str) -> ModelShape:
    """A shape itself, or the preset of that name (an unknown name lists the presets)."""
    if isinstance(shape, ModelShape):
        return shape
    try:
        return PRESETS[shape]
    except KeyError:
        raise MetallicError(
            f"unknown model shape {shape!r} (presets: {', '.join(PRESETS)})"
        ) from None


def tensor_plan(shape: ModelShape) -> list[TensorSpec]:
    """Every tensor llama.cpp loads for ``shape``, in the order its converter writes them."""
    q_rows, kv_rows = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    plan = [TensorSpec("token_embd.weight", (shape.vocab_size, shape.hidden), "token_embd")]
    for i in range(shape.n_layers):

        def add(suffix: str, dims: tuple[int, ...], layer: int = i) -> None:
            role = suffix.removesuffix(".weight") if len(dims) == 2 else "vector"
            plan.append(TensorSpec(f"blk.{layer}.{suffix}", dims, role, layer))

        add("attn_norm.weight", (shape.hidden,))
        add("attn_q.weight", (q_rows, shape.hidden))
        add("attn_k.weight", (kv_rows, shape.hidden))
        add("attn_v.weight", (kv_rows, shape.hidden))
        if shape.qkv_bias:
            add("attn_q.bias", (q_rows,))
            add("attn_k.bias", (kv_rows,))
            add("attn_v.bias", (kv_rows,))
        if shape.qk_norm:
            add("attn_q_norm.weight", (shape.head_dim,))
            add("attn_k_norm.weight", (shape.head_dim,))
        add("attn_output.weight", (shape.hidden, q_rows))
        if shape.post_norms:
            add("post_attention_norm.weight", (shape.hidden,))
        add("ffn_norm.weight", (shape.hidden,))
        add("ffn_gate.weight", (shape.ffn, shape.hidden))
        add("ffn_up.weight", (shape.ffn, shape.hidden))
        add("ffn_down.weight", (shape.hidden, shape.ffn))
        if shape.post_norms:
            add("post_ffw_norm.weight", (shape.hidden,))
    plan.append(TensorSpec("output_norm.weight", (shape.hidden,), "vector"))
    if not shape.tied_embeddings:
        plan.append(TensorSpec("output.weight", (shape.vocab_size, shape.hidden), "output"))
    return plan


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get more bits in *_M mixes."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def _block_size(ggml_type: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[ggml_type][0]


def _mix_rule(mix: str, spec: TensorSpec, shape: ModelShape) -> GGMLQuantizationType:
    """The type llama.cpp's quantizer picks for ``spec`` under ``mix``, before row fallbacks."""
    base = MIXES[mix][0]
    if base in _FLOAT_TYPES:
        return base
    n = shape.n_layers
    layer = spec.layer
    if spec.role == "output" or (spec.role == "token_embd" and shape.tied_embeddings):
        if spec.shape[-1] % _block_size(base):
            return T.Q8_0
        return base if base == T.Q8_0 else T.Q6_K
    if spec.role == "attn_v":
        chosen = base
        if mix == "Q2_K":
            chosen = T.Q4_K if shape.n_heads // shape.n_kv_heads >= 4 else T.Q3_K
        elif mix == "Q3_K_M":
            chosen = T.Q5_K if layer < 2 else T.Q4_K
        elif mix == "Q3_K_L":
            chosen = T.Q5_K
        elif mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n):
            chosen = T.Q6_K
        elif mix == "Q4_K_S" and layer < 4:
            chosen = T.Q5_K
        # llama.cpp's 70B rule: an 80-layer llama with grouped kv heads
        is_70b = shape.arch == "llama" and n == 80 and shape.n_heads != shape.n_kv_heads
        if is_70b and chosen in (T.Q3_K, T.Q4_K):
            chosen = T.Q5_K
        return chosen
    if spec.role == "ffn_down":
        if mix == "Q2_K":
            return T.Q3_K
        if mix == "Q3_K_M":
            return T.Q5_K if layer < n // 16 else T.Q4_K
        if mix == "Q3_K_L":
            return T.Q5_K
        if mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n):
            return T.Q6_K
        if mix == "Q4_K_S" and layer < n // 8:
            return T.Q5_K
        return base
    if spec.role == "attn_output":
        return {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(mix, base)
    return base


def _fit_row(ggml_type: GGMLQuantizationType, row: int) -> GGMLQuantizationType:
    """llama.cpp's fallback for a row that is not whole blocks of ``ggml_type``."""
    if row % _block_size(ggml_type) == 0:
        return ggml_type
    fallback = _ROW_FALLBACK.get(ggml_type, ggml_type)
    return fallback if row % _block_size(fallback) == 0 else T.F16


def _parse_type(name: str) -> GGMLQuantizationType:
    try:
        ggml_type = T[name.upper()]
    except KeyError:
        ggml_type = None
    if ggml_type not in WEIGHT_TYPES:
        known = ", ".join(sorted(t.name for t in WEIGHT_TYPES))
        raise MetallicError(f"unknown or unsupported tensor type {name!r} (known: {known})")
    return ggml_type


def _split_mix(mix: str | Mapping[str, str]) -> tuple[str, dict[str, GGMLQuantizationType]]:
    """A mix name, or a mapping of tensor-name globs to types with an optional ``"base"`` mix."""
    if isinstance(mix, str):
        overrides: dict[str, str] = {}
        base = mix
    else:
        overrides = {k: v for k, v in mix.items() if k != "base"}
        base = mix.get("base", "Q8_0")
    if base.upper() not in MIXES:
        raise MetallicError(f"unknown mix {base!r} (known: {', '.join(MIXES)})")
    return base.upper(), {pattern: _parse_type(t) for pattern, t in overrides.items()}


def tensor_types(
    shape: ModelShape | str, mix: str | Mapping[str, str] = "Q8_0"
) -> dict[str, GGMLQuantizationType]:
    """The ggml type of every tensor of ``shape`` under ``mix`` (1-D tensors are always F32).

    A named mix follows llama.cpp's quantizer: e.g. Q4_K_M is Q4_K except output.weight (or the
    tied token_embd) in Q6_K and attn_v / ffn_down in Q6_K on the layers its "use more bits" rule
    picks; rows that are not whole blocks fall back (Q4_K -> Q5_0, Q6_K -> Q8_0, ...). A mapping
    ``{"base": MIX, GLOB: TYPE, ...}`` sets the first matching glob's type instead (the base
    mix, Q8_0 if not given, decides the rest).
    """
    shape = resolve_shape(shape)
    base, overrides = _split_mix(mix)
    types: dict[str, GGMLQuantizationType] = {}
    for spec in tensor_plan(shape):
        if spec.role == "vector":
            types[spec.name] = T.F32
            continue
        chosen = next(
            (t for pattern, t in overrides.items() if fnmatch.fnmatchcase(spec.name, pattern)),
            None,
        )
        if chosen is None:
            chosen = _mix_rule(base, spec, shape)
        types[spec.name] = _fit_row(chosen, spec.shape[-1])
    return types


# ----------------------------------------------------------------------------- vocabularies


def _gpt2_byte_chars() -> list[str]:
    """The printable character GPT-2's byte-level BPE uses for each byte value 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _word_pieces(space: str) -> Iterator[tuple[str, str]]:
    """Endless (left, right) pairs of existing pieces whose joins are new, distinct pieces.

    Breadth-first over lowercase words with and without a leading space marker, so any vocab
    size gets the shortest (most useful) pieces first.
    """
    frontier = [space, *string.ascii_lowercase]
    while True:
        grown = []
        for left in frontier:
            for letter in string.ascii_lowercase:
                yield left, letter
                grown.append(left + letter)
        frontier = grown


TokenizerKV = dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]

_NORMAL, _UNKNOWN, _CONTROL, _BYTE = 1, 2, 3, 6  # llama.cpp token types


def _synthetic_bpe(vocab_size: int) -> TokenizerKV:
    """A byte-level BPE vocab (gpt2 model): 256 byte tokens, merges, then 3 control tokens."""
    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    n_merges = vocab_size - 256 - len(specials)
    if n_merges < 0:
        raise MetallicError(f"a synthetic BPE vocab needs at least 259 tokens, not {vocab_size}")
    pairs = list(itertools.islice(_word_pieces("Ġ"), n_merges))
    tokens = [*_gpt2_byte_chars(), *(a + b for a, b in pairs), *specials]
    types = [_NORMAL] * (vocab_size - len(specials)) + [_CONTROL] * len(specials)
    bos = vocab_size - 3
    return {
        "tokenizer.ggml.model": ("gpt2", GGUFValueType.STRING, None),
        "tokenizer.ggml.pre": ("gpt-2", GGUFValueType.STRING, None),
        "tokenizer.ggml.tokens": (tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.token_type": (types, GGUFValueType.ARRAY, GGUFValueType.INT32),
        "tokenizer.ggml.merges": (
            [f"{a} {b}" for a, b in pairs] or ["Ġ a"],  # GGUF arrays cannot be empty
            GGUFValueType.ARRAY,
            GGUFValueType.STRING,
        ),
        "tokenizer.ggml.bos_token_id": (bos, GGUFValueType.UINT32, None),
        "tokenizer.ggml.eos_token_id": (bos + 1, GGUFValueType.UINT32, None),
        "tokenizer.ggml.padding_token_id": (bos + 2, GGUFValueType.UINT32, None),
        "tokenizer.ggml.add_bos_token": (True, GGUFValueType.BOOL, None),
    }


def _synthetic_spm(vocab_size: int) -> TokenizerKV:
    """A SentencePiece vocab (llama model) with byte fallback, so it encodes any text."""
    head = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    n_pieces = vocab_size - len(head) - len(byte_tokens)
    if n_pieces < 1 + len(string.ascii_lowercase):
        raise MetallicError(f"a synthetic SPM vocab needs at least 286 tokens, not {vocab_size}")
    joined = (a + b for a, b in _word_pieces("▁"))
    pieces = ["▁", *string.ascii_lowercase]
    pieces += itertools.islice(joined, n_pieces - len(pieces))
    tokens = [*head, *byte_tokens, *pieces]
    scores = [0.0] * (len(head) + len(byte_tokens)) + [-float(i) for i in range(len(pieces))]
    types = [_UNKNOWN, _CONTROL, _CONTROL] + [_BYTE] * 256 + [_NORMAL] * len(pieces)
    return {
        "tokenizer.ggml.model": ("llama", GGUFValueType.STRING, None),
        "tokenizer.ggml.pre": ("default", GGUFValueType.STRING, None),
        "tokenizer.ggml.tokens": (tokens, GGUFValueType.ARRAY, GGUFValueType.STRING),
        "tokenizer.ggml.scores": (scores, GGUFValueType.ARRAY, GGUFValueType.FLOAT32),
        "tokenizer.ggml.token_type": (types, GGUFValueType.ARRAY, GGUFValueType.INT32),
        "tokenizer.ggml.bos_token_id": (1, GGUFValueType.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, GGUFValueType.UINT32, None),
        "tokenizer.ggml.unknown_token_id": (0, GGUFValueType.UINT32, None),
        "tokenizer.ggml.add_bos_token": (True, GGUFValueType.BOOL, None),
        "tokenizer.ggml.add_eos_token": (False, GGUFValueType.BOOL, None),
    }


def _value_type(value: Any) -> GGUFValueType:
    """The GGUF type llama.cpp reads a tokenizer value as (ids are u32, token types i32)."""
    if isinstance(value, bool):
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    return GGUFValueType.STRING


def _copied_vocab(path: Path) -> TokenizerKV:
    """Every ``tokenizer.*`` key of a GGUF file (a vocab-only file or a whole model)."""
    metadata = open_gguf(path).metadata
    if not isinstance(metadata.get("tokenizer.ggml.tokens"), list):
        raise MetallicError(f"{path}: no tokenizer.ggml.tokens array to copy a vocabulary from")
    kv: TokenizerKV = {}
    for key, value in metadata.items():
        if not key.startswith("tokenizer."):
            continue
        if isinstance(value, list):
            if value:  # GGUF arrays cannot be empty
                sub = _value_type(value[0])
                sub = GGUFValueType.INT32 if sub == GGUFValueType.UINT32 else sub
                kv[key] = (value, GGUFValueType.ARRAY, sub)
        else:
            kv[key] = (value, _value_type(value), None)
    return kv


def _tokenizer_kv(vocab: Path | str | None, shape: ModelShape) -> TokenizerKV:
    """Tokenizer metadata: synthetic (``None``: per arch, or ``"bpe"`` / ``"spm"``) or copied."""
    if vocab is None:
        vocab = "spm" if shape.arch == "gemma3" else "bpe"
    if vocab == "bpe":
        return _synthetic_bpe(shape.vocab_size)
    if vocab == "spm":
        return _synthetic_spm(shape.vocab_size)
    return _copied_vocab(Path(vocab))


# ----------------------------------------------------------------------------- writing


class _BlockPools:
    """One pool of random quantized blocks per ggml type, made on first use."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.pools: dict[GGMLQuantizationType, np.ndarray] = {}

    def pool(self, ggml_type: GGMLQuantizationType) -> np.ndarray:
        if ggml_type not in self.pools:
            block_size = _block_size(ggml_type)
            n_blocks = _POOL_BLOCKS[block_size]
            values = self.rng.standard_normal(n_blocks * block_size, dtype=np.float32)
            blocks = np.asarray(quantize(values * np.float32(WEIGHT_STD), ggml_type))
            self.pools[ggml_type] = blocks.reshape(-1).view(np.uint8)
        return self.pools[ggml_type]

    def tensor_bytes(self, ggml_type: GGMLQuantizationType, n_bytes: int) -> np.ndarray:
        """``n_bytes`` of this type's pool, tiled from a random block."""
        pool = self.pool(ggml_type)
        type_size = GGML_QUANT_SIZES[ggml_type][1]
        start = int(self.rng.integers(pool.size // type_size)) * type_size
        return np.resize(np.concatenate((pool[start:], pool[:start])), n_bytes)


def _add_model_metadata(
    writer: GGUFWriter, shape: ModelShape, file_type: LlamaFileType, quantized: bool
) -> None:
    writer.add_name(shape.name)
    writer.add_context_length(shape.context_length)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    if shape.arch in ("qwen3", "gemma3") or shape.head_dim * shape.n_heads != shape.hidden:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_layer_norm_rms_eps(shape.rms_eps)
    writer.add_rope_freq_base(shape.rope_base)
    if shape.arch == "llama":
        writer.add_vocab_size(shape.vocab_size)
        writer.add_rope_dimension_count(shape.head_dim)
    if shape.sliding_window:
        writer.add_sliding_window(shape.sliding_window)
    writer.add_file_type(int(file_type))
    if quantized:
        writer.add_quantization_version(QUANTIZATION_VERSION)


def _vector_values(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    """Norm weights near 1, biases near 0: the magnitudes a trained model has."""
    noise = rng.standard_normal(spec.shape, dtype=np.float32)
    if spec.name.endswith(".bias"):
        return noise * np.float32(WEIGHT_STD)
    return np.float32(1.0) + noise * np.float32(NORM_SPREAD)


def write_synthetic_model(
    path: str | os.PathLike[str],
    shape: ModelShape | str,
    mix: str | Mapping[str, str] = "Q8_0",
    vocab: Path | str | None = None,
    seed: int = 0,
    fill: str = "random",
) -> Path:
    """Write a GGUF model of ``shape`` in ``mix`` with random weights; returns its path.

    ``vocab``: a GGUF file whose ``tokenizer.*`` keys are copied (the vocab size becomes its
    token count), ``"bpe"`` / ``"spm"`` for a synthetic vocab of ``shape.vocab_size`` tokens, or
    ``None`` for the synthetic kind the architecture uses (SPM for gemma3, BPE otherwise).
    ``fill="sparse"`` leaves the tensor data as a hole of the right size (reads as zeros).
    """
    if fill not in ("random", "sparse"):
        raise MetallicError(f"unknown fill {fill!r} (known: random, sparse)")
    path = Path(path)
    shape = resolve_shape(shape)
    tokenizer = _tokenizer_kv(vocab, shape)
    shape = dataclasses.replace(shape, vocab_size=len(tokenizer["tokenizer.ggml.tokens"][0]))
    types = tensor_types(shape, mix)
    file_type = MIXES[_split_mix(mix)[0]][1]
    plan = tensor_plan(shape)

    writer = GGUFWriter(path, shape.arch)
    _add_model_metadata(
        writer, shape, file_type, any(t not in _FLOAT_TYPES for t in types.values())
    )
    for key, (value, vtype, sub_type) in tokenizer.items():
        writer.add_key_value(key, value, vtype, sub_type)
    sizes = []
    for spec in plan:
        ggml_type = types[spec.name]
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        n_bytes = int(np.prod(spec.shape)) // block_size * type_size
        sizes.append(n_bytes)
        writer.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), n_bytes, ggml_type)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        if fill == "sparse":
            assert writer.fout is not None
            data_start = writer.ggml_pad(writer.fout[0].tell(), writer.data_alignment)
            end = data_start + sum(writer.ggml_pad(n, writer.data_alignment) for n in sizes)
        else:
            rng = np.random.default_rng(seed)
            pools = _BlockPools(rng)
            for spec, n_bytes in zip(plan, sizes, strict=True):
                ggml_type = types[spec.name]
                if spec.role == "vector":
                    writer.write_tensor_data(_vector_values(spec, rng))
                else:
                    writer.write_tensor_data(pools.tensor_bytes(ggml_type, n_bytes))
    except OSError as err:
        raise MetallicError(f"{path}: cannot write: {err.strerror or err}") from None
    finally:
        writer.close()
    if fill == "sparse":
        os.truncate(path, end)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m metallic.testing.synthetic OUT.gguf --shape NAME --mix MIX``."""
    parser = argparse.ArgumentParser(
        prog="python -m metallic.testing.synthetic",
        description="Write a GGUF model with random weights.",
    )
    parser.add_argument("out", type=Path, help="GGUF file to write")
    parser.add_argument("--shape", default="tiny-llama", help=f"one of: {', '.join(PRESETS)}")
    parser.add_argument("--mix", default="Q8_0", help=f"one of: {', '.join(MIXES)}")
    parser.add_argument("--vocab", help="GGUF file to copy tokenizer.* from, or bpe / spm")
    parser.add_argument("--fill", default="random", help="random (default) or sparse")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = write_synthetic_model(
            args.out, args.shape, args.mix, args.vocab, args.seed, args.fill
        )
    except MetallicError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    seconds = time.perf_counter() - start
    size = path.stat().st_size
    print(f"wrote {path}: {args.shape} {args.mix}, {size / 1e9:.3f} GB in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
