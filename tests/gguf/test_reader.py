"""What a valid file gives back: typed metadata, torch-order shapes, zero-copy tensor bytes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader
from test_bad_input import TENSOR_SPECS, write_small_gguf

from metallic.gguf.reader import GGUFFile, TensorInfo, open_gguf

N_VOCAB = 262144
EMBEDDING_LENGTH = 640


@pytest.fixture(scope="module")
def model(default_model_path: Path) -> GGUFFile:
    return open_gguf(default_model_path)


def _map_of(tensor: TensorInfo) -> np.ndarray:
    """The whole-file memory map a tensor's array is a view of."""
    array = tensor.data
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def test_default_model_opens(model: GGUFFile, default_model_path: Path) -> None:
    assert model.path == default_model_path
    assert model.version == 3
    assert model.architecture == "gemma3"
    assert model.file_size == default_model_path.stat().st_size
    assert model.data_offset % model.alignment == 0
    n_blocks = model.metadata["gemma3.block_count"]
    assert sum(name.startswith("blk.") for name in model.tensors) % n_blocks == 0
    assert model.tensor_bytes <= model.file_size - model.data_offset


@pytest.mark.parametrize(
    ("key", "expected_type"),
    [
        ("general.architecture", str),
        ("gemma3.context_length", int),
        ("gemma3.attention.layer_norm_rms_epsilon", float),
        ("gemma3.rope.freq_base", float),
        ("tokenizer.ggml.add_bos_token", bool),
        ("tokenizer.ggml.bos_token_id", int),
        ("general.tags", list),
    ],
)
def test_scalar_metadata_has_python_types(model: GGUFFile, key: str, expected_type: type) -> None:
    value = model.metadata[key]
    assert type(value) is expected_type  # exact: a bool must not pass for an int, nor the reverse


@pytest.mark.parametrize(
    ("key", "item_type"),
    [
        ("tokenizer.ggml.tokens", str),
        ("tokenizer.ggml.scores", float),
        ("tokenizer.ggml.token_type", int),
    ],
)
def test_vocabulary_arrays_are_python_lists(model: GGUFFile, key: str, item_type: type) -> None:
    values = model.metadata[key]
    assert type(values) is list
    assert len(values) == N_VOCAB
    assert all(type(v) is item_type for v in values)


def test_vocabulary_values(model: GGUFFile) -> None:
    tokens = model.metadata["tokenizer.ggml.tokens"]
    assert tokens[:3] == ["<pad>", "<eos>", "<bos>"]
    assert model.metadata["tokenizer.ggml.bos_token_id"] == 2
    assert model.metadata["tokenizer.ggml.scores"][0] == -1000.0


def test_shapes_are_in_torch_order(model: GGUFFile) -> None:
    assert model.tensor("token_embd.weight").shape == (N_VOCAB, EMBEDDING_LENGTH)
    assert model.tensor("output_norm.weight").shape == (EMBEDDING_LENGTH,)
    head_dim = model.metadata["gemma3.attention.key_length"]
    n_kv_heads = model.metadata["gemma3.attention.head_count_kv"]
    assert model.tensor("blk.0.attn_k.weight").shape == (n_kv_heads * head_dim, EMBEDDING_LENGTH)


def test_raw_bytes_is_a_view_of_the_map(model: GGUFFile, default_model_path: Path) -> None:
    for tensor in (model.tensor("token_embd.weight"), model.tensor("output_norm.weight")):
        file_map = _map_of(tensor)
        assert file_map.size == model.file_size
        raw = tensor.raw_bytes()
        assert raw.dtype == torch.uint8
        assert raw.data_ptr() == file_map.ctypes.data + tensor.file_offset
        assert np.shares_memory(raw.numpy(), file_map)
    norm = model.tensor("output_norm.weight")
    with default_model_path.open("rb") as f:
        f.seek(norm.file_offset)
        on_disk = f.read(norm.n_bytes)
    assert norm.raw_bytes().numpy().tobytes() == on_disk


def test_byte_sizes_follow_ggml_block_sizes(model: GGUFFile) -> None:
    for tensor in model:
        block_size, type_size = GGML_QUANT_SIZES[tensor.ggml_type]
        assert tensor.n_elements == math.prod(tensor.shape), tensor.name
        assert tensor.shape[-1] % block_size == 0, tensor.name
        assert tensor.n_bytes == tensor.n_elements // block_size * type_size, tensor.name
        assert tensor.raw_bytes().numel() == tensor.n_bytes, tensor.name


def test_tensors_lie_within_the_file_without_overlap(model: GGUFFile) -> None:
    previous_end = model.data_offset
    for tensor in sorted(model, key=lambda t: t.file_offset):
        assert tensor.file_offset >= previous_end, tensor.name
        assert (tensor.file_offset - model.data_offset) % model.alignment == 0, tensor.name
        previous_end = tensor.file_offset + tensor.n_bytes
    assert previous_end <= model.file_size


def test_written_values_come_back_typed(tmp_path: Path) -> None:
    """Every GGUF value type written by gguf.GGUFWriter reads back as the right Python value."""
    path = write_small_gguf(tmp_path / "small.gguf")
    gguf_file = open_gguf(path)
    expected = {
        "general.architecture": "llama",
        "test.count_a": 7,
        "test.u8": 200,
        "test.i8": -5,
        "test.u16": 60000,
        "test.i16": -3000,
        "test.i32": -70000,
        "test.u64": 2**40 + 3,
        "test.i64": -(2**40),
        "test.f64": 0.125,
        "test.scale": 0.5,
        "test.flag": True,
        "test.title": "a small model",
        "test.scores": [0.0, -1.5, 2.25],
        "test.ids": [1, 2, 3, 2**33],
        "test.flags": [True, False, True],
        "test.tokens": ["<pad>", "hello", "wörld", ""],
    }
    for key, value in expected.items():
        got = gguf_file.metadata[key]
        assert got == value and type(got) is type(value), key
        if isinstance(value, list):
            assert [type(v) for v in got] == [type(v) for v in value], key
    for name, ggml_type, shape in TENSOR_SPECS:
        tensor = gguf_file.tensor(name)
        assert (tensor.ggml_type, tensor.shape) == (ggml_type, shape)
    for upstream in GGUFReader(path).tensors:  # the plain upstream reader agrees on every byte
        ours = gguf_file.tensor(upstream.name).raw_bytes().numpy()
        assert ours.tobytes() == upstream.data.tobytes(), upstream.name
