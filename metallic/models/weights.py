"""Map a GGUF file's tensors onto the transformer's weights, one layer at a time.

Tensor names follow llama.cpp's conventions (`blk.N.attn_q.weight`, ...), the same for every family;
which optional tensors must exist is decided by the config (biases for qwen2, QK norms for qwen3 and
gemma3, the sandwich norms of gemma).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from metallic.errors import GGUFError, MetallicError
from metallic.gguf.config import ModelConfig
from metallic.gguf.reader import GGUFFile, TensorInfo
from metallic.ops.linear import LinearWeight, stack
from metallic.quant.formats import block_format
from metallic.quant.reference import dequantize_rows


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    qkv: LinearWeight  # q | k | v stacked
    o: LinearWeight
    ffn_norm: torch.Tensor
    gate_up: LinearWeight  # gate | up stacked
    down: LinearWeight
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_ffn_norm: torch.Tensor | None = None


@dataclass
class ModelWeights:
    embedding: torch.Tensor  # [vocab, hidden]; shares storage with `output` when tied
    output: LinearWeight
    output_norm: torch.Tensor
    layers: list[LayerWeights]
    rope_freqs: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held for weights (a tied embedding counted once)."""
        seen: set[int] = set()
        total = 0
        for t in _all_tensors(self):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def _all_tensors(w: ModelWeights) -> list[torch.Tensor]:
    tensors = [w.embedding, w.output.dense, w.output_norm]  # the output is always dense
    if w.rope_freqs is not None:
        tensors.append(w.rope_freqs)
    for layer in w.layers:
        for value in vars(layer).values():
            if isinstance(value, LinearWeight):
                if value.dense is not None:
                    tensors.append(value.dense)
                for packed in value.native or ():
                    tensors.extend(packed.planes)
                if value.bias is not None:
                    tensors.append(value.bias)
            elif value is not None:
                tensors.append(value)
    return tensors


class WeightLoader:
    """Turns mapped tensors into device weights: dense in the compute dtype, or (`native`) the
    GGUF blocks themselves for the Triton kernels, where the kernels know the format."""

    def __init__(
        self, gguf: GGUFFile, device: torch.device, dtype: torch.dtype, native: bool = False
    ) -> None:
        self.gguf = gguf
        self.device = device
        self.dtype = dtype
        self.native = native

    def _info(self, name: str) -> TensorInfo:
        info = self.gguf.tensors.get(name)
        if info is None:
            raise GGUFError(self.gguf.path, f"missing tensor {name}")
        try:
            block_format(info.ggml_type, name)
        except MetallicError as err:
            raise GGUFError(self.gguf.path, str(err)) from None
        return info

    def has(self, name: str) -> bool:
        return name in self.gguf.tensors

    def vector(self, name: str) -> torch.Tensor:
        """A norm weight or bias: always float32 (tiny, and precision matters there)."""
        info = self._info(name)
        return dequantize_rows(info.raw_bytes(), info.ggml_type, info.shape).to(self.device)

    def matrix(
        self,
        name: str,
        rows: int,
        cols: int,
        bias: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LinearWeight:
        info = self._info(name)
        if info.shape != (rows, cols):
            raise GGUFError(
                self.gguf.path, f"tensor {name} has shape {info.shape}, expected {(rows, cols)}"
            )
        bias_vector = self.vector(bias) if bias else None
        if self.native and dtype is None:
            from metallic.kernels import KERNEL_TYPES, prepare_weight

            if info.ggml_type in KERNEL_TYPES:
                raw = info.raw_bytes().to(self.device)
                packed = prepare_weight(raw, info.ggml_type, rows, cols, tensor_name=name)
                return LinearWeight(
                    (info.ggml_type,), (rows,), cols, native=(packed,), bias=bias_vector
                )
        dense = dequantize_rows(
            info.raw_bytes(), info.ggml_type, info.shape, dtype=dtype or self.dtype
        )
        return LinearWeight(
            (info.ggml_type,), (rows,), cols, dense=dense.to(self.device), bias=bias_vector
        )


def load_weights(
    gguf: GGUFFile,
    config: ModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    progress: Callable[[int, int], None] | None = None,
    *,
    vocab_dtype: torch.dtype | None = None,
    native: bool = False,
) -> ModelWeights:
    """Build every layer's weights; `progress(done, total)` is called after each layer.

    `vocab_dtype` overrides `dtype` for the (largest) embedding/output matrix, which stays
    dense (token lookups read its rows); `native` keeps the layers' matrices in GGUF blocks."""
    load = WeightLoader(gguf, device, dtype, native)
    c = config
    total = c.n_layers + 1
    tied = not load.has("output.weight")
    vocab_dtype = vocab_dtype or dtype
    vocab = (c.vocab_size, c.hidden_size)
    embedding = load.matrix("token_embd.weight", *vocab, dtype=vocab_dtype)
    output = embedding if tied else load.matrix("output.weight", *vocab, dtype=vocab_dtype)
    rope_freqs = load.vector("rope_freqs.weight") if load.has("rope_freqs.weight") else None
    if progress:
        progress(1, total)
    layers = []
    for i in range(c.n_layers):
        p = f"blk.{i}."

        def bias(kind: str, prefix: str = p) -> str | None:
            return f"{prefix}attn_{kind}.bias" if c.qkv_bias else None

        layer = LayerWeights(
            attn_norm=load.vector(p + "attn_norm.weight"),
            qkv=stack(
                [
                    load.matrix(p + "attn_q.weight", c.q_size, c.hidden_size, bias("q")),
                    load.matrix(p + "attn_k.weight", c.kv_size, c.hidden_size, bias("k")),
                    load.matrix(p + "attn_v.weight", c.kv_size, c.hidden_size, bias("v")),
                ]
            ),
            o=load.matrix(p + "attn_output.weight", c.hidden_size, c.q_size),
            ffn_norm=load.vector(p + "ffn_norm.weight"),
            gate_up=stack(
                [
                    load.matrix(p + "ffn_gate.weight", c.ffn_size, c.hidden_size),
                    load.matrix(p + "ffn_up.weight", c.ffn_size, c.hidden_size),
                ]
            ),
            down=load.matrix(p + "ffn_down.weight", c.hidden_size, c.ffn_size),
        )
        if c.qk_norm:
            layer.q_norm = load.vector(p + "attn_q_norm.weight")
            layer.k_norm = load.vector(p + "attn_k_norm.weight")
        if c.sandwich_norms:
            layer.post_attn_norm = load.vector(p + "post_attention_norm.weight")
            layer.post_ffn_norm = load.vector(p + "post_ffw_norm.weight")
        layers.append(layer)
        if progress:
            progress(i + 2, total)
    return ModelWeights(
        embedding=embedding.dense,
        output=output,
        output_norm=load.vector("output_norm.weight"),
        layers=layers,
        rope_freqs=rope_freqs,
    )
