"""Every class of damaged or hostile GGUF file must give a one-line GGUFError naming the problem.

The classes follow what llama.cpp's own GGUF loader rejects (bad magic and versions, absurd counts
and lengths, invalid value and tensor types, duplicate keys and names, impossible shapes, misaligned
or out-of-file offsets, bad `general.alignment`, data one byte short) plus file-system cases. Each
bad file is a small valid file written by `gguf.GGUFWriter` with bytes patched at offsets located
by the upstream reader, or a writer-made file that breaks a rule the writer does not enforce.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from metallic.errors import GGUFError
from metallic.gguf.reader import open_gguf

# Keys and tensor names come in equal-length pairs so one can be renamed into the other in place.
TENSOR_SPECS: list[tuple[str, GGMLQuantizationType, tuple[int, ...]]] = [
    ("blk.0.norm", GGMLQuantizationType.F32, (64,)),
    ("blk.0.proj", GGMLQuantizationType.F16, (8, 64)),
    ("blk.0.attn", GGMLQuantizationType.Q8_0, (4, 64)),
    ("blk.0.ffnq", GGMLQuantizationType.Q4_K, (2, 256)),
    ("blk.1.norm", GGMLQuantizationType.F32, (3, 5)),
    ("blk.1.cube", GGMLQuantizationType.F16, (2, 3, 32)),
    ("blk.1.quad", GGMLQuantizationType.F32, (2, 1, 2, 8)),
    ("blk.1.ffnq", GGMLQuantizationType.Q6_K, (1, 256)),
    ("blk.1.bf16", GGMLQuantizationType.BF16, (4, 16)),
    ("blk.1.ints", GGMLQuantizationType.I32, (7,)),
]


def write_small_gguf(
    path: Path,
    *,
    extra: Callable[[GGUFWriter], None] | None = None,
    tensor_specs: list[tuple[str, GGMLQuantizationType, tuple[int, ...]]] = TENSOR_SPECS,
) -> Path:
    """A valid GGUF with metadata of every value type and a handful of tensors in several formats.

    `extra` may add metadata before writing; `tensor_specs` lists (name, type, torch-order shape).
    """
    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, arch="llama")
    writer.add_key_value("test.count_a", 7, GGUFValueType.UINT32)
    writer.add_key_value("test.count_b", 9, GGUFValueType.UINT32)
    writer.add_key_value("test.u8", 200, GGUFValueType.UINT8)
    writer.add_key_value("test.i8", -5, GGUFValueType.INT8)
    writer.add_key_value("test.u16", 60000, GGUFValueType.UINT16)
    writer.add_key_value("test.i16", -3000, GGUFValueType.INT16)
    writer.add_key_value("test.i32", -70000, GGUFValueType.INT32)
    writer.add_key_value("test.u64", 2**40 + 3, GGUFValueType.UINT64)
    writer.add_key_value("test.i64", -(2**40), GGUFValueType.INT64)
    writer.add_key_value("test.f64", 0.125, GGUFValueType.FLOAT64)
    writer.add_float32("test.scale", 0.5)
    writer.add_bool("test.flag", True)
    writer.add_string("test.title", "a small model")
    writer.add_array("test.scores", [0.0, -1.5, 2.25])
    writer.add_key_value("test.ids", [1, 2, 3, 2**33], GGUFValueType.ARRAY, GGUFValueType.UINT64)
    writer.add_array("test.flags", [True, False, True])
    writer.add_uint32("general.alignment", 32)
    if extra is not None:
        extra(writer)
    writer.add_array("test.tokens", ["<pad>", "hello", "wörld", ""])  # last: see string_array_count
    for name, ggml_type, shape in tensor_specs:
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        if ggml_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            dtype = np.float32 if ggml_type == GGMLQuantizationType.F32 else np.float16
            writer.add_tensor(name, rng.standard_normal(shape).astype(dtype))
        elif ggml_type == GGMLQuantizationType.I32:
            writer.add_tensor(name, rng.integers(-9, 9, shape, dtype=np.int32))
        else:
            byte_shape = (*shape[:-1], shape[-1] // block_size * type_size)
            raw = rng.integers(0, 256, byte_shape, dtype=np.uint8)
            writer.add_tensor(name, raw, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass(frozen=True)
class Field:
    """Where one key/value pair or tensor info lies, part by part, as absolute file offsets."""

    offset: int
    part_offsets: list[int]


@dataclass(frozen=True)
class Layout:
    """Byte positions of the fields of a valid file, found with the upstream reader."""

    kv: dict[str, Field]
    tensors: dict[str, Field]
    data_offset: int
    data_end: int  # end of the last tensor's bytes, before the final alignment padding


def _field(offset: int, parts: list[np.ndarray]) -> Field:
    starts = [offset]
    for part in parts[:-1]:
        starts.append(starts[-1] + int(part.nbytes))
    return Field(offset, starts)


def locate_fields(path: Path) -> Layout:
    reader = GGUFReader(path)
    kv = {
        name: _field(field.offset, field.parts)
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.")
    }
    tensors = {t.name: _field(t.field.offset, t.field.parts) for t in reader.tensors}
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    return Layout(kv, tensors, int(reader.data_offset), data_end)


# Parts of a key/value field: 0 key length, 1 key, 2 value type, 3... value.
KEY_LEN, KEY, VALUE_TYPE, VALUE = 0, 1, 2, 3
ARRAY_ITEM_TYPE, ARRAY_COUNT, ARRAY_FIRST_STRING_LEN, ARRAY_FIRST_STRING = 3, 4, 5, 6
# Parts of a tensor info: 0 name length, 1 name, 2 dimension count, 3 dims, 4 ggml type, 5 offset.
NAME_LEN, NAME, N_DIMS, DIMS, GGML_TYPE, DATA_OFFSET = range(6)


@dataclass(frozen=True)
class Base:
    """The valid file's bytes and layout, plus a way to write a writer-made variant."""

    data: bytes
    layout: Layout
    workdir: Path

    def patch(self, offset: int, fmt: str, *values: object) -> bytes:
        out = bytearray(self.data)
        struct.pack_into("<" + fmt, out, offset, *values)
        return bytes(out)

    def kv(self, key: str, part: int) -> int:
        return self.layout.kv[key].part_offsets[part]

    def tensor(self, name: str, part: int) -> int:
        return self.layout.tensors[name].part_offsets[part]

    def variant(self, **kwargs: object) -> bytes:
        return write_small_gguf(self.workdir / "variant.gguf", **kwargs).read_bytes()  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    workdir = tmp_path_factory.mktemp("gguf_bad_input")
    path = write_small_gguf(workdir / "valid.gguf")
    return Base(path.read_bytes(), locate_fields(path), workdir)


def _rename_key(base: Base, key: str, new_key: str) -> bytes:
    assert len(new_key) == len(key)
    out = bytearray(base.data)
    start = base.kv(key, KEY)
    out[start : start + len(key)] = new_key.encode()
    return bytes(out)


def _rename_tensor(base: Base, name: str, new_name: bytes) -> bytes:
    assert len(new_name) == len(name)
    out = bytearray(base.data)
    start = base.tensor(name, NAME)
    out[start : start + len(name)] = new_name
    return bytes(out)


def _dims(base: Base, name: str, *dims: int) -> bytes:
    return base.patch(base.tensor(name, DIMS), f"{len(dims)}Q", *dims)


def _tensor_offset(base: Base, name: str, value: int) -> bytes:
    return base.patch(base.tensor(name, DATA_OFFSET), "Q", value)


def _one_tensor_file(ggml_type: GGMLQuantizationType, dims: tuple[int, ...]) -> bytes:
    """A hand-packed file with no metadata and one tensor: for layouts GGUFWriter cannot make."""
    info = struct.pack(f"<Q1sI{len(dims)}QIQ", 1, b"t", len(dims), *dims, ggml_type, 0)
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + info
    return header + bytes(-len(header) % 32) + bytes(256)


def _relative_offset(base: Base, name: str) -> int:
    return struct.unpack_from("<Q", base.data, base.tensor(name, DATA_OFFSET))[0]


BAD_FILES: dict[str, tuple[Callable[[Base], bytes], str]] = {
    # header
    "empty_file": (lambda b: b"", "empty file"),
    "magic_only": (lambda b: b"GGUF", "truncated header"),
    "half_magic": (lambda b: b"GG", "truncated header"),
    "header_cut": (lambda b: b.data[:20], "truncated header"),
    "bad_magic": (lambda b: b"FUGG" + b.data[4:], "not a GGUF file"),
    "text_file": (lambda b: b"hello, world\n" * 10, "not a GGUF file"),
    "version_0": (lambda b: b.patch(4, "I", 0), "unsupported GGUF version 0"),
    "version_1": (lambda b: b.patch(4, "I", 1), "unsupported GGUF version 1"),
    "version_future": (lambda b: b.patch(4, "I", 4), "unsupported GGUF version 4"),
    "big_endian": (lambda b: b.patch(4, "I", 3 << 24), "big-endian"),
    "tensor_count_all_ones": (lambda b: b.patch(8, "Q", 2**64 - 1), "claims"),
    "tensor_count_2_62": (lambda b: b.patch(8, "Q", 2**62), "claims"),
    "kv_count_all_ones": (lambda b: b.patch(16, "Q", 2**64 - 1), "claims"),
    "kv_count_2_62": (lambda b: b.patch(16, "Q", 2**62), "claims"),
    "cut_in_metadata": (lambda b: b.data[: b.kv("test.tokens", VALUE) + 9], "past the end"),
    "cut_in_tensor_infos": (lambda b: b.data[: b.tensor("blk.0.ffnq", DIMS) + 3], "past the end"),
    # key/value pairs
    "key_length_2_63": (lambda b: b.patch(b.kv("test.u8", KEY_LEN), "Q", 2**63), "past the end"),
    "key_length_file_size": (
        lambda b: b.patch(b.kv("test.u8", KEY_LEN), "Q", len(b.data)),
        "past the end",
    ),
    "empty_key": (
        lambda b: b.variant(extra=lambda w: w.add_key_value("", 1, GGUFValueType.UINT32)),
        "empty metadata key",
    ),
    "value_type_13": (lambda b: b.patch(b.kv("test.u8", VALUE_TYPE), "I", 13), "value type 13"),
    "value_type_all_ones": (
        lambda b: b.patch(b.kv("test.u8", VALUE_TYPE), "I", 2**32 - 1),
        "value type",
    ),
    "array_item_type_13": (
        lambda b: b.patch(b.kv("test.scores", ARRAY_ITEM_TYPE), "I", 13),
        "value type 13",
    ),
    "nested_array": (
        lambda b: b.patch(b.kv("test.scores", ARRAY_ITEM_TYPE), "I", GGUFValueType.ARRAY),
        "nested",
    ),
    "array_count_2_60": (
        lambda b: b.patch(b.kv("test.scores", ARRAY_COUNT), "Q", 2**60),
        "past the end",
    ),
    "string_array_count_2_62": (
        lambda b: b.patch(b.kv("test.tokens", ARRAY_COUNT), "Q", 2**62),
        "past the end",
    ),
    "array_string_length_all_ones": (
        lambda b: b.patch(b.kv("test.tokens", ARRAY_FIRST_STRING_LEN), "Q", 2**64 - 1),
        "past the end",
    ),
    "string_length_all_ones": (
        lambda b: b.patch(b.kv("test.title", VALUE), "Q", 2**64 - 1),
        "past the end",
    ),
    "duplicate_key": (lambda b: _rename_key(b, "test.count_b", "test.count_a"), "duplicate"),
    "duplicate_key_with_newline": (
        lambda b: _rename_key(
            bytes_base(_rename_key(b, "test.count_a", "test\ncount_a"), b),
            "test.count_b",
            "test\ncount_a",
        ),
        "duplicate metadata key 'test\\ncount_a'",
    ),
    "invalid_utf8_key": (lambda b: b.patch(b.kv("test.title", KEY) + 5, "B", 0xFF), "UTF-8"),
    "invalid_utf8_value": (lambda b: b.patch(b.kv("test.title", VALUE) + 8, "B", 0xC3), "UTF-8"),
    "invalid_utf8_array_string": (
        lambda b: b.patch(b.kv("test.tokens", ARRAY_FIRST_STRING) + 1, "B", 0x80),
        "UTF-8",
    ),
    "alignment_13": (
        lambda b: b.patch(b.kv("general.alignment", VALUE), "I", 13),
        "not a power of two",
    ),
    "alignment_0": (
        lambda b: b.patch(b.kv("general.alignment", VALUE), "I", 0),
        "alignment 0 is not",
    ),
    "alignment_wrong_type": (
        lambda b: b.patch(b.kv("general.alignment", VALUE_TYPE), "I", GGUFValueType.INT32),
        "general.alignment must be a UINT32, not INT32",
    ),
    # tensor infos
    "tensor_name_too_long": (
        lambda b: b.variant(tensor_specs=[("t" * 64, GGMLQuantizationType.F32, (4,))]),
        "64 bytes long",
    ),
    "duplicate_tensor_name": (
        lambda b: _rename_tensor(b, "blk.0.proj", b"blk.0.norm"),
        "duplicate tensor name 'blk.0.norm'",
    ),
    "invalid_utf8_tensor_name": (
        lambda b: _rename_tensor(b, "blk.0.proj", b"blk.0.\xffroj"),
        "UTF-8",
    ),
    "too_many_dims_patched": (
        lambda b: b.patch(b.tensor("blk.0.norm", N_DIMS), "I", 5),
        "5 dimensions",
    ),
    "too_many_dims_written": (
        lambda b: b.variant(tensor_specs=[("five", GGMLQuantizationType.F32, (1, 2, 1, 2, 4))]),
        "5 dimensions",
    ),
    "n_dims_all_ones": (
        lambda b: b.patch(b.tensor("blk.0.norm", N_DIMS), "I", 2**32 - 1),
        "past the end",
    ),
    "negative_dim": (lambda b: _dims(b, "blk.0.norm", 2**64 - 1), "negative dimension"),
    "overflowing_shape": (
        lambda b: _dims(b, "blk.0.proj", 4 * (2**31 - 1), 4 * (2**31 - 1)),
        "overflowing",
    ),
    "mem_size_overflow": (lambda b: _dims(b, "blk.0.norm", 0x7FFFFFFFFFFFFFC0), "overflowing"),
    "nbytes_past_file": (lambda b: _dims(b, "blk.0.norm", 2**40), "past the end"),
    "ggml_type_removed_4": (
        lambda b: b.patch(b.tensor("blk.0.norm", GGML_TYPE), "I", 4),
        "ggml type 4",
    ),
    "ggml_type_count": (
        lambda b: b.patch(b.tensor("blk.0.norm", GGML_TYPE), "I", 42),
        "ggml type 42",
    ),
    "ggml_type_all_ones": (
        lambda b: b.patch(b.tensor("blk.0.norm", GGML_TYPE), "I", 2**32 - 1),
        "invalid ggml type",
    ),
    "quantized_scalar": (
        lambda b: _one_tensor_file(GGMLQuantizationType.Q8_0, ()),
        "row of 1 elements is not a multiple of the Q8_0 block size 32",
    ),
    "row_not_multiple_of_block": (lambda b: _dims(b, "blk.0.attn", 48, 4), "block size"),
    "misaligned_offset": (
        lambda b: _tensor_offset(b, "blk.0.proj", _relative_offset(b, "blk.0.proj") + 1),
        "not aligned",
    ),
    "offset_all_ones_aligned": (
        lambda b: _tensor_offset(b, "blk.0.proj", 2**64 - 32),
        "past the end",
    ),
    "offset_just_past_end": (
        lambda b: _tensor_offset(b, "blk.0.norm", len(b.data) - b.layout.data_offset),
        "past the end",
    ),
    # tensor data
    "data_one_byte_short": (lambda b: b.data[: b.layout.data_end - 1], "past the end"),
    "data_cut_in_half": (
        lambda b: b.data[: (b.layout.data_offset + b.layout.data_end) // 2],
        "past the end",
    ),
    "data_missing": (lambda b: b.data[: b.layout.data_offset], "past the end"),
}


def bytes_base(data: bytes, base: Base) -> Base:
    """The same layout over other bytes: lets two in-place patches compose."""
    return Base(data, base.layout, base.workdir)


def _assert_one_line_error(err: GGUFError, path: Path, expected: str) -> None:
    message = str(err)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "\n" not in message and "\r" not in message, message
    assert len(message) < 400, message
    # nothing chained: a user who sees the traceback anyway sees only this error
    assert err.__cause__ is None
    assert err.__context__ is None or err.__suppress_context__


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_gives_one_line_error(base: Base, tmp_path: Path, case: str) -> None:
    make, expected = BAD_FILES[case]
    path = tmp_path / f"{case}.gguf"
    path.write_bytes(make(base))
    with pytest.raises(GGUFError) as caught:
        open_gguf(path)
    _assert_one_line_error(caught.value, path, expected)


def test_base_file_is_valid(base: Base) -> None:
    """The patches above start from a file the reader accepts, so each failure is the patch's."""
    path = base.workdir / "valid.gguf"
    gguf_file = open_gguf(path)
    assert list(gguf_file.tensors) == [name for name, _, _ in TENSOR_SPECS]
    assert gguf_file.metadata["test.tokens"] == ["<pad>", "hello", "wörld", ""]
    assert gguf_file.data_offset == base.layout.data_offset


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.gguf"
    with pytest.raises(GGUFError) as caught:
        open_gguf(path)
    _assert_one_line_error(caught.value, path, "no such file")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(GGUFError) as caught:
        open_gguf(tmp_path)
    _assert_one_line_error(caught.value, tmp_path, "is a directory")


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    """Opening a FIFO for reading would block until a writer comes: it must be refused first."""
    path = tmp_path / "pipe.gguf"
    os.mkfifo(path)
    with pytest.raises(GGUFError) as caught:
        open_gguf(path)
    _assert_one_line_error(caught.value, path, "not a regular file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(base: Base, tmp_path: Path) -> None:
    path = tmp_path / "locked.gguf"
    path.write_bytes(base.data)
    path.chmod(0)
    with pytest.raises(GGUFError) as caught:
        open_gguf(path)
    _assert_one_line_error(caught.value, path, "cannot read")


def test_header_only_file_opens(tmp_path: Path) -> None:
    """No tensors and no metadata is a valid, if useless, file (llama.cpp accepts it too)."""
    path = tmp_path / "header_only.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0) + bytes(8))
    gguf_file = open_gguf(path)
    assert gguf_file.metadata == {}
    assert gguf_file.tensors == {}


def test_hand_packed_file_opens(tmp_path: Path) -> None:
    """The hand-packed layout behind `quantized_scalar` is valid when the shape is."""
    path = tmp_path / "one_tensor.gguf"
    path.write_bytes(_one_tensor_file(GGMLQuantizationType.Q8_0, (32, 2)))
    tensor = open_gguf(path).tensor("t")
    assert (tensor.shape, tensor.n_bytes) == ((2, 32), 68)


def test_zero_sized_dimension_opens(base: Base, tmp_path: Path) -> None:
    """A dimension of 0 makes an empty tensor, which llama.cpp accepts: so must we."""
    path = tmp_path / "zero_dim.gguf"
    path.write_bytes(_dims(base, "blk.0.proj", 64, 0))
    tensor = open_gguf(path).tensors["blk.0.proj"]
    assert tensor.shape == (0, 64)
    assert tensor.n_bytes == 0
    assert tensor.raw_bytes().numel() == 0
