"""Bytes and FLOPs each op of a model step must move and compute: the roofline's inputs.

Counted from the config's shapes, the weights' formats (ggml block sizes, or the dense dtype the
CPU path holds) and a step's shape (each sequence's first position and token count), never
measured. Bytes are what an op has to read and write at least: its weights once, its inputs and
outputs once, for attention each sequence's visible keys and values once. FLOPs are counted for
the products (2 per multiply-add) and attention's two products; norms, RoPE, the activation and
the embedding lookup are memory-bound and count none.

Dividing by an op's measured time gives its achieved GB/s and TFLOP/s; the time the device's
limits allow, max(bytes / bandwidth, FLOPs / peak), over the measured time is the fraction of the
roofline reached.
"""

from __future__ import annotations

from dataclasses import dataclass

from metallic.models.transformer import Transformer
from metallic.ops.linear import LinearWeight
from metallic.quant.formats import tensor_nbytes
from metallic.runtime.profiler import OpKey, StepShape

F32 = 4


@dataclass(frozen=True)
class Cost:
    bytes: float = 0.0
    flops: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.bytes + other.bytes, self.flops + other.flops)

    def __mul__(self, n: float) -> Cost:
        return Cost(self.bytes * n, self.flops * n)


@dataclass(frozen=True)
class Limits:
    """What the device can do at most: copy bandwidth (bytes read + written per second) and
    dense matmul throughput (FLOP/s)."""

    bandwidth: float
    flops: float

    def floor_seconds(self, cost: Cost) -> float:
        """The least time `cost` can take on this device."""
        return max(cost.bytes / self.bandwidth, cost.flops / self.flops)

    def bound(self, cost: Cost) -> str:
        return "compute" if cost.flops / self.flops > cost.bytes / self.bandwidth else "memory"


def matrix_bytes(weight: LinearWeight) -> int:
    """Bytes of the matrix a product reads: each part in its GGUF format (the kernels read the
    blocks as stored), or the dense matrix in its dtype; plus the bias."""
    if weight.dense is not None:
        held = weight.dense.numel() * weight.dense.element_size()
    else:
        held = sum(
            tensor_nbytes(t, rows * weight.in_features)
            for t, rows in zip(weight.ggml_types, weight.part_rows, strict=True)
        )
    bias = weight.bias
    return held + (0 if bias is None else bias.numel() * bias.element_size())


class Roofline:
    def __init__(self, model: Transformer) -> None:
        c = model.config
        self.config = c
        self.act = model.act_dtype.itemsize  # activations and the KV cache
        w = model.weights
        self.windows = [c.sliding_window if c.is_sliding(i) else 0 for i in range(c.n_layers)]
        self.layer_bytes = [
            {
                "qkv": matrix_bytes(layer.qkv),
                "attn_out": matrix_bytes(layer.o),
                "gate_up": matrix_bytes(layer.gate_up),
                "down": matrix_bytes(layer.down),
            }
            for layer in w.layers
        ]
        self.output_bytes = matrix_bytes(w.output)
        self.embedding_row_bytes = matrix_bytes(w.embedding) / w.embedding.out_features
        self._known: dict[StepShape, dict[OpKey, Cost]] = {}

    def costs(self, shape: StepShape) -> dict[OpKey, Cost]:
        """Every op's cost in a forward of `shape`, keyed as the profiler keys its times."""
        if shape not in self._known:
            self._known[shape] = self._costs(shape)
        return self._known[shape]

    def _costs(self, shape: StepShape) -> dict[OpKey, Cost]:
        c, a = self.config, self.act
        t, rows, h = shape.tokens, shape.logit_rows, c.hidden_size
        qkv_out = c.q_size + 2 * c.kv_size

        def product(weight_bytes: int, n_in: int, n_out: int, m: int = t) -> Cost:
            return Cost(weight_bytes + m * (n_in + n_out) * a, 2.0 * m * n_in * n_out)

        # A norm that adds the residual: reads the block's output and x, writes x and its input
        # to the next product.
        residual_norm = Cost(t * h * (a + F32 + F32 + a) + 2 * h * F32)
        out: dict[OpKey, Cost] = {
            ("embed", -1): Cost(t * (self.embedding_row_bytes + h * F32)),
            ("output_norm", -1): Cost(rows * h * (a + F32 + F32 + F32) + h * F32),
            ("output", -1): product(self.output_bytes, h, c.vocab_size, rows),
        }
        attention = {w: self._attention(shape, w) for w in set(self.windows)}
        for i, (weights, window) in enumerate(zip(self.layer_bytes, self.windows, strict=True)):
            first_norm = Cost(t * h * (F32 + a) + h * F32)
            out["attn_norm", i] = first_norm if i == 0 else residual_norm
            out["qkv", i] = product(weights["qkv"], h, qkv_out)
            out["rope", i] = Cost(2 * t * (c.q_size + c.kv_size) * a)
            out["attention", i] = attention[window]
            out["attn_out", i] = product(weights["attn_out"], c.q_size, h)
            out["ffn_norm", i] = residual_norm
            out["gate_up", i] = product(weights["gate_up"], h, 2 * c.ffn_size)
            out["activation", i] = Cost(t * 3 * c.ffn_size * a)
            out["down", i] = product(weights["down"], c.ffn_size, h)
        return out

    def _attention(self, shape: StepShape, window: int) -> Cost:
        """Storing the step's keys and values, reading each sequence's visible ones once, and
        QK^T and PV over every (query, visible key) pair."""
        c, a = self.config, self.act
        kv_row = 2 * c.kv_size * a  # one position's keys and values
        moved = flops = 0.0
        for start, n in shape.chunks:
            end = start + n
            read = min(end, window + n - 1) if window else end
            moved += n * kv_row + read * kv_row + 2 * n * c.q_size * a
            flops += 4.0 * c.n_heads * c.head_dim * visible_pairs(start, end, window)
        return Cost(moved, flops)


def visible_pairs(start: int, end: int, window: int) -> int:
    """(query, key) pairs of causal attention for the queries at positions start .. end - 1:
    the query at p sees p + 1 keys, at most `window` (0: no window)."""

    def up_to(n: int) -> int:  # the pairs of the queries at positions 0 .. n - 1
        if not window or n <= window:
            return n * (n + 1) // 2
        return window * (window + 1) // 2 + (n - window) * window

    return up_to(end) - up_to(start)
