"""The one decoder-only transformer, configured per family by `ModelConfig`.

A step takes a `StepBatch` (tokens of one or more sequences: a prefill chunk or one decode token
each) and returns logits for each sequence's last token or for every token.

The residual stream stays float32; activations entering the matrix products are in the compute
dtype. Each residual add is folded into the norm that follows it (`rms_norm(..., residual=x)`),
so on the GPU the add costs no pass over memory of its own.
"""

from __future__ import annotations

import torch

from metallic.gguf.config import ModelConfig
from metallic.models.kv_store import KVStore
from metallic.models.weights import LayerWeights, ModelWeights
from metallic.ops import RopeTable, apply_rope, embed, gated_activation, linear, rms_norm
from metallic.ops.linear import LinearWeight, fuses_gate, gated_linear, rounding_buffers
from metallic.ops.rope import RopeStep
from metallic.runtime.batch import StepBatch
from metallic.runtime.memory import MemoryPool
from metallic.runtime.profiler import OFF, Hooks
from metallic.runtime.streaming import LayerStreamer


class Transformer:
    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        device: torch.device,
        act_dtype: torch.dtype = torch.float32,
    ) -> None:
        """`act_dtype`: the dtype of activations fed to the matrix products."""
        self.config = config
        self.weights = weights
        self.device = device
        self.act_dtype = act_dtype
        self.streamer: LayerStreamer | None = None  # set when some layers live on the host
        self.profiler: Hooks = OFF  # marks each op's start for a profiler (runtime/profiler.py)
        # The most bytes one product widens a native matrix into at once (a device budget sets
        # it; ops.linear then widens large matrices a slice at a time).
        self.widen_limit: int | None = None
        # One RoPE table per distinct base (gemma3: local and global), shared by its layers.
        self.layer_rope_base = [config.layer_rope_base(i) for i in range(config.n_layers)]
        self.rope = {
            base: RopeTable(
                config.rope_dim,
                base,
                linear_scale=config.rope_linear_scale,
                freq_factors=weights.rope_freqs,
                device=device,
            )
            for base in set(self.layer_rope_base)
        }

    def reserve_positions(self, n_positions: int, memory: MemoryPool | None = None) -> None:
        """Size the RoPE tables for the whole context now (a CUDA graph captures their address);
        with a memory pool they move into its activations kind, where a budget sees them. Their
        blocks are never freed nor compacted: the tables live as long as the model."""
        for base, table in self.rope.items():
            table.ensure(n_positions)
            if memory is not None:
                table.cos = _pooled(memory, table.cos, f"rope cos {base:g}")
                table.sin = _pooled(memory, table.sin, f"rope sin {base:g}")

    def forward(self, batch: StepBatch, cache: KVStore, every_row: bool = False) -> torch.Tensor:
        """float32 logits [B, vocab] of each sequence's last token, or [T, vocab] of every one."""
        c = self.config
        profiler = self.profiler
        profiler.begin(batch, every_row)
        profiler.mark("embed")
        steps = {
            base: table.for_step(batch.positions, batch.max_position)
            for base, table in self.rope.items()
        }
        x = embed(batch.tokens, self.weights.embedding, torch.float32)
        if c.embed_scale != 1.0:
            x *= c.embed_scale
        # The last block's output and its post-norm weight (gemma), not yet added into x.
        delta: torch.Tensor | None = None
        delta_norm: torch.Tensor | None = None
        streamer = self.streamer
        if streamer is not None:
            streamer.begin_step()
        for i, layer in enumerate(self.weights.layers):
            if streamer is not None:
                profiler.mark("stream", i)
                streamer.before_layer(i)
            profiler.mark("attn_norm", i)
            h, h8 = self._norm(delta, delta_norm, x, layer.attn_norm, consumer=layer.qkv)
            if streamer is not None and i:
                streamer.after_layer(i - 1)  # its post-norm weight was read just now
            rope = steps[self.layer_rope_base[i]]
            delta, delta_norm = self._block(i, layer, (h, h8), x, rope, batch, cache)
        profiler.mark("output_norm")
        if not every_row and not batch.decode:  # a decode step's rows are all last rows
            rows = batch.last_rows.long()
            x, delta = x[rows], None if delta is None else delta[rows]
        # f32 into the output matrix: its kernels accumulate in f32, and logits stored in bf16
        # (8 bits of mantissa) would turn near-ties into exact ties that greedy breaks blindly.
        output = self.weights.output
        h, h8 = self._norm(delta, delta_norm, x, self.weights.output_norm, torch.float32, output)
        profiler.mark("output")
        logits = self._linear(h, output, h8).float()
        profiler.end(logits)
        return logits

    def _linear(
        self,
        x: torch.Tensor,
        weight: LinearWeight,
        rounded: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        return linear(x, weight, self.widen_limit, rounded)

    def _norm(
        self,
        delta: torch.Tensor | None,
        delta_norm: torch.Tensor | None,
        x: torch.Tensor,
        weight: torch.Tensor,
        out_dtype: torch.dtype | None = None,
        consumer: LinearWeight | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """norm(x + post_norm(delta)) in the activation dtype, leaving the sum in x: one kernel
        for a block's post-norm, the residual add and the next block's pre-norm. Where the
        `consumer` product rounds its rows of input to int8 (dp4a), the same kernel rounds them
        too (returned second, else None)."""
        eps = self.config.rms_eps
        out_dtype = out_dtype or self.act_dtype
        rounded = None if consumer is None else rounding_buffers(x.shape[0], consumer, out_dtype)
        if delta is None:
            return rms_norm(x, weight, eps, out_dtype=out_dtype, rounded=rounded), rounded
        normed = rms_norm(
            delta,
            weight,
            eps,
            residual=x,
            out_dtype=out_dtype,
            pre_weight=delta_norm,
            rounded=rounded,
        )
        return normed, rounded

    def _block(
        self,
        i: int,
        w: LayerWeights,
        normed: tuple[torch.Tensor, tuple[torch.Tensor, ...] | None],
        x: torch.Tensor,
        rope: RopeStep,
        batch: StepBatch,
        cache: KVStore,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer i on its normed input (h, and h rounded for dp4a products or None); adds the
        attention half into x and returns the MLP half's output with its post-norm weight (both
        applied by the next norm)."""
        c, mark = self.config, self.profiler.mark
        mark("qkv", i)
        h, h8 = normed
        q, k, v = self._linear(h, w.qkv, h8).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(-1, c.n_heads, c.head_dim)
        k = k.view(-1, c.n_kv_heads, c.head_dim)
        v = v.view(-1, c.n_kv_heads, c.head_dim)
        qk_norm = None
        if w.q_norm is not None and w.k_norm is not None:
            qk_norm = (w.q_norm, w.k_norm, c.rms_eps)
        mark("rope", i)  # and the KV-cache write, in the same launch on the GPU
        store = cache.kv_write(i, v, batch)
        q, k = apply_rope(q, k, rope, c.rope_dim, c.rope_neox, qk_norm, store)
        window = c.sliding_window if c.is_sliding(i) else 0
        mark("attention", i)
        out = cache.attend(i, q, batch, c.softmax_scale, window)
        mark("attn_out", i)
        a = self._linear(out.view(-1, c.q_size), w.o)
        mark("ffn_norm", i)
        h, h8 = self._norm(a, w.post_attn_norm, x, w.ffn_norm, consumer=w.gate_up)
        mark("gate_up", i)
        act8 = rounding_buffers(h.shape[0], w.down, h.dtype)
        if fuses_gate(h, w.gate_up, act8):  # the gate|up product's kernel applies it
            act = gated_linear(h, w.gate_up, c.activation)
            mark("activation", i)
        else:
            gate_up = self._linear(h, w.gate_up, h8)
            mark("activation", i)
            act = gated_activation(gate_up, None, c.activation, rounded=act8)
        mark("down", i)
        return self._linear(act, w.down, act8), w.post_ffn_norm


def _pooled(memory: MemoryPool, t: torch.Tensor, name: str) -> torch.Tensor:
    """`t` copied into a new block of the pool's activations kind."""
    block = memory.allocate("activations", t.shape, t.dtype, name=name)
    return block.tensor.copy_(t)


def activation_bytes(config: ModelConfig, act_dtype: torch.dtype, n_tokens: int) -> int:
    """A bound on the activations of one step of `n_tokens` rows: the f32 residual stream and a
    block's output, and each product's input and output in `act_dtype`, with 2x slack for the
    allocator."""
    c, size = config, act_dtype.itemsize
    per_row = 4 * c.hidden_size * 2
    per_row += size * (c.hidden_size + c.q_size + 2 * c.kv_size + c.q_size + 3 * c.ffn_size)
    return 2 * n_tokens * per_row


def widened_bytes(config: ModelConfig, act_dtype: torch.dtype) -> int:
    """The most one product widens a native matrix into (ops.linear's dequantize path, for many
    rows): the stacked gate|up matrix in `act_dtype`, or the output matrix in f32 (its input
    is f32), whichever is larger."""
    c = config
    return max(
        2 * c.ffn_size * c.hidden_size * act_dtype.itemsize, c.vocab_size * c.hidden_size * 4
    )
