"""Argument checks (issue 15): clear TypeError/ValueError naming the argument, the context cap,
the KV-cache fit check and prompt truncation, directly and through the public API."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import metallic
from metallic.engine import arguments
from metallic.engine.arguments import (
    ArgumentTypeError,
    ArgumentValueError,
    ContextTooLarge,
    PromptTooLong,
    cap_context,
    check_kv_fits,
    fit_prompt,
    kv_cache_bytes,
)
from metallic.engine.engine import Engine
from metallic.errors import MetallicError
from metallic.gguf.config import ModelConfig, config_from_metadata
from metallic.testing.synthetic import write_synthetic_model

TINY_METADATA = {
    "general.architecture": "llama",
    "llama.context_length": 2048,
    "llama.embedding_length": 64,
    "llama.block_count": 4,
    "llama.feed_forward_length": 128,
    "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 2,
    "llama.vocab_size": 100,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_synthetic_model(tmp_path_factory.mktemp("m") / "tiny.gguf", "tiny-llama", "Q8_0")


@pytest.fixture(scope="module")
def engine(tiny) -> Engine:
    return metallic.load(tiny, device="cpu", context_size=64)


def _config(window: int = 0, sliding: tuple[bool, ...] = ()) -> ModelConfig:
    """A llama-shaped config of 4 layers (2 KV heads of 16), or 6 with a sliding window."""
    base = config_from_metadata({**TINY_METADATA, "llama.block_count": 6 if window else 4})
    return replace(base, sliding_window=window, sliding_layers=sliding)


# -- the Python API's type and value checks --------------------------------------------------------


@pytest.mark.parametrize("path", [123, 4.5, ["model.gguf"], b"model.gguf"])
def test_load_rejects_a_path_of_the_wrong_type(path) -> None:
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike") as err:
        metallic.load(path)
    assert type(path).__name__ in str(err.value)
    assert isinstance(err.value, MetallicError)  # the CLI would print it as one line


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        (None, "not NoneType"),
        (123, "not int"),
        (b"hello", "not bytes (decode bytes to str first)"),
        (bytearray(b"hi"), "not bytearray"),
        ({1, 2}, "not set"),
        ([1, "2"], "token ids must be ints, not str"),
        ([1, True], "token ids must be ints, not bool"),
    ],
)
def test_generate_rejects_a_prompt_of_the_wrong_type(engine: Engine, prompt, words: str) -> None:
    with pytest.raises(TypeError, match="prompt") as err:
        engine.generate(prompt, max_tokens=2)
    assert words in str(err.value)
    with pytest.raises(TypeError, match="prompt"):
        list(engine.stream(prompt, max_tokens=2))


def test_token_id_tuples_and_lists_are_prompts(engine: Engine) -> None:
    ids = engine.tokenizer.encode("abc")
    as_list = engine.generate(ids, max_tokens=3, temperature=0)
    assert engine.generate(tuple(ids), max_tokens=3, temperature=0) == as_list
    assert engine.generate("abc", max_tokens=3, temperature=0) == as_list


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, torch.uint8, torch.bool])
def test_load_rejects_unsupported_torch_dtypes(tiny, dtype) -> None:
    with pytest.raises(ValueError, match="dtype") as err:
        metallic.load(tiny, device="cpu", dtype=dtype)
    assert "torch.float32, torch.float16 or torch.bfloat16" in str(err.value)


def test_load_rejects_unknown_dtype_names_and_types(tiny) -> None:
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        metallic.load(tiny, device="cpu", dtype="int8")
    with pytest.raises(TypeError, match=r"dtype must be a str or torch\.dtype, not int"):
        metallic.load(tiny, device="cpu", dtype=8)


@pytest.mark.parametrize("device", ["meta", "mps", "cuda:x", "gpu", "cpu:0:1", ""])
def test_unknown_devices_are_refused_before_loading(tiny, device: str) -> None:
    with pytest.raises(ValueError, match="unknown device"):
        metallic.load(tiny, device=device)
    with pytest.raises(ValueError, match="unknown device 'meta'"):
        arguments.check_device(torch.device("meta"))


@pytest.mark.parametrize("budget", [-5, 0, 0.5, math.nan, math.inf, -math.inf, "nan", "inf", "-5"])
def test_memory_budget_must_be_a_positive_finite_size(tiny, budget) -> None:
    with pytest.raises(ValueError, match="memory_budget") as err:
        metallic.load(tiny, device="cpu", memory_budget=budget)
    assert "positive" in str(err.value) and "-0 MiB" not in str(err.value)


@pytest.mark.parametrize(
    ("option", "value", "error", "words"),
    [
        ("memory_budget", True, TypeError, "memory_budget must be a number of bytes"),
        ("memory_budget", [1], TypeError, "memory_budget must be a number of bytes"),
        ("context_size", 1, ValueError, "context_size must be at least 2"),
        ("context_size", 0, ValueError, "context_size must be at least 2"),
        ("context_size", 64.0, TypeError, "context_size must be an int"),
        ("context_size", "64", TypeError, "context_size must be an int"),
        ("gpu_layers", -1, ValueError, "gpu_layers must be at least 0"),
        ("gpu_layers", 2.5, TypeError, "gpu_layers must be an int"),
        ("context_override", "yes", TypeError, "context_override must be True or False"),
        ("cuda_graphs", None, TypeError, "cuda_graphs must be True or False"),
        ("native", 1, TypeError, "native must be True or False"),
        ("progress", "bar", TypeError, "progress must be callable"),
    ],
)
def test_load_options_name_the_argument(tiny, option, value, error, words) -> None:
    with pytest.raises(error, match=words):
        metallic.load(tiny, device="cpu", **{option: value})


def test_memory_sizes_in_text_and_numbers() -> None:
    assert arguments.memory_size("2G") == 2 << 30
    assert arguments.memory_size(1500.7) == 1500
    assert arguments.memory_size(None) is None


# -- the context cap and the KV-cache check --------------------------------------------------------


def test_context_defaults_to_the_training_context_up_to_4096() -> None:
    assert cap_context(None, 32768) == 4096
    assert cap_context(None, 2048) == 2048
    assert cap_context(None, 0) == 4096  # a file that states none
    assert cap_context(8192, 8192) == 8192


def test_context_past_training_needs_the_override() -> None:
    with pytest.raises(ContextTooLarge, match="32,768") as err:
        cap_context(2_000_000, 32768)
    assert "--ctx-size-override" in str(err.value) and "context_override=True" in str(err.value)
    assert cap_context(2_000_000, 32768, override=True) == 2_000_000


def test_engine_caps_the_context_at_the_training_context(tiny) -> None:
    # tiny-llama was "trained" on 2048 positions
    with pytest.raises(ContextTooLarge, match="2,048"):
        metallic.load(tiny, device="cpu", context_size=4096)
    assert metallic.load(tiny, device="cpu").context_size == 2048
    engine = metallic.load(tiny, device="cpu", context_size=4096, context_override=True)
    assert engine.context_size == 4096


def test_kv_bytes_count_keys_values_and_windows() -> None:
    per_token_layer = 2 * 2 * 16 * 4  # k and v, 2 heads of 16, f32
    assert kv_cache_bytes(_config(), 1000, 4) == 4 * 1000 * per_token_layer
    windowed = _config(window=128, sliding=(True,) * 5 + (False,))
    assert kv_cache_bytes(windowed, 1000, 4) == (5 * 128 + 1000) * per_token_layer
    assert kv_cache_bytes(windowed, 100, 2) == 6 * 100 * per_token_layer // 2


def test_kv_cache_that_cannot_fit_is_one_line(monkeypatch) -> None:
    monkeypatch.setattr(arguments, "available_memory", lambda device: 1 << 30)
    cpu = torch.device("cpu")
    check_kv_fits(_config(), 1000, torch.float32, cpu)  # 1 MB
    with pytest.raises(ContextTooLarge) as err:
        check_kv_fits(_config(), 10_000_000, torch.float32, cpu)  # 9.5 GiB
    message = str(err.value)
    assert "needs 9.5 GiB of KV cache" in message and "only 1.0 GiB of host memory" in message
    assert "\n" not in message


def test_available_memory_is_what_the_host_reports() -> None:
    free = arguments.available_memory(torch.device("cpu"))
    with open("/proc/meminfo") as meminfo:
        total = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    assert free is not None and 0 < free <= total * 1024


def test_engine_refuses_an_overridden_context_that_cannot_fit(tiny) -> None:
    with pytest.raises(ContextTooLarge, match="of KV cache, but only"):
        metallic.load(tiny, device="cpu", context_size=10**12, context_override=True)


# -- prompts ---------------------------------------------------------------------------------------


def test_fit_prompt_without_truncate_needs_room_for_one_token() -> None:
    assert fit_prompt([1, 2, 3], 4) == [1, 2, 3]
    with pytest.raises(PromptTooLong, match="the prompt has 4 tokens but the context holds 4"):
        fit_prompt([1, 2, 3, 4], 4)


def test_truncate_keeps_bos_and_leaves_room_for_max_tokens() -> None:
    ids = [99, *range(10, 30)]  # BOS then 20 tokens
    kept = fit_prompt(ids, 16, truncate=True, max_tokens=6, bos_id=99)
    assert kept == [99, *range(21, 30)]  # 10 tokens: 6 of the 16 stay free
    assert fit_prompt(ids, 16, truncate=True, max_tokens=None, bos_id=99) == [99, *range(16, 30)]
    no_bos = list(range(10, 30))
    assert fit_prompt(no_bos, 16, truncate=True, max_tokens=6, bos_id=99) == list(range(20, 30))
    assert fit_prompt(ids, 40, truncate=True, max_tokens=6, bos_id=99) == ids  # fits already
    with pytest.raises(PromptTooLong, match="room for 16 new tokens"):
        fit_prompt(ids, 16, truncate=True, max_tokens=16, bos_id=99)


def test_engine_truncation_keeps_bos(engine: Engine) -> None:
    bos = engine.tokenizer.bos_id
    text = " ".join(["word"] * 200)
    ids = engine.encode_prompt(text, truncate=True, max_tokens=10)
    full = engine.tokenizer.encode(text, parse_special=True)
    assert ids[0] == bos and len(ids) == engine.context_size - 10
    assert ids[1:] == full[-(len(ids) - 1) :]
    params = metallic.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    steps = list(engine.generate_tokens(text, params, truncate=True))
    assert len(steps) == 10  # the room was left: all ten came, none was cut by the context


def test_argument_errors_are_both_metallic_and_builtin() -> None:
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, MetallicError)
    assert issubclass(ArgumentValueError, ValueError)
    assert issubclass(ArgumentValueError, MetallicError)
