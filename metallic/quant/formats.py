"""The ggml block layouts metallic can read: one table, so every path agrees on sizes."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType

from metallic.errors import UnsupportedTensorType

T = GGMLQuantizationType


@dataclass(frozen=True)
class BlockFormat:
    """How one ggml type packs ``block_size`` elements into ``type_size`` bytes."""

    ggml_type: GGMLQuantizationType
    name: str
    block_size: int
    type_size: int
    layout: str


def _fmt(
    ggml_type: GGMLQuantizationType, block_size: int, type_size: int, layout: str
) -> BlockFormat:
    return BlockFormat(ggml_type, ggml_type.name, block_size, type_size, layout)


FORMATS: dict[GGMLQuantizationType, BlockFormat] = {
    f.ggml_type: f
    for f in (
        _fmt(T.F32, 1, 4, "f32"),
        _fmt(T.F16, 1, 2, "f16"),
        _fmt(T.BF16, 1, 2, "bf16 (upper half of an f32)"),
        _fmt(T.Q4_0, 32, 18, "d:f16, qs:16B nibbles (lo: x0..15, hi: x16..31); x = d*(q-8)"),
        _fmt(T.Q4_1, 32, 20, "d:f16, m:f16, qs:16B nibbles (lo: x0..15, hi: x16..31); x = d*q + m"),
        _fmt(
            T.Q5_0, 32, 22, "d:f16, qh:4B bit 4 of x_j at bit j, qs:16B low nibbles; x = d*(q-16)"
        ),
        _fmt(
            T.Q5_1,
            32,
            24,
            "d:f16, m:f16, qh:4B bit 4 of x_j at bit j, qs:16B low nibbles; x = d*q + m",
        ),
        _fmt(T.Q8_0, 32, 34, "d:f16, qs:32B int8; x = d*q"),
        _fmt(
            T.Q2_K,
            256,
            84,
            "scales:16B (lo nibble scale, hi nibble min per 16), qs:64B 2-bit, d:f16, dmin:f16; "
            "x = d*sc*q - dmin*m",
        ),
        _fmt(
            T.Q3_K,
            256,
            110,
            "hmask:32B bit 2 of q, qs:64B 2-bit, scales:12B 6-bit signed per 16, d:f16; "
            "x = d*(sc-32)*(q-4)",
        ),
        _fmt(
            T.Q4_K,
            256,
            144,
            "d:f16, dmin:f16, scales:12B 6-bit scale+min per 32, qs:128B nibbles; "
            "x = d*sc*q - dmin*m",
        ),
        _fmt(
            T.Q5_K,
            256,
            176,
            "d:f16, dmin:f16, scales:12B 6-bit scale+min per 32, qh:32B bit 4 of q, "
            "qs:128B low nibbles; x = d*sc*q - dmin*m",
        ),
        _fmt(
            T.Q6_K,
            256,
            210,
            "ql:128B low nibbles, qh:64B 2-bit high, scales:16B int8 per 16, d:f16; "
            "x = d*sc*(q-32)",
        ),
    )
}


def block_format(ggml_type: GGMLQuantizationType | int, tensor_name: str = "?") -> BlockFormat:
    """The layout of ``ggml_type``; any type without a dequantizer is a user-facing error."""
    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError:
        raise UnsupportedTensorType(f"ggml type {int(ggml_type)}", tensor_name) from None
    fmt = FORMATS.get(qtype)
    if fmt is None:
        raise UnsupportedTensorType(qtype.name, tensor_name)
    return fmt


def tensor_nbytes(ggml_type: GGMLQuantizationType | int, n_elements: int) -> int:
    """Bytes a tensor of ``n_elements`` occupies; it must be made of whole blocks."""
    fmt = block_format(ggml_type)
    if n_elements < 0 or n_elements % fmt.block_size:
        raise ValueError(
            f"{n_elements} elements is not a whole number of {fmt.name} blocks of {fmt.block_size}"
        )
    return n_elements // fmt.block_size * fmt.type_size
