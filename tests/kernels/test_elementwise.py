"""RMSNorm, RoPE and gated-activation Triton kernels against the torch ops, in the interpreter."""

from __future__ import annotations

import pytest
import torch

from metallic.errors import MetallicError
from metallic.kernels.activation import gated_activation
from metallic.kernels.attention import store_kv
from metallic.kernels.norm import rms_norm
from metallic.kernels.quant_gemv import quantize_x
from metallic.kernels.rope import PagedWrite, apply_rope, norm_rope
from metallic.kernels.rounding import empty_quantized_x
from metallic.ops import activation as ref_activation
from metallic.ops import norm as ref_norm
from metallic.ops import rope as ref_rope

TOLERANCE = {torch.float16: 2e-3, torch.float32: 2e-6}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [64, 640])
def test_rms_norm_rows(dtype: torch.dtype, dim: int) -> None:
    x = torch.randn(37, dim).to(dtype)
    weight = torch.rand(dim) + 0.5
    out = rms_norm(x, weight, 1e-6)
    ref = ref_norm.rms_norm(x.double(), weight.double(), 1e-6)
    assert out.dtype == dtype
    assert relative_error(out, ref) < TOLERANCE[dtype]


def test_rms_norm_per_head_on_a_strided_view() -> None:
    """QK-norm: weight [head_dim] over each head of a [T, H, D] slice of a wider projection."""
    tokens, heads, head_dim = 9, 3, 64
    fused = torch.randn(tokens, heads * head_dim + 32).half()
    x = fused[:, : heads * head_dim].view(tokens, heads, head_dim)
    weight = torch.randn(head_dim)
    out = rms_norm(x, weight, 1e-5)
    ref = ref_norm.rms_norm(x.double(), weight.double(), 1e-5)
    assert out.shape == x.shape
    assert relative_error(out, ref) < TOLERANCE[torch.float16]


def test_rms_norm_fused_residual_add() -> None:
    x = torch.randn(11, 256).half()
    residual = torch.randn(11, 256)
    summed = residual + x.float()
    weight = torch.randn(256)
    out = rms_norm(x, weight, 1e-6, residual=residual)
    assert torch.equal(residual, summed)  # written back in place
    assert out.dtype == torch.float32
    ref = ref_norm.rms_norm(summed.double(), weight.double(), 1e-6)
    assert relative_error(out, ref) < TOLERANCE[torch.float32]


def test_rms_norm_post_norm_residual_and_pre_norm_in_one() -> None:
    """Gemma's sandwich: norm(residual + norm(x) * post) * weight, the sum left in residual."""
    x = torch.randn(6, 640).half() * 40
    residual = torch.randn(6, 640) * 3
    post, weight = torch.rand(640) + 0.5, torch.rand(640) + 0.5
    normed_x = ref_norm.rms_norm(x.double(), post.double(), 1e-6)
    summed = residual.double() + normed_x
    ref = ref_norm.rms_norm(summed, weight.double(), 1e-6)
    out = rms_norm(x, weight, 1e-6, residual=residual, out_dtype=torch.float16, pre_weight=post)
    assert out.dtype == torch.float16
    assert relative_error(residual, summed) < TOLERANCE[torch.float32]
    assert relative_error(out, ref) < TOLERANCE[torch.float16]


@pytest.mark.parametrize("dim", [96, 640])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize(("rows", "out_dtype"), [(1, torch.bfloat16), (3, torch.bfloat16),
                                                 (19, torch.float32)])  # fmt: skip
def test_rms_norm_rounds_decode_rows_as_quantize_x_does(
    dim: int, fused: bool, rows: int, out_dtype: torch.dtype
) -> None:
    """Rows normed and rounded to int8 blocks in the norm's launch: the same quants, scales
    and half sums as quantize_x of the stored norm, rows stacked (96: blocks past D in the
    padded tile; 19 f32 rows: the final norm before a dp4a output head)."""
    x = torch.randn(rows, dim).half() * 30
    residual = torch.randn(rows, dim) * 3
    weight, post = torch.rand(dim) + 0.5, torch.rand(dim) + 0.5
    extra = {"residual": residual.clone(), "pre_weight": post} if fused else {}
    plain = rms_norm(x, weight, 1e-6, out_dtype=out_dtype, **extra)
    rounded = empty_quantized_x(dim, x.device, rows)
    extra = {"residual": residual.clone(), "pre_weight": post} if fused else {}
    out = rms_norm(x, weight, 1e-6, out_dtype=out_dtype, rounded=rounded, **extra)
    assert torch.equal(out, plain)
    for got, want in zip(rounded, quantize_x(plain), strict=True):
        assert torch.equal(got, want.reshape(-1))
    assert rounded[0].abs().max() == 127


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows", [1, 2])
def test_gated_activation_rounds_decode_rows_as_quantize_x_does(kind: str, rows: int) -> None:
    """Over more than one program's columns (1024), so blocks are placed by program and row."""
    gate_up = torch.randn(rows, 2 * 1120).half() * 4
    plain = gated_activation(gate_up, None, kind)
    rounded = empty_quantized_x(1120, gate_up.device, rows)
    assert torch.equal(gated_activation(gate_up, None, kind, rounded), plain)
    for got, want in zip(rounded, quantize_x(plain), strict=True):
        assert torch.equal(got, want.reshape(-1))
    with pytest.raises(MetallicError, match="buffers of as many"):
        gated_activation(torch.cat([gate_up, gate_up]), None, kind, rounded)


def test_rms_norm_rounds_into_buffers_of_its_rows_only() -> None:
    with pytest.raises(MetallicError, match="buffers of as many"):
        rms_norm(torch.randn(2, 64), torch.ones(64), 1e-6, rounded=empty_quantized_x(64, "cpu"))


def test_rms_norm_rejects_a_wrong_weight() -> None:
    with pytest.raises(MetallicError, match="weight"):
        rms_norm(torch.randn(4, 64), torch.ones(32), 1e-6)


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize(("head_dim", "rope_dim"), [(64, 64), (80, 32)])
def test_rope_in_place_on_q_and_k(neox: bool, head_dim: int, rope_dim: int) -> None:
    tokens, q_heads, k_heads = 7, 4, 2
    table = ref_rope.RopeTable(rope_dim, 10000.0)
    table.ensure(200)
    positions = torch.randint(0, 200, (tokens,))
    qkv = torch.randn(tokens, (q_heads + 2 * k_heads) * head_dim)
    q = qkv[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + k_heads) * head_dim].view(tokens, k_heads, head_dim)
    untouched_v = qkv[:, (q_heads + k_heads) * head_dim :].clone()
    ref_q = ref_rope.rotate(q.double(), *table.angles(positions), table.rope_dim, neox)
    ref_k = ref_rope.rotate(k.double(), *table.angles(positions), table.rope_dim, neox)
    apply_rope(q, k, positions, table.cos, table.sin, neox)
    assert relative_error(q, ref_q) < TOLERANCE[torch.float32]
    assert relative_error(k, ref_k) < TOLERANCE[torch.float32]
    assert torch.equal(qkv[:, (q_heads + k_heads) * head_dim :], untouched_v)


@pytest.mark.parametrize(("head_dim", "rope_dim"), [(64, 64), (80, 32)])
def test_qk_norm_then_rope_in_one_kernel(head_dim: int, rope_dim: int) -> None:
    """QK-norm (weights per head dim) then NeoX RoPE, in place on views of one projection."""
    tokens, q_heads, k_heads = 5, 4, 2
    table = ref_rope.RopeTable(rope_dim, 1e6)
    table.ensure(300)
    positions = torch.tensor([0, 1, 17, 150, 299])
    qkv = torch.randn(tokens, (q_heads + 2 * k_heads) * head_dim) * 5
    q = qkv[:, : q_heads * head_dim].view(tokens, q_heads, head_dim)
    k = qkv[:, q_heads * head_dim : (q_heads + k_heads) * head_dim].view(tokens, k_heads, head_dim)
    q_w, k_w = torch.rand(head_dim) + 0.5, torch.rand(head_dim) + 0.5
    angles = table.angles(positions)
    ref_q = ref_rope.rotate(
        ref_norm.rms_norm(q.double(), q_w.double(), 1e-6), *angles, rope_dim, True
    )
    ref_k = ref_rope.rotate(
        ref_norm.rms_norm(k.double(), k_w.double(), 1e-6), *angles, rope_dim, True
    )
    norm_rope(q, k, q_w, k_w, 1e-6, positions, table.cos, table.sin)
    assert relative_error(q, ref_q) < TOLERANCE[torch.float32]
    assert relative_error(k, ref_k) < TOLERANCE[torch.float32]


# What the pools hold before the write: no value of x ~ 3 N(0, 1) rotated or normed can take it
# (-7.0 could, once in about 15 runs, and a written row then counted as unwritten).
UNWRITTEN = 4096.0


@pytest.mark.parametrize(
    ("qk_norm", "neox", "head_dim", "rope_dim"),
    [(False, False, 80, 32), (False, True, 64, 64), (True, True, 80, 32), (True, True, 64, 64)],
)
def test_rope_stores_the_keys_and_values_as_store_kv_does(
    qk_norm: bool, neox: bool, head_dim: int, rope_dim: int
) -> None:
    """The fused KV write of a ragged step (three sequences, chunks in mid-sequence, f32 into
    f16 pools) against rotating first and `store_kv` after:
    the same q, k and every pool element bit for bit."""
    lengths, starts, q_heads, k_heads, block_size = [3, 1, 4], [5, 0, 10], 4, 3, 4
    n_tokens = sum(lengths)
    table = ref_rope.RopeTable(rope_dim, 1e4)
    table.ensure(64)
    positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    block_table = torch.tensor([[7, 2, 0, 9], [4, 8, 1, 3], [6, 10, 11, 5]], dtype=torch.int32)
    qkv = torch.randn(n_tokens, (q_heads + 2 * k_heads) * head_dim) * 3
    weights = (torch.rand(head_dim) + 0.5, torch.rand(head_dim) + 0.5)

    def run(fused: bool) -> tuple[torch.Tensor, ...]:
        q, k, v = (t.view(n_tokens, -1, head_dim) for t in qkv.clone().split(
            [q_heads * head_dim, k_heads * head_dim, k_heads * head_dim], dim=1))  # fmt: skip
        pools = [torch.full((12, block_size, k_heads, head_dim), UNWRITTEN).half() for _ in "kv"]
        write = PagedWrite(v, *pools, block_table, cu_seqlens) if fused else None
        if qk_norm:
            norm_rope(q, k, *weights, 1e-6, positions, table.cos, table.sin, write)
        else:
            apply_rope(q, k, positions, table.cos, table.sin, neox, write)
        if not fused:
            store_kv(k, v, *pools, block_table, cu_seqlens, positions)
        return q, k, *pools

    fused, separate = run(True), run(False)
    for got, want in zip(fused, separate, strict=True):
        assert torch.equal(got, want)
    assert int((separate[2] != UNWRITTEN).all(dim=-1).sum()) == n_tokens * k_heads  # rows written


def test_rope_half_precision_queries_only() -> None:
    table = ref_rope.RopeTable(128, 1e6)
    table.ensure(64)
    positions = torch.arange(30, 35, dtype=torch.int32)
    q = torch.randn(5, 3, 128).half()
    ref = ref_rope.rotate(q.double(), *table.angles(positions), table.rope_dim, True)
    apply_rope(q, None, positions, table.cos, table.sin, True)
    assert relative_error(q, ref) < TOLERANCE[torch.float16]


def test_rope_rejects_a_table_wider_than_the_head() -> None:
    table = ref_rope.RopeTable(128, 1e4)
    table.ensure(8)
    q = torch.randn(2, 1, 64)
    with pytest.raises(MetallicError, match="rope_dim"):
        apply_rope(q, None, torch.zeros(2, dtype=torch.long), table.cos, table.sin, True)


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gated_activation_separate_and_fused(kind: str, dtype: torch.dtype) -> None:
    width = 1100  # spans two column blocks, the second partial
    gate_up = (3 * torch.randn(6, 2 * width)).to(dtype)
    gate, up = gate_up[:, :width], gate_up[:, width:]
    ref = ref_activation.gated_activation(gate.double(), up.double(), kind)
    separate = gated_activation(gate.contiguous(), up.contiguous(), kind)
    fused = gated_activation(gate_up, None, kind)
    assert separate.dtype == fused.dtype == dtype
    assert relative_error(separate, ref) < TOLERANCE[dtype]
    assert torch.equal(separate, fused)


def test_gated_activation_saturates_without_nan() -> None:
    gate = torch.tensor([[-1e4, -100.0, 0.0, 100.0, 1e4]])
    up = torch.ones_like(gate)
    for kind in ("silu", "gelu_tanh"):
        out = gated_activation(gate, up, kind)
        ref = ref_activation.gated_activation(gate.double(), up.double(), kind)
        assert torch.allclose(out.double(), ref, atol=1e-6), kind


def test_gated_activation_rejects_an_unknown_kind() -> None:
    with pytest.raises(MetallicError, match="relu"):
        gated_activation(torch.randn(2, 8), None, "relu")
