"""A model's config checked against its file, before anything is allocated or sized by it.

`config_from_metadata` checks each value on its own (ranges, finiteness, heads dividing into KV
heads, RoPE dimensions); what only the tensors can confirm is checked here: that block_count is
the number of layers whose `blk.N.*` tensors the file holds (read first, so no per-layer list or
loop is ever sized by a claimed count), and that every tensor the transformer reads exists, has
exactly the shape the config implies and a format metallic can read. The vocabulary size is the
token list's length, which the embedding's rows must equal. Every violation is a one-line
`MetallicError` naming the file, the tensor or key, its value and what it must be.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from metallic.errors import ConfigError, GGUFError, MetallicError
from metallic.gguf.config import ModelConfig, config_from_metadata
from metallic.gguf.reader import GGUFFile
from metallic.quant.formats import block_format

_LAYER_TENSOR = re.compile(r"blk\.([0-9]+)(?:\.|$)")


@dataclass(frozen=True)
class Dim:
    """One expected tensor dimension and the metadata it comes from (for error messages)."""

    size: int
    source: str


def model_config(gguf: GGUFFile) -> ModelConfig:
    """The model's config, every value checked against the file; raises a one-line
    `MetallicError` at the first violation."""
    source = str(gguf.path)
    config = config_from_metadata(gguf.metadata, source, layers_in_file=layers_in_file(gguf))
    check_tensors(gguf, config)
    return config


def layers_in_file(gguf: GGUFFile) -> int:
    """How many layers the file holds tensors for: blk.0 to blk.N-1, none missing between."""
    layers: set[int] = set()
    for name in gguf.tensors:
        if not name.startswith("blk."):
            continue
        match = _LAYER_TENSOR.match(name)
        if match is None:
            raise ConfigError(f"{gguf.path}: tensor {name!r} has no layer number (blk.N.*)")
        layers.add(int(match.group(1)))
    missing = set(range(len(layers))) - layers
    if missing:
        raise ConfigError(
            f"{gguf.path}: the file holds tensors of layer blk.{max(layers)} but none of "
            f"blk.{min(missing)} (layers must be numbered 0 to N-1)"
        )
    return len(layers)


def expected_shapes(config: ModelConfig, present: set[str]) -> dict[str, tuple[Dim, ...]]:
    """Every tensor the transformer reads and its shape (torch order), given which optional
    tensors (`output.weight`, `rope_freqs.weight`) the file has."""
    c, arch = config, config.arch
    hidden = Dim(c.hidden_size, f"{arch}.embedding_length")
    vocab = Dim(c.vocab_size, "the tokens in tokenizer.ggml.tokens")
    head = Dim(c.head_dim, "the head size")
    q = Dim(c.q_size, f"{arch}.attention.head_count x the head size")
    kv = Dim(c.kv_size, f"{arch}.attention.head_count_kv x the head size")
    ffn = Dim(c.ffn_size, f"{arch}.feed_forward_length")
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if "output.weight" in present:  # else tied to the embedding
        shapes["output.weight"] = (vocab, hidden)
    if "rope_freqs.weight" in present:
        shapes["rope_freqs.weight"] = (Dim(c.rope_dim // 2, f"{arch}.rope.dimension_count / 2"),)
    for i in range(c.n_layers):
        p = f"blk.{i}."
        layer = {
            "attn_norm.weight": (hidden,),
            "attn_q.weight": (q, hidden),
            "attn_k.weight": (kv, hidden),
            "attn_v.weight": (kv, hidden),
            "attn_output.weight": (hidden, q),
            "ffn_norm.weight": (hidden,),
            "ffn_gate.weight": (ffn, hidden),
            "ffn_up.weight": (ffn, hidden),
            "ffn_down.weight": (hidden, ffn),
        }
        if c.qkv_bias:
            layer |= {"attn_q.bias": (q,), "attn_k.bias": (kv,), "attn_v.bias": (kv,)}
        if c.qk_norm:
            layer |= {"attn_q_norm.weight": (head,), "attn_k_norm.weight": (head,)}
        if c.sandwich_norms:
            layer |= {"post_attention_norm.weight": (hidden,), "post_ffw_norm.weight": (hidden,)}
        shapes |= {p + name: dims for name, dims in layer.items()}
    return shapes


def check_tensors(gguf: GGUFFile, config: ModelConfig) -> None:
    """Every tensor the transformer reads: present, of exactly the expected shape, and in a
    format metallic can read."""
    for name, dims in expected_shapes(config, set(gguf.tensors)).items():
        info = gguf.tensor(name)  # a missing tensor is a GGUFError naming it
        expected = tuple(d.size for d in dims)
        if info.shape != expected:
            sources = ", ".join(dict.fromkeys(f"{d.size} = {d.source}" for d in dims))
            raise ConfigError(
                f"{gguf.path}: tensor {name} has shape {info.shape}, expected {expected} "
                f"({sources})"
            )
        try:
            block_format(info.ggml_type, name)
        except MetallicError as err:
            raise GGUFError(gguf.path, str(err)) from None
