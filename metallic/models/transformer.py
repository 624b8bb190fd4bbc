"""The one decoder-only transformer, configured per family by `ModelConfig`.

A step takes a flat batch of tokens from one or more sequences (a prefill chunk or one decode
token each) and returns logits for the rows asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metallic.gguf.config import ModelConfig
from metallic.models.weights import LayerWeights, ModelWeights
from metallic.ops import RopeTable, apply_rope, attention, gated_activation, linear, rms_norm
from metallic.runtime.kv_cache import KVCache


@dataclass(frozen=True)
class SequenceSlice:
    """Tokens `offset .. offset+length` of the flat batch belong to the sequence in `slot`,
    at positions `start .. start+length`."""

    slot: int
    start: int
    offset: int
    length: int


class Transformer:
    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        device: torch.device,
    ) -> None:
        self.config = config
        self.weights = weights
        self.device = device
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

    def forward(
        self,
        tokens: torch.Tensor,
        slices: list[SequenceSlice],
        cache: KVCache,
        logit_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [T] -> float32 logits [R, vocab] for rows `logit_rows` (default: every row)."""
        c = self.config
        for s in slices:
            cache.check_room(s.start + s.length)
        positions = torch.cat(
            [torch.arange(s.start, s.start + s.length, device=self.device) for s in slices]
        )
        angles = {base: table.angles(positions) for base, table in self.rope.items()}
        x = self.weights.embedding[tokens].float()
        if c.embed_scale != 1.0:
            x = x * c.embed_scale
        for i, layer in enumerate(self.weights.layers):
            angle = angles[self.layer_rope_base[i]]
            x = self._block(i, layer, x, positions, angle, slices, cache)
        if logit_rows is not None:
            x = x[logit_rows]
        x = rms_norm(x, self.weights.output_norm, c.rms_eps)
        return linear(x, self.weights.output).float()

    def _block(
        self,
        i: int,
        w: LayerWeights,
        x: torch.Tensor,
        positions: torch.Tensor,
        angles: tuple[torch.Tensor, torch.Tensor],
        slices: list[SequenceSlice],
        cache: KVCache,
    ) -> torch.Tensor:
        c = self.config
        h = rms_norm(x, w.attn_norm, c.rms_eps)
        q, k, v = linear(h, w.qkv).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.reshape(-1, c.n_heads, c.head_dim)
        k = k.reshape(-1, c.n_kv_heads, c.head_dim)
        v = v.reshape(-1, c.n_kv_heads, c.head_dim)
        if w.q_norm is not None and w.k_norm is not None:
            q = rms_norm(q, w.q_norm, c.rms_eps)
            k = rms_norm(k, w.k_norm, c.rms_eps)
        q = apply_rope(q, angles, c.rope_dim, c.rope_neox)
        k = apply_rope(k, angles, c.rope_dim, c.rope_neox)
        window = c.sliding_window if c.is_sliding(i) else 0
        out = torch.empty_like(q)
        for s in slices:
            rows = slice(s.offset, s.offset + s.length)
            keys, values, key_pos = cache.attend_and_store(i, s.slot, s.start, k[rows], v[rows])
            out[rows] = attention(
                q[rows], keys, values, positions[rows], key_pos, c.softmax_scale, window
            )
        h = linear(out.view(-1, c.q_size), w.o)
        if w.post_attn_norm is not None:
            h = rms_norm(h, w.post_attn_norm, c.rms_eps)
        x = x + h
        h = rms_norm(x, w.ffn_norm, c.rms_eps)
        gate, up = linear(h, w.gate_up).chunk(2, dim=-1)
        h = linear(gated_activation(gate, up, c.activation), w.down)
        if w.post_ffn_norm is not None:
            h = rms_norm(h, w.post_ffn_norm, c.rms_eps)
        return x + h
