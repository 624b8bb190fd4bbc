"""Open GGUF files lazily and defensively.

Parsing is the `gguf` package's memory-mapped `GGUFReader`; this module adds the checks a hostile or
damaged file needs (every read bounds-checked against the real file size, counts checked against
what the file could hold, tensor layouts validated before any view is made) and a fast path for the
large metadata arrays (vocabularies) that the upstream reader walks one element at a time. Tensors
stay views of the map until something asks for their bytes.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from metallic.errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_TENSOR_NAME_BYTES = 63  # ggml's GGML_MAX_NAME (64) less the terminating NUL
HEADER_BYTES = 24  # magic, version, tensor count, key/value count
# The smallest possible encodings, used to reject counts no file of this size could hold before
# parsing starts: a key/value pair is a length, a non-empty key, a type and at least one value byte;
# a tensor info is a name length, a dimension count, a type and an offset.
MIN_KV_BYTES = 8 + 1 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
MAX_NAME_IN_MESSAGE = 60  # characters of a key or tensor name quoted in an error message
_U64 = struct.Struct("<Q")


class _Corrupt(ValueError):
    """A structural problem found while parsing; its message is the one-line problem to report."""


class _OutOfFile(_Corrupt):
    """A read that would pass the end of the file: the file is truncated or a length is bogus."""

    def __init__(self, offset: int, nbytes: int, file_size: int) -> None:
        super().__init__(
            f"truncated or corrupt: read of {nbytes} bytes at offset {offset} runs past the end "
            f"of the file ({file_size} bytes)"
        )


def _quote(name: str | bytes) -> str:
    """A name as it can appear in a one-line message: escaped by repr and cut short."""
    if len(name) > MAX_NAME_IN_MESSAGE:
        return f"{name[:MAX_NAME_IN_MESSAGE]!r}..."
    return repr(name)


def _not_utf8(raw: bytes | memoryview, offset: int) -> _Corrupt:
    shown = bytes(raw[: MAX_NAME_IN_MESSAGE + 1])  # no copy of a huge string just to quote it
    return _Corrupt(f"string at offset {offset} is not valid UTF-8: {_quote(shown)}")


def _decode(raw: bytes, offset: int) -> str:
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError:
        raise _not_utf8(raw, offset) from None


def _value_type(raw_type: int, offset: int) -> GGUFValueType:
    try:
        return GGUFValueType(int(raw_type))
    except ValueError:
        raise _Corrupt(f"invalid metadata value type {int(raw_type)} at offset {offset}") from None


class _CheckedReader(GGUFReader):
    """`GGUFReader` whose every read is bounds-checked and whose arrays are read in one slice.

    Upstream reads past the end of the map as empty arrays and loops once per array element, so a
    file that claims 2**62 elements would spin forever; here such a claim fails at the first read
    past the end, which bounds all work by the file's real size.
    """

    def __init__(self, path: str) -> None:
        self.values: dict[int, Any] = {}  # python value of each metadata value, keyed by offset
        super().__init__(path, "r")

    def _get(
        self, offset: int, dtype: Any, count: int = 1, override_order: Any = None
    ) -> np.ndarray:
        count = int(count)
        nbytes = np.dtype(dtype).itemsize * count
        if offset < 0 or count < 0 or offset + nbytes > self.data.size:
            raise _OutOfFile(offset, nbytes, int(self.data.size))
        return super()._get(offset, dtype, count, override_order)

    def _push_field(self, field: Any, skip_sum: bool = False) -> int:
        if not field.name:
            raise _Corrupt(f"empty metadata key at offset {field.offset}")
        if field.name in self.fields:
            raise _Corrupt(f"duplicate metadata key {_quote(field.name)} at offset {field.offset}")
        if field.name == "general.alignment":
            _check_alignment(field)
        return super()._push_field(field, skip_sum)

    def _get_field_parts(
        self, orig_offs: int, raw_type: int
    ) -> tuple[int, list[np.ndarray], list[int], list[GGUFValueType]]:
        gtype = _value_type(raw_type, orig_offs)
        if gtype != GGUFValueType.ARRAY:
            size, parts, idxs, types = super()._get_field_parts(orig_offs, raw_type)
            if gtype == GGUFValueType.STRING:
                self.values[orig_offs] = _decode(parts[-1].tobytes(), orig_offs + 8)
            else:
                self.values[orig_offs] = parts[-1].tolist()[0]
            return size, parts, idxs, types
        raw_itype = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        itype = _value_type(raw_itype[0], orig_offs)
        n = int(count[0])
        start = orig_offs + 12
        scalar = self.gguf_scalar_to_np.get(itype)
        if scalar is not None:
            values = self._get(start, scalar, n)
            self.values[orig_offs] = values.tolist()
            end = start + values.nbytes
        elif itype == GGUFValueType.STRING:
            self.values[orig_offs], end = self._read_strings(start, n)
        else:
            raise _Corrupt(f"nested metadata array at offset {orig_offs} (arrays of arrays)")
        region = self._get(start, np.uint8, end - start)
        return end - orig_offs, [raw_itype, count, region], [2], [gtype, itype]

    def _read_strings(self, offset: int, count: int) -> tuple[list[str], int]:
        """`count` length-prefixed strings from `offset`: the lengths are walked first (each
        bounds-checked), then the strings are cut from one copy of their bytes, which slices
        faster than the map (262k Gemma tokens: 0.09 -> 0.06 s)."""
        buf = memoryview(self.data)
        size = int(self.data.size)
        unpack = _U64.unpack_from
        start = offset
        lengths = []
        for _ in range(count):
            if offset + 8 > size:
                raise _OutOfFile(offset, 8, size)
            (length,) = unpack(buf, offset)
            offset += 8
            if offset + length > size:
                raise _OutOfFile(offset, length, size)
            lengths.append(length)
            offset += length
        raw = bytes(buf[start:offset])
        strings = []
        at = 0
        try:  # one handler around the loop: a call per string would slow a vocabulary noticeably
            for length in lengths:
                at += 8
                strings.append(str(raw[at : at + length], "utf-8"))
                at += length
        except UnicodeDecodeError:
            raise _not_utf8(raw[at : at + length], start + at) from None
        return strings, offset

    def _get_tensor_info_field(self, orig_offs: int) -> Any:
        field = super()._get_tensor_info_field(orig_offs)
        _check_tensor_layout(field)
        return field

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        names: set[str] = set()
        for field in fields:
            if field.name in names:
                raise _Corrupt(f"duplicate tensor name {_quote(field.name)}")
            names.add(field.name)
            # int(): upstream computes the data start in numpy uint32 arithmetic
            _check_tensor_extent(field, int(start_offs), int(self.alignment), int(self.data.size))
        super()._build_tensors(start_offs, fields)


def _check_alignment(field: Any) -> None:
    """Upstream checks this too, but only after parsing every tensor and with a vaguer message."""
    if field.types != [GGUFValueType.UINT32]:
        kind = "/".join(t.name for t in field.types)
        raise _Corrupt(f"general.alignment must be a UINT32, not {kind}")
    alignment = int(field.parts[-1][0])
    if alignment == 0 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment {alignment} is not a power of two")


def _check_tensor_layout(field: Any) -> None:
    """Reject a tensor header whose name, rank, shape or type no ggml tensor could have."""
    _, _, n_dims, dims, raw_type, _ = field.parts
    name = _quote(field.name)
    if len(field.parts[1]) > MAX_TENSOR_NAME_BYTES:
        raise _Corrupt(
            f"tensor name {name} is {len(field.parts[1])} bytes long "
            f"(ggml allows at most {MAX_TENSOR_NAME_BYTES})"
        )
    if int(n_dims[0]) > MAX_DIMS:
        raise _Corrupt(f"tensor {name} has {int(n_dims[0])} dimensions (at most {MAX_DIMS})")
    shape = [int(d) for d in dims]
    if any(d >= 2**63 for d in shape):
        raise _Corrupt(f"tensor {name} has a negative dimension in shape {shape}")
    if math.prod(shape) >= 2**62:
        raise _Corrupt(f"tensor {name} has an overflowing shape {shape}")
    try:
        ggml_type = GGMLQuantizationType(int(raw_type[0]))
    except ValueError:
        raise _Corrupt(f"tensor {name} has invalid ggml type {int(raw_type[0])}") from None
    block_size = GGML_QUANT_SIZES[ggml_type][0]
    row = shape[0] if shape else 1
    if row % block_size:
        raise _Corrupt(
            f"tensor {name}: row of {row} elements is not a multiple of the "
            f"{ggml_type.name} block size {block_size}"
        )


def _check_tensor_extent(field: Any, data_start: int, alignment: int, file_size: int) -> None:
    """Reject a tensor whose data is misaligned or would reach past the end of the file."""
    _, _, _, dims, raw_type, offset = field.parts
    name = _quote(field.name)
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_type[0]))]
    rel = int(offset[0])
    if rel % alignment:
        raise _Corrupt(f"tensor {name} data offset {rel} is not aligned to {alignment} bytes")
    n_bytes = math.prod(int(d) for d in dims) // block_size * type_size
    end = data_start + rel + n_bytes
    if end > file_size:
        raise _Corrupt(
            f"tensor {name} data (bytes {data_start + rel} to {end}) runs past the end of the "
            f"file ({file_size} bytes): truncated or a corrupt offset"
        )


@dataclass(frozen=True)
class TensorInfo:
    """A lazy handle on one tensor: its layout and a view of the mapped bytes (nothing read yet)."""

    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: outermost first, rows contiguous in the last dimension
    n_elements: int
    n_bytes: int
    file_offset: int
    data: np.ndarray  # view into the memory map; typed for F16/F32, uint8 bytes for blocks

    @property
    def type_name(self) -> str:
        return self.ggml_type.name

    def raw_bytes(self) -> torch.Tensor:
        """The tensor's bytes as a flat uint8 torch view of the map (no copy, read-only)."""
        flat = self.data.reshape(-1).view(np.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the map is read-only by design
            return torch.from_numpy(flat)


class GGUFFile:
    """An opened GGUF file: typed metadata plus lazy tensor handles over one memory map."""

    def __init__(self, path: Path, reader: _CheckedReader) -> None:
        self.path = path
        self.file_size = int(reader.data.size)
        self.version = int(reader.fields["GGUF.version"].parts[0][0])
        self.alignment = int(reader.alignment)
        self.data_offset = int(reader.data_offset)
        self.metadata: dict[str, Any] = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            value_offset = field.offset + sum(int(p.nbytes) for p in field.parts[:3])
            self.metadata[key] = reader.values[value_offset]
        self.tensors: dict[str, TensorInfo] = {
            t.name: TensorInfo(
                name=t.name,
                ggml_type=t.tensor_type,
                shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                n_elements=int(t.n_elements),
                n_bytes=int(t.n_bytes),
                file_offset=int(t.data_offset),
                data=t.data,
            )
            for t in reader.tensors
        }

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(self.path, "missing metadata key general.architecture")
        return arch

    def tensor(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(self.path, f"missing tensor {name}") from None

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values())


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """Open and validate a GGUF file; every problem becomes a one-line `GGUFError`."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise GGUFError(path, "no such file") from None
    except OSError as err:
        raise GGUFError(path, f"cannot access: {err.strerror or err}") from None
    if stat.S_ISDIR(mode):
        raise GGUFError(path, "is a directory, not a GGUF file")
    if not stat.S_ISREG(mode):
        raise GGUFError(path, "not a regular file")
    try:
        with path.open("rb") as f:
            header = f.read(HEADER_BYTES)
            file_size = os.fstat(f.fileno()).st_size
    except OSError as err:
        raise GGUFError(path, f"cannot read: {err.strerror or err}") from None
    _check_header(path, header, file_size)
    try:
        reader = _CheckedReader(str(path))
    except UnicodeDecodeError as err:
        raise GGUFError(
            path, f"corrupt: a key or tensor name is not valid UTF-8: {_quote(err.object)}"
        ) from None
    except _Corrupt as err:
        raise GGUFError(path, str(err)) from None
    except ValueError as err:  # upstream's own checks; ours run first, but the file may change
        raise GGUFError(path, f"corrupt: {err}") from None
    except OSError as err:
        raise GGUFError(path, f"cannot map: {err.strerror or err}") from None
    return GGUFFile(path, reader)


def _check_header(path: Path, header: bytes, file_size: int) -> None:
    """Reject what is visibly not a GGUF file this reader handles, before mapping it."""
    if file_size == 0:
        raise GGUFError(path, "empty file (0 bytes), not a GGUF file")
    if header[:4] != GGUF_MAGIC[: len(header[:4])]:
        raise GGUFError(path, f"not a GGUF file (magic {header[:4]!r}, expected {GGUF_MAGIC!r})")
    if len(header) >= 8:
        (version,) = struct.unpack_from("<I", header, 4)
        if version & 0xFFFF == 0 and version != 0:
            raise GGUFError(path, "big-endian GGUF files are not supported")
        if version not in SUPPORTED_VERSIONS:
            raise GGUFError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
    if len(header) < HEADER_BYTES:
        raise GGUFError(path, f"truncated header ({len(header)} of {HEADER_BYTES} bytes)")
    if sys.byteorder != "little":
        raise GGUFError(path, "metallic reads GGUF on little-endian hosts only")
    n_tensors, n_kv = struct.unpack_from("<QQ", header, 8)
    if HEADER_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES + n_kv * MIN_KV_BYTES > file_size:
        raise GGUFError(
            path,
            f"corrupt header: it claims {n_tensors} tensors and {n_kv} metadata entries, "
            f"more than a file of {file_size} bytes can hold",
        )
