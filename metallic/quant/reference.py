"""Dequantize ggml blocks with plain torch ops: the CPU path and the oracle for GPU kernels.

Results are bit-exact against ``gguf.quants.dequantize``: every value is computed with the
same float32 operations in the same order, e.g. Q4_K is ``(d*sc)*q - (dmin*m)`` (the one
exception: an F16 signaling NaN comes out quiet, numpy keeps it signaling). Each
unpacking step works on one byte per element, and the float work runs over chunks of
blocks small enough to stay in cache, so the peak extra memory is a few MB.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from gguf import GGMLQuantizationType

from metallic.quant.formats import BlockFormat, block_format

T = GGMLQuantizationType

# Elements dequantized per step: small enough that the passes over a chunk mostly hit cache,
# large enough that torch's per-op overhead and thread start-up (each big op is one OpenMP
# region, slow whenever the cores are busy with other work) stay small.
_CHUNK_ELEMENTS = 1 << 20


def _view_as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Reinterpret uint8 bytes as ``dtype``, copying first where they are strided or unaligned."""
    if not x.is_contiguous() or x.storage_offset() % dtype.itemsize:
        x = x.clone(memory_format=torch.contiguous_format)
    return x.view(dtype)


def _f16(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The f16 field at byte ``offset`` of each block, as an (n, 1) float32 column."""
    return _view_as(b[:, offset : offset + 2], torch.float16).to(torch.float32)


def _fields(x: torch.Tensor, bits: int, count: int, at: int = 0, dim: int = -2) -> torch.Tensor:
    """Split each byte into ``count`` fields of ``bits`` bits, field i taken from bit i*bits.

    Field i lands at bit ``at`` (so a high part needs no extra shift before it is OR-ed in),
    stacked along a new dimension ``dim``. Shifts by a Python int stay on torch's fast path.
    """
    mask = ((1 << bits) - 1) << at
    parts = []
    for i in range(count):
        shift = i * bits - at
        part = x >> shift if shift > 0 else x << -shift if shift < 0 else x
        parts.append(part if shift == 8 - bits else part & mask)
    return torch.stack(parts, dim=dim)


def _k_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins packed into the 12 bytes of Q4_K/Q5_K, as float32."""
    s0, s1, s2 = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((s0 & 63, (s2 & 15) | ((s0 >> 6) << 4)), dim=1)
    m = torch.cat((s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)), dim=1)
    return sc.to(torch.float32), m.to(torch.float32)


def _affine(
    o: torch.Tensor,
    q: torch.Tensor,
    scale: torch.Tensor,
    sub: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
) -> None:
    """o = scale*q (- sub | + add), one float op at a time so no step is fused or reordered."""
    o.copy_(q)
    o.mul_(scale)
    if sub is not None:
        o.sub_(sub)
    if add is not None:
        o.add_(add)


def _q4_0(b: torch.Tensor, o: torch.Tensor) -> None:
    q = _fields(b[:, 2:18], 4, 2).view(torch.int8) - 8
    _affine(o.view(-1, 2, 16), q, _f16(b, 0).view(-1, 1, 1))


def _q4_1(b: torch.Tensor, o: torch.Tensor) -> None:
    q = _fields(b[:, 4:20], 4, 2)
    _affine(o.view(-1, 2, 16), q, _f16(b, 0).view(-1, 1, 1), add=_f16(b, 2).view(-1, 1, 1))


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """Bit 4 of each of the 32 values, from the little-endian 32-bit mask, shifted into place."""
    return _fields(qh, 1, 8, at=4, dim=-1).view(-1, 2, 16)


def _q5_0(b: torch.Tensor, o: torch.Tensor) -> None:
    q = (_fields(b[:, 6:22], 4, 2) | _q5_high(b[:, 2:6])).view(torch.int8) - 16
    _affine(o.view(-1, 2, 16), q, _f16(b, 0).view(-1, 1, 1))


def _q5_1(b: torch.Tensor, o: torch.Tensor) -> None:
    q = _fields(b[:, 8:24], 4, 2) | _q5_high(b[:, 4:8])
    _affine(o.view(-1, 2, 16), q, _f16(b, 0).view(-1, 1, 1), add=_f16(b, 2).view(-1, 1, 1))


def _q8_0(b: torch.Tensor, o: torch.Tensor) -> None:
    _affine(o.view(-1, 32), b[:, 2:34].view(torch.int8), _f16(b, 0))


def _q2_k(b: torch.Tensor, o: torch.Tensor) -> None:
    sc = b[:, 0:16]
    q = _fields(b[:, 16:80].view(-1, 2, 32), 2, 4)  # (n, 2, 4, 32)
    scale = _f16(b, 80) * (sc & 15).to(torch.float32)
    minv = _f16(b, 82) * (sc >> 4).to(torch.float32)
    _affine(o.view(-1, 16, 16), q.view(-1, 16, 16), scale.unsqueeze(-1), sub=minv.unsqueeze(-1))


def _q3_k(b: torch.Tensor, o: torch.Tensor) -> None:
    low = _fields(b[:, 32:96].view(-1, 2, 32), 2, 4).view(-1, 8, 32)
    high = _fields(b[:, 0:32], 1, 8, at=2)  # (n, 8, 32); a set bit means no -4 offset
    q = (low | high).view(torch.int8) - 4
    s = b[:, 96:108]
    sc_low = _fields(s[:, 0:8], 4, 2).view(-1, 16)
    sc_high = _fields(s[:, 8:12], 2, 4, at=4).view(-1, 16)
    sc = (sc_low | sc_high).to(torch.float32) - 32
    scale = _f16(b, 108) * sc
    _affine(o.view(-1, 16, 16), q.view(-1, 16, 16), scale.unsqueeze(-1))


def _q4_k(b: torch.Tensor, o: torch.Tensor) -> None:
    sc, m = _k_scales_mins(b[:, 4:16])
    q = _fields(b[:, 16:144].view(-1, 4, 32), 4, 2)  # (n, 4, 2, 32)
    scale, minv = _f16(b, 0) * sc, _f16(b, 2) * m
    _affine(o.view(-1, 8, 32), q.view(-1, 8, 32), scale.unsqueeze(-1), sub=minv.unsqueeze(-1))


def _q5_k(b: torch.Tensor, o: torch.Tensor) -> None:
    sc, m = _k_scales_mins(b[:, 4:16])
    low = _fields(b[:, 48:176].view(-1, 4, 32), 4, 2).view(-1, 8, 32)
    q = low | _fields(b[:, 16:48], 1, 8, at=4)
    scale, minv = _f16(b, 0) * sc, _f16(b, 2) * m
    _affine(o.view(-1, 8, 32), q, scale.unsqueeze(-1), sub=minv.unsqueeze(-1))


def _q6_k(b: torch.Tensor, o: torch.Tensor) -> None:
    # Each 128-value half takes 64 ql bytes (low nibbles: values 0..63, high: 64..127)
    # and 32 qh bytes (four 2-bit fields, one per 32-value quarter).
    low = _fields(b[:, 0:128].view(-1, 2, 64), 4, 2).view(-1, 2, 4, 32)
    high = _fields(b[:, 128:192].view(-1, 2, 32), 2, 4, at=4)  # (n, 2, 4, 32)
    q = (low | high).view(torch.int8) - 32
    scale = _f16(b, 208) * b[:, 192:208].view(torch.int8).to(torch.float32)
    _affine(o.view(-1, 16, 16), q.view(-1, 16, 16), scale.unsqueeze(-1))


_KERNELS: dict[GGMLQuantizationType, Callable[[torch.Tensor, torch.Tensor], None]] = {
    T.Q4_0: _q4_0,
    T.Q4_1: _q4_1,
    T.Q5_0: _q5_0,
    T.Q5_1: _q5_1,
    T.Q8_0: _q8_0,
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
}

_FLOAT_DTYPES = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}


def _blocks(raw: torch.Tensor, fmt: BlockFormat, n_elements: int | None) -> torch.Tensor:
    """The bytes of ``raw`` as an (n_blocks, type_size) view, checked against ``n_elements``."""
    if raw.dtype != torch.uint8:
        raise ValueError(f"raw {fmt.name} data must be uint8, got {raw.dtype}")
    raw = raw.reshape(-1)
    if n_elements is None:
        if raw.numel() % fmt.type_size:
            raise ValueError(
                f"{raw.numel()} bytes is not a whole number of {fmt.name} blocks "
                f"of {fmt.type_size} bytes"
            )
        n_blocks = raw.numel() // fmt.type_size
    else:
        if n_elements < 0 or n_elements % fmt.block_size:
            raise ValueError(
                f"{n_elements} elements is not a whole number of {fmt.name} blocks "
                f"of {fmt.block_size}"
            )
        n_blocks = n_elements // fmt.block_size
        if raw.numel() < n_blocks * fmt.type_size:
            raise ValueError(
                f"{n_elements} {fmt.name} elements need {n_blocks * fmt.type_size} bytes, "
                f"got {raw.numel()}"
            )
    return raw[: n_blocks * fmt.type_size].view(n_blocks, fmt.type_size)


def _dequantize_into(blocks: torch.Tensor, fmt: BlockFormat, out: torch.Tensor) -> None:
    """Fill the flat ``out`` (any float dtype) with the values of ``blocks``."""
    float_dtype = _FLOAT_DTYPES.get(fmt.ggml_type)
    if float_dtype is not None:
        values = _view_as(blocks, float_dtype).view(-1)
        # copy_ converts; for an F32 source that is already the target it still copies,
        # so the result never aliases the caller's (possibly read-only, memory-mapped) bytes.
        out.copy_(values)
        return
    kernel = _KERNELS[fmt.ggml_type]
    n_blocks = blocks.shape[0]
    step = max(1, _CHUNK_ELEMENTS // fmt.block_size)
    scratch = None if out.dtype == torch.float32 else torch.empty(0, dtype=torch.float32)
    for start in range(0, n_blocks, step):
        b = blocks[start : start + step]
        o = out[start * fmt.block_size : (start + b.shape[0]) * fmt.block_size]
        if scratch is None:
            kernel(b, o)
        else:
            scratch.resize_(o.numel())
            kernel(b, scratch)
            o.copy_(scratch)


def dequantize(
    raw: torch.Tensor,
    ggml_type: GGMLQuantizationType | int,
    n_elements: int | None = None,
    *,
    tensor_name: str = "?",
) -> torch.Tensor:
    """Decode whole ggml blocks from the uint8 tensor ``raw`` into a new flat float32 tensor.

    ``raw`` is only read, so it may view a read-only memory map. ``n_elements`` (default:
    all of ``raw``) must be a whole number of blocks; ``tensor_name`` names the tensor in
    errors.
    """
    fmt = block_format(ggml_type, tensor_name)
    blocks = _blocks(raw, fmt, n_elements)
    out = torch.empty(blocks.shape[0] * fmt.block_size, dtype=torch.float32)
    _dequantize_into(blocks, fmt, out)
    return out


def dequantize_rows(
    raw: torch.Tensor,
    ggml_type: GGMLQuantizationType | int,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    *,
    tensor_name: str = "?",
) -> torch.Tensor:
    """Decode a tensor of torch-order ``shape`` (GGUF dims reversed) straight into ``dtype``.

    Converting chunk by chunk means a bf16 result never needs a full float32 copy.
    """
    fmt = block_format(ggml_type, tensor_name)
    n_elements = math.prod(shape)
    if shape and shape[-1] % fmt.block_size:
        raise ValueError(
            f"tensor {tensor_name}: rows of {shape[-1]} are not whole {fmt.name} blocks "
            f"of {fmt.block_size}"
        )
    blocks = _blocks(raw, fmt, n_elements)
    out = torch.empty(n_elements, dtype=dtype)
    _dequantize_into(blocks, fmt, out)
    return out.view(tuple(shape))
