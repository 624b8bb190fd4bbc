"""Quantize float arrays into ggml blocks, for writing synthetic GGUF files.

The plain and legacy block types go through ``gguf.quants.quantize``. gguf has no K-quant
encoders, so those are here: each sub-block's scale (and min) starts from its range and gets
two least-squares refinements, much simpler than llama.cpp's search. The blocks are valid,
decode close to the input, and encoding stays fast enough for multi-GB files.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from metallic.quant.formats import block_format

T = GGMLQuantizationType

# Super-blocks encoded per step: bounds the temporaries (a few MB each) and keeps them in cache.
_CHUNK_BLOCKS = 2048
# Least-squares refinements of each sub-block's scale (and min) after the range-based guess.
_REFINE_STEPS = 2


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """(n,) float32 -> (n, 2) little-endian f16 bytes."""
    return v.astype("<f2").view(np.uint8).reshape(-1, 2)


def _stored_f16(v: np.ndarray) -> np.ndarray:
    """The value a float32 takes once written as f16 and read back."""
    return v.astype(np.float16).astype(np.float32)


def _safe_inverse(v: np.ndarray) -> np.ndarray:
    """1/v, with 0 where v is 0 (an all-zero sub-block encodes as zeros)."""
    out = np.zeros_like(v)
    np.divide(1.0, v, out=out, where=v != 0)
    return out


def _pack_bits(u: np.ndarray, bits: int) -> np.ndarray:
    """OR together fields u[..., i, :] << (i*bits): the inverse of splitting a byte into fields."""
    out = np.zeros(u.shape[:-2] + u.shape[-1:], dtype=np.uint8)
    for i in range(u.shape[-2]):
        out |= u[..., i, :] << np.uint8(i * bits)
    return out


def _affine_fit(x: np.ndarray, nmax: int, scale_bits: int) -> tuple[np.ndarray, ...]:
    """Pick per-sub-block (scale, min) for x ≈ d*sc*q - dmin*m with q in [0, nmax].

    x is (n, n_sub, sub_len). Starts from the sub-block range and refines it by least squares.
    Returns the f16 super-block d and dmin, the integer sub-block sc and m (each below
    2**scale_bits) and q. The offset stays <= 0 because ggml stores it as a non-negative
    subtrahend.
    """
    smax = (1 << scale_bits) - 1
    lo = np.minimum(x.min(axis=-1), 0)
    step = (x.max(axis=-1) - lo) / nmax
    offset = lo
    for _ in range(_REFINE_STEPS):
        q = np.clip(np.rint((x - offset[..., None]) * _safe_inverse(step)[..., None]), 0, nmax)
        step, offset = _refit_affine(x, q, step, offset)
    d = _stored_f16(step.max(axis=-1) / smax)
    dmin = _stored_f16(-offset.min(axis=-1) / smax)
    sc = np.clip(np.rint(step * _safe_inverse(d)[:, None]), 0, smax)
    m = np.clip(np.rint(-offset * _safe_inverse(dmin)[:, None]), 0, smax)
    step = (d[:, None] * sc)[..., None]
    offset = (dmin[:, None] * m)[..., None]
    q = np.clip(np.rint((x + offset) * _safe_inverse(step)), 0, nmax).astype(np.uint8)
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8), q


def _refit_affine(
    x: np.ndarray, q: np.ndarray, step: np.ndarray, offset: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (step, offset <= 0) for x ≈ step*q + offset; the old fit where degenerate."""
    n = x.shape[-1]
    sq, sqq = q.sum(axis=-1), (q * q).sum(axis=-1)
    sx, sxq = x.sum(axis=-1), (x * q).sum(axis=-1)
    det = n * sqq - sq * sq
    inv_det = _safe_inverse(det)
    new_step = (n * sxq - sq * sx) * inv_det
    new_offset = (sqq * sx - sq * sxq) * inv_det
    positive = new_offset > 0
    new_offset[positive] = 0
    new_step[positive] = (sxq * _safe_inverse(sqq))[positive]
    keep = (det == 0) | (new_step <= 0)
    return np.where(keep, step, new_step), np.where(keep, offset, new_offset)


def _symmetric_fit(x: np.ndarray, qmin: int, scale_max: int) -> tuple[np.ndarray, ...]:
    """Pick per-sub-block signed scales for x ≈ d*sc*q with q in [qmin, -qmin - 1].

    Starts with the largest-magnitude value of each sub-block at qmin (its sign goes into
    sc, using the one extra negative level) and refines by least squares. Returns the f16 d,
    integer sc in [-scale_max, scale_max] and q.
    """
    amax_at = np.abs(x).argmax(axis=-1)[..., None]
    step = np.take_along_axis(x, amax_at, axis=-1)[..., 0] / qmin
    for _ in range(_REFINE_STEPS):
        q = np.clip(np.rint(x * _safe_inverse(step)[..., None]), qmin, -qmin - 1)
        sqq = (q * q).sum(axis=-1)
        step = np.where(sqq > 0, (x * q).sum(axis=-1) * _safe_inverse(sqq), step)
    d = _stored_f16(np.abs(step).max(axis=-1) / scale_max)
    sc = np.clip(np.rint(step * _safe_inverse(d)[:, None]), -scale_max, scale_max)
    step = (d[:, None] * sc)[..., None]
    q = np.clip(np.rint(x * _safe_inverse(step)), qmin, -qmin - 1).astype(np.int8)
    return d, sc.astype(np.int8), q


def _q2_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, dmin, sc, m, q = _affine_fit(x.reshape(n, 16, 16), nmax=3, scale_bits=4)
    scales = sc | (m << np.uint8(4))
    qs = _pack_bits(q.reshape(n, 2, 4, 32), 2).reshape(n, 64)
    return np.concatenate([scales, qs, _f16_bytes(d), _f16_bytes(dmin)], axis=1)


def _q3_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, sc, q = _symmetric_fit(x.reshape(n, 16, 16), qmin=-4, scale_max=31)
    u = (q + 4).view(np.uint8).reshape(n, 8, 32)  # bit 2 set means "no -4 offset"
    hmask = _pack_bits(u >> np.uint8(2), 1)
    qs = _pack_bits((u & np.uint8(3)).reshape(n, 2, 4, 32), 2).reshape(n, 64)
    s6 = (sc + 32).view(np.uint8)
    low = (s6[:, 0:8] & np.uint8(15)) | ((s6[:, 8:16] & np.uint8(15)) << np.uint8(4))
    high = _pack_bits((s6 >> np.uint8(4)).reshape(n, 4, 4), 2)
    return np.concatenate([hmask, qs, low, high, _f16_bytes(d)], axis=1)


def _k_scales_bytes(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pack the eight 6-bit scales and mins of Q4_K/Q5_K into their 12 bytes."""
    top = np.uint8(6)
    return np.concatenate(
        [
            sc[:, 0:4] | ((sc[:, 4:8] >> np.uint8(4)) << top),
            m[:, 0:4] | ((m[:, 4:8] >> np.uint8(4)) << top),
            (sc[:, 4:8] & np.uint8(15)) | ((m[:, 4:8] & np.uint8(15)) << np.uint8(4)),
        ],
        axis=1,
    )


def _nibbles(u: np.ndarray) -> np.ndarray:
    """(n, k, 2, 32) values below 16 -> (n, k*32) bytes, the second row in the high nibbles."""
    return (u[:, :, 0, :] | (u[:, :, 1, :] << np.uint8(4))).reshape(u.shape[0], -1)


def _q4_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, dmin, sc, m, q = _affine_fit(x.reshape(n, 8, 32), nmax=15, scale_bits=6)
    qs = _nibbles(q.reshape(n, 4, 2, 32))
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k_scales_bytes(sc, m), qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, dmin, sc, m, q = _affine_fit(x.reshape(n, 8, 32), nmax=31, scale_bits=6)
    qh = _pack_bits(q >> np.uint8(4), 1)
    qs = _nibbles((q & np.uint8(15)).reshape(n, 4, 2, 32))
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _k_scales_bytes(sc, m), qh, qs], axis=1)


def _q6_k(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    d, sc, q = _symmetric_fit(x.reshape(n, 16, 16), qmin=-32, scale_max=127)
    u = (q + 32).view(np.uint8).reshape(n, 2, 4, 32)  # (half, quarter, 32)
    ql = (u[:, :, 0:2, :] & np.uint8(15)) | ((u[:, :, 2:4, :] & np.uint8(15)) << np.uint8(4))
    qh = _pack_bits(u >> np.uint8(4), 2)
    return np.concatenate(
        [ql.reshape(n, 128), qh.reshape(n, 64), sc.view(np.uint8), _f16_bytes(d)], axis=1
    )


_K_QUANTIZERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    T.Q2_K: _q2_k,
    T.Q3_K: _q3_k,
    T.Q4_K: _q4_k,
    T.Q5_K: _q5_k,
    T.Q6_K: _q6_k,
}

_PLAIN_DTYPES = {T.F32: np.dtype("<f4"), T.F16: np.dtype("<f2")}


def quantize(values: np.ndarray, ggml_type: GGMLQuantizationType | int) -> np.ndarray:
    """Encode ``values`` (last dim a multiple of the block size) as ggml blocks.

    Returns a new uint8 array shaped like ``values`` except that the last dim counts bytes,
    as ``gguf.quants.quantize`` does.
    """
    fmt = block_format(ggml_type)
    values = np.asarray(values, dtype=np.float32)
    if values.ndim == 0 or values.shape[-1] % fmt.block_size:
        raise ValueError(
            f"{fmt.name} needs a last dimension that is a multiple of {fmt.block_size}, "
            f"got shape {values.shape}"
        )
    out_shape = (*values.shape[:-1], values.shape[-1] // fmt.block_size * fmt.type_size)
    plain = _PLAIN_DTYPES.get(fmt.ggml_type)
    if plain is not None:
        return values.astype(plain).view(np.uint8).reshape(out_shape)
    encode = _K_QUANTIZERS.get(fmt.ggml_type)
    if encode is None:
        return gguf.quants.quantize(values, fmt.ggml_type)
    blocks = values.reshape(-1, fmt.block_size)
    out = np.empty((blocks.shape[0], fmt.type_size), dtype=np.uint8)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[start : start + _CHUNK_BLOCKS] = encode(blocks[start : start + _CHUNK_BLOCKS])
    return out.reshape(out_shape)
