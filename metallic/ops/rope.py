"""Rotary position embeddings: a cos/sin table per (base, scaling) and its application.

`neox=True` rotates the two halves of each head (GPT-NeoX, used by qwen and gemma); `False` rotates
adjacent pairs (GPT-J style, what llama.cpp's converter leaves llama models in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metallic.ops.attention import KVWrite, store_kv
from metallic.ops.dispatch import use_kernels
from metallic.ops.norm import rms_norm


@dataclass(frozen=True)
class RopeStep:
    """One step's rotation, prepared once and shared by every layer using the table: the
    kernel reads the whole table by position, the torch path the angles gathered per token."""

    positions: torch.Tensor  # [T]
    cos: torch.Tensor  # [P, rope_dim/2] table, or [T, 1, rope_dim/2] gathered
    sin: torch.Tensor
    gathered: bool


class RopeTable:
    """Precomputed cos/sin for positions [0, max_positions), grown on demand."""

    def __init__(
        self,
        rope_dim: int,
        base: float,
        *,
        linear_scale: float = 1.0,
        freq_factors: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        exponents = torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim
        inv_freq = 1.0 / (base**exponents)
        if freq_factors is not None:  # Llama-3 frequency scaling, stored as rope_freqs.weight
            inv_freq = inv_freq / freq_factors.to(torch.float64).cpu()
        self.inv_freq = inv_freq / linear_scale
        self.rope_dim = rope_dim
        self.device = torch.device(device)
        self.cos = torch.empty(0, rope_dim // 2, device=self.device)
        self.sin = torch.empty(0, rope_dim // 2, device=self.device)

    def ensure(self, n_positions: int) -> None:
        """Grow the table to cover n_positions. Growing reallocates it: captured CUDA graphs
        hold its address, so engines size it for the whole context before capturing."""
        if n_positions <= self.cos.shape[0]:
            return
        size = max(n_positions, 2 * self.cos.shape[0], 256)
        angles = torch.outer(torch.arange(size, dtype=torch.float64), self.inv_freq)
        self.cos = angles.cos().float().to(self.device)
        self.sin = angles.sin().float().to(self.device)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [tokens, 1, rope_dim/2] at `positions`."""
        self.ensure(int(positions.max()) + 1 if positions.numel() else 0)
        return self._gather(positions)

    def _gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)

    def for_step(self, positions: torch.Tensor, max_position: int) -> RopeStep:
        """The rotation of a step whose largest position (known on the host, so no device sync)
        is `max_position`."""
        self.ensure(max_position + 1)
        if use_kernels(positions):
            return RopeStep(positions, self.cos, self.sin, gathered=False)
        return RopeStep(positions, *self._gather(positions), gathered=True)


def apply_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    step: RopeStep,
    rope_dim: int,
    neox: bool,
    qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    store: KVWrite | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] by their tokens' positions; dims past rope_dim
    pass unchanged. `qk_norm` = (q weight, k weight, eps) first RMS-normalizes every head (the
    QK-norm of qwen3 and gemma3; one fused kernel with the rotation on the GPU). `store` then
    writes the rotated keys and the step's values into the KV cache (on the GPU in the same
    launch: a decode step is launch-bound). The kernels work in place on q and k; the torch
    path returns new tensors."""
    if not step.gathered:
        from metallic.kernels.rope import PagedWrite, norm_rope
        from metallic.kernels.rope import apply_rope as rope_kernel

        write = None
        if store is not None:
            write = PagedWrite(
                store.v, store.k_pool, store.v_pool, store.table, store.batch.cu_seqlens_q
            )
        if qk_norm is not None and neox:
            norm_rope(q, k, *qk_norm, step.positions, step.cos, step.sin, write)
            return q, k
        if qk_norm is not None:
            q, k = _qk_norm(q, k, qk_norm)
        # the table spans rope_dim
        rope_kernel(q, k, step.positions, step.cos, step.sin, neox, write)
        return q, k
    if qk_norm is not None:
        q, k = _qk_norm(q, k, qk_norm)
    cos, sin = step.cos, step.sin
    q, k = rotate(q, cos, sin, rope_dim, neox), rotate(k, cos, sin, rope_dim, neox)
    if store is not None:
        store_kv(k, store.v, store.k_pool, store.v_pool, store.batch, store.table)
    return q, k


def _qk_norm(
    q: torch.Tensor, k: torch.Tensor, qk_norm: tuple[torch.Tensor, torch.Tensor, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    q_weight, k_weight, eps = qk_norm
    return rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps)


def rotate(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_dim: int, neox: bool
) -> torch.Tensor:
    """x [tokens, heads, head_dim] rotated by per-token angles (`RopeTable.angles`), in f32."""
    half = rope_dim // 2
    xf = x.float()
    rot, rest = xf[..., :rope_dim], xf[..., rope_dim:]
    if neox:
        a, b = rot[..., :half], rot[..., half:]
        out = torch.cat((a * cos - b * sin, a * sin + b * cos), dim=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1).to(x.dtype) if rest.numel() else out.to(x.dtype)
