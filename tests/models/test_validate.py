"""A model's config checked against its own file before anything is built from it.

The files are tiny valid models (`metallic.testing.hostile`) with one metadata value or one tensor
header changed; each goes through the whole `metallic.load`, which must end in a one-line error
naming the key or tensor, the value and what it must be, never in a traceback, a hang (guarded
by an alarm) or a huge allocation.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType, GGUFValueType

import metallic
from metallic.errors import ConfigError, GGUFError, MetallicError
from metallic.gguf.config import config_from_metadata
from metallic.gguf.reader import open_gguf
from metallic.models.validate import expected_shapes, model_config
from metallic.testing.hostile import BaseModel, Entry, HostileModels, replaced, time_limit
from metallic.testing.synthetic import PRESETS, tensor_plan, write_synthetic_model

GUARD_SECONDS = 10  # a load still running after this has hung


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, BaseModel]:
    return HostileModels(tmp_path_factory.mktemp("bases")).bases


def _load_error(path: Path, data: bytes) -> str:
    """The one-line error `metallic.load` gives for a file of `data`."""
    path.write_bytes(data)
    with time_limit(GUARD_SECONDS), pytest.raises(MetallicError) as err:
        metallic.load(path, device="cpu")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message.removeprefix(f"{path}: ")


def _with_value(base: BaseModel, key: str, value: int) -> bytes:
    vtype = GGUFValueType.UINT32 if value < 2**32 else GGUFValueType.UINT64
    return base.assemble(replaced(base.entries, Entry.encoded(key, value, vtype)))


@pytest.mark.parametrize(
    ("arch", "key", "value", "message"),
    [  # the values that escaped as a RuntimeError or a hang before values were validated
        ("llama", "rope.dimension_count", 1, "llama.rope.dimension_count = 1 must be an integer"),
        (
            "llama",
            "rope.dimension_count",
            4294967295,
            "llama.rope.dimension_count = 4294967295 must be even and <= head size 32",
        ),
        ("gemma3", "block_count", 2147483647, "gemma3.block_count = 2147483647 must be at most"),
        ("gemma3", "block_count", 4294967295, "gemma3.block_count = 4294967295 must be at most"),
        ("gemma3", "block_count", 2**64 - 1, "gemma3.block_count = 18446744073709551615 must be"),
        (
            "qwen3",
            "block_count",
            3,
            "qwen3.block_count = 3 must equal the 2 layers whose blk.N tensors the file holds",
        ),
    ],
)
def test_known_escapes_are_one_line_errors(tmp_path, bases, arch, key, value, message):
    data = _with_value(bases[arch], f"{arch}.{key}", value)
    error = _load_error(tmp_path / "m.gguf", data)
    assert error.startswith(message)


def test_a_partial_rope_inside_the_head_loads(tmp_path, bases):
    """Even and at most the head size: rotating only part of each head is a valid model."""
    path = tmp_path / "m.gguf"
    path.write_bytes(_with_value(bases["llama"], "llama.rope.dimension_count", 16))
    engine = metallic.load(path, device="cpu")
    assert engine.config.rope_dim == 16
    assert len(engine.generate("hello", max_tokens=2, temperature=0, ignore_eos=True)) > 0


@pytest.mark.parametrize(
    ("arch", "key", "value", "message"),
    [
        (
            "qwen2",
            "embedding_length",
            32,
            "tensor token_embd.weight has shape (320, 64), expected (320, 32) "
            "(320 = the tokens in tokenizer.ggml.tokens, 32 = qwen2.embedding_length)",
        ),
        (
            "llama",
            "feed_forward_length",
            256,
            "tensor blk.0.ffn_gate.weight has shape (128, 64), expected (256, 64) "
            "(256 = llama.feed_forward_length, 64 = llama.embedding_length)",
        ),
        (
            "qwen3",
            "attention.head_count_kv",
            2,
            "tensor blk.0.attn_k.weight has shape (64, 64), expected (128, 64) "
            "(128 = qwen3.attention.head_count_kv x the head size, 64 = qwen3.embedding_length)",
        ),
        (
            "gemma3",
            "attention.head_count",
            1,
            "tensor blk.0.attn_q.weight has shape (128, 64), expected (64, 64) "
            "(64 = gemma3.attention.head_count x the head size, 64 = gemma3.embedding_length)",
        ),
    ],
)
def test_tensor_shapes_must_follow_the_config(tmp_path, bases, arch, key, value, message):
    assert _load_error(tmp_path / "m.gguf", _with_value(bases[arch], f"{arch}.{key}", value)) == (
        message
    )


def test_vocabulary_size_is_the_token_list_and_the_embedding(tmp_path, bases):
    base = bases["llama"]
    tokens = base.entry("tokenizer.ggml.tokens")
    assert tokens is not None
    fewer = Entry.encoded(tokens.key, tokens.value[:-1], GGUFValueType.ARRAY, tokens.subtype)
    error = _load_error(tmp_path / "m.gguf", base.assemble(replaced(base.entries, fewer)))
    assert error == "llama.vocab_size = 320 must equal the 319 tokens of tokenizer.ggml.tokens"
    entries = [e for e in replaced(base.entries, fewer) if e.key != "llama.vocab_size"]
    error = _load_error(tmp_path / "m.gguf", base.assemble(entries))
    assert error.startswith("tensor token_embd.weight has shape (320, 64), expected (319, 64)")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (b"blk.1.", b"blk.2.", "the file holds tensors of layer blk.2 but none of blk.1 (layers"),
        (b"blk.1.", b"blk.x.", "tensor 'blk.x.attn_norm.weight' has no layer number (blk.N.*)"),
    ],
)
def test_layers_are_counted_from_the_tensors(tmp_path, bases, old, new, message):
    base = bases["qwen2"]
    infos = base.tensor_infos.replace(old, new)
    assert _load_error(tmp_path / "m.gguf", base.assemble(base.entries, infos)).startswith(message)


def _retyped(base: BaseModel, name: str, ggml_type: GGMLQuantizationType) -> bytes:
    """Tensor infos with `name`'s ggml type changed (the name's length, then it, then the
    dimension count, the dimensions, the type)."""
    infos = bytearray(base.tensor_infos)
    at = infos.index(struct.pack("<Q", len(name)) + name.encode()) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", infos, at)
    struct.pack_into("<I", infos, at + 4 + 8 * n_dims, ggml_type)
    return base.assemble(base.entries, bytes(infos))


def test_formats_are_checked_before_loading(tmp_path, bases):
    path = tmp_path / "m.gguf"
    path.write_bytes(_retyped(bases["llama"], "output_norm.weight", GGMLQuantizationType.IQ4_NL))
    with pytest.raises(GGUFError, match="unsupported tensor type IQ4_NL in tensor output_norm"):
        model_config(open_gguf(path))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"])
def test_expected_tensors_are_the_writers(tmp_path, preset):
    """The validator expects exactly the tensors (and shapes) of llama.cpp's conversion, which
    the synthetic writer reproduces independently."""
    shape = PRESETS[preset]
    gguf = open_gguf(write_synthetic_model(tmp_path / "m.gguf", shape, fill="sparse"))
    config = model_config(gguf)
    expected = expected_shapes(config, set(gguf.tensors))
    assert {name: tuple(d.size for d in dims) for name, dims in expected.items()} == {
        spec.name: spec.shape for spec in tensor_plan(shape)
    }


def test_rope_freqs_must_hold_half_the_rope_dims():
    config = config_from_metadata(
        {
            "general.architecture": "llama",
            "llama.context_length": 16,
            "llama.embedding_length": 64,
            "llama.block_count": 1,
            "llama.feed_forward_length": 128,
            "llama.attention.head_count": 2,
            "tokenizer.ggml.tokens": ["a", "b"],
        }
    )
    shapes = expected_shapes(config, {"rope_freqs.weight"})
    assert [d.size for d in shapes["rope_freqs.weight"]] == [16]
    assert "output.weight" not in shapes  # tied to the embedding when absent


def test_messages_name_the_file(tmp_path, bases):
    path = tmp_path / "named.gguf"
    path.write_bytes(_with_value(bases["llama"], "llama.block_count", 7))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: llama.block_count = 7 must equal")):
        model_config(open_gguf(path))
