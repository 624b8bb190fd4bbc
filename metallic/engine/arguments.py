"""Checks of what a user hands the engine, before anything is loaded or allocated.

Each check raises an error that is both a `MetallicError` (the CLI prints it as one line and
exits 2) and the built-in exception a Python caller expects: `ArgumentTypeError` is a `TypeError`,
`ArgumentValueError` a `ValueError`. Messages name the argument (`name`: the keyword of
`metallic.load`, or the CLI flag when the CLI calls).

Also here, because they are policy rather than mechanism: the context size (capped at the
model's training context unless overridden), whether its KV cache fits in memory, and how a
too-long prompt is cut.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from metallic.errors import MetallicError

if TYPE_CHECKING:  # torch is imported where needed, so the CLI's flag checks stay light
    import torch

    from metallic.gguf.config import ModelConfig
    from metallic.gguf.tokenizer import Tokenizer

DEFAULT_CONTEXT = 4096  # the context when none is asked for (or the training context, if less)
_DEVICE = re.compile(r"(cpu|cuda(:\d+)?)")


class ArgumentTypeError(MetallicError, TypeError):
    """An argument of the wrong type."""


class ArgumentValueError(MetallicError, ValueError):
    """An argument of the right type with a value metallic cannot use."""


class ContextTooLarge(ArgumentValueError):
    """A context past the model's training context, or whose KV cache cannot fit in memory."""


class PromptTooLong(MetallicError):
    """The prompt does not leave room for generated tokens in the context."""


def _type_name(value: object) -> str:
    return type(value).__name__


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_model(path: object, name: str = "path") -> None:
    """A model is a path (str or os.PathLike) or a known model's name; None means the default."""
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise ArgumentTypeError(
            f"{name} must be a str or os.PathLike (a GGUF file or a known model name), "
            f"not {_type_name(path)}"
        )


def check_prompt(prompt: object, name: str = "prompt") -> None:
    """A prompt is text (str) or token ids (a list or tuple of ints). Bytes are refused: they are
    a sequence of ints, and would otherwise be read as token ids."""
    if isinstance(prompt, str):
        return
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise ArgumentTypeError(
            f"{name} must be str or a list of token ids, not {_type_name(prompt)} "
            "(decode bytes to str first)"
        )
    if not isinstance(prompt, (list, tuple)):
        raise ArgumentTypeError(
            f"{name} must be str or a list of token ids, not {_type_name(prompt)}"
        )
    bad = next((item for item in prompt if not _is_int(item)), None)
    if bad is not None:
        raise ArgumentTypeError(f"{name}: token ids must be ints, not {_type_name(bad)} {bad!r}")


def check_device(device: object, name: str = "device") -> None:
    """cpu, cuda or cuda:N (a str or a torch.device); anything else before any loading starts."""
    if device is None:
        return
    if isinstance(device, str):
        text = device
    else:
        import torch

        if not isinstance(device, torch.device):
            raise ArgumentTypeError(
                f"{name} must be a str or torch.device, not {_type_name(device)}"
            )
        text = str(device)
    if not _DEVICE.fullmatch(text):
        raise ArgumentValueError(f"unknown {name} {text!r} (choose cpu, cuda or cuda:N)")


def check_dtype(dtype: object, name: str = "dtype") -> None:
    """f32, f16 or bf16: by name or as a torch dtype."""
    if dtype is None:
        return
    from metallic.runtime.device import DTYPES

    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ArgumentValueError(f"unknown {name} {dtype!r} (choose f32, f16 or bf16)")
        return
    import torch

    if not isinstance(dtype, torch.dtype):
        raise ArgumentTypeError(f"{name} must be a str or torch.dtype, not {_type_name(dtype)}")
    if dtype not in DTYPES.values():
        raise ArgumentValueError(
            f"{name} {dtype} is not supported (choose torch.float32, torch.float16 or "
            "torch.bfloat16; or 'f32', 'f16', 'bf16')"
        )


def check_int(value: object, name: str, least: int) -> None:
    """None, or an int (not a bool) of at least `least`."""
    if value is None:
        return
    if not _is_int(value):
        raise ArgumentTypeError(f"{name} must be an int, not {_type_name(value)} {value!r}")
    if value < least:  # type: ignore[operator]
        raise ArgumentValueError(f"{name} must be at least {least}, got {value}")


def check_flag(value: object, name: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, not {value!r}")


def memory_size(value: object, name: str | None = "memory_budget") -> int | None:
    """A memory size in bytes: None, a positive finite number, or text such as "2G" / "1500M".
    (`name` None: the caller names the argument itself, as argparse does.)"""
    if value is None:
        return None
    if isinstance(value, str):
        from metallic.runtime.placement import parse_bytes

        try:
            return parse_bytes(value)
        except MetallicError as err:
            raise ArgumentValueError(f"{name}: {err}" if name else str(err)) from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(
            f"{name} must be a number of bytes or a size such as '2G', not {_type_name(value)}"
        )
    if not math.isfinite(value) or value < 1:
        raise ArgumentValueError(f"{name} must be a positive number of bytes, got {value!r}")
    return int(value)


def check_load_options(
    path: object,
    *,
    device: object = None,
    dtype: object = None,
    context_size: object = None,
    context_override: object = False,
    native: object = None,
    cuda_graphs: object = True,
    progress: object = None,
    gpu_layers: object = None,
    memory_budget: object = None,
) -> None:
    """Every `Engine(...)` / `metallic.load(...)` argument, checked before the file is opened."""
    check_model(path)
    check_device(device)
    check_dtype(dtype)
    check_int(context_size, "context_size", 2)
    check_flag(context_override, "context_override")
    check_flag(native, "native", optional=True)
    check_flag(cuda_graphs, "cuda_graphs")
    if progress is not None and not callable(progress):
        raise ArgumentTypeError(f"progress must be callable, not {_type_name(progress)}")
    check_int(gpu_layers, "gpu_layers", 0)
    memory_size(memory_budget)


# -- the context ---------------------------------------------------------------------------------


def cap_context(requested: int | None, training: int, override: bool = False) -> int:
    """The context size to allocate: `requested`, or min(training context, DEFAULT_CONTEXT).

    Past the training context a model has never seen the positions (its output degrades), and
    the KV cache grows without bound, so a larger request needs `override`."""
    if requested is None:
        return min(training, DEFAULT_CONTEXT) if training > 0 else DEFAULT_CONTEXT
    if training > 0 and requested > training and not override:
        raise ContextTooLarge(
            f"a context of {requested:,} tokens is more than the model was trained on "
            f"({training:,}); pass --ctx-size-override (Python: context_override=True) to use "
            "it anyway"
        )
    return requested


def kv_cache_bytes(config: ModelConfig, context: int, element_bytes: int) -> int:
    """Bytes of keys and values for one sequence of `context` tokens, all layers; a
    sliding-window layer holds only its window."""
    per_token = 2 * config.n_kv_heads * config.head_dim * element_bytes
    positions = sum(
        min(context, config.sliding_window) if config.is_sliding(i) else context
        for i in range(config.n_layers)
    )
    return positions * per_token


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new allocation: the GPU's free memory, or the host's MemAvailable (what
    Linux can hand out without swapping); None where the system does not say."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gib(n_bytes: int) -> str:
    return f"{n_bytes / (1 << 30):,.1f} GiB"


def check_kv_fits(
    config: ModelConfig, context: int, dtype: torch.dtype, device: torch.device
) -> None:
    """A one-line error, before allocating, when the context's KV cache cannot fit in memory."""
    need = kv_cache_bytes(config, context, dtype.itemsize)
    free = available_memory(device)
    if free is not None and need > free:
        where = "GPU" if device.type == "cuda" else "host"
        raise ContextTooLarge(
            f"a context of {context:,} tokens needs {_gib(need)} of KV cache, but only "
            f"{_gib(free)} of {where} memory is available (lower --ctx-size / context_size)"
        )


# -- prompts -------------------------------------------------------------------------------------


def fit_prompt(
    ids: Sequence[int],
    context: int,
    *,
    truncate: bool = False,
    max_tokens: int | None = None,
    bos_id: int | None = None,
) -> list[int]:
    """The prompt's ids as they go into a context of `context` tokens.

    Without `truncate` a prompt must leave room for one generated token, else `PromptTooLong`.
    With it, the prompt's start is cut so that `max_tokens` tokens (at least one) still fit
    after it, keeping a leading BOS: a model always saw one there, and without it the first
    kept token would take its place."""
    ids = list(ids)
    if not truncate:
        if len(ids) >= context:
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens but the context holds {context}"
                " (raise --ctx-size, or pass --truncate to keep the prompt's end)"
            )
        return ids
    room = context - max(max_tokens or 1, 1)
    if len(ids) <= room:
        return ids
    keep_bos = bool(ids) and bos_id is not None and ids[0] == bos_id
    if room < 1 + keep_bos:
        raise PromptTooLong(
            f"--truncate cannot leave room for {max_tokens} new tokens in a context of "
            f"{context} (lower -n or raise --ctx-size)"
        )
    return ids[:1] + ids[len(ids) - room + 1 :] if keep_bos else ids[len(ids) - room :]


def encode_prompt(
    prompt: str | Sequence[int],
    tokenizer: Tokenizer,
    context: int,
    vocab_size: int,
    *,
    truncate: bool = False,
    max_tokens: int | None = None,
) -> list[int]:
    """The prompt's token ids as they enter a context of `context` tokens (`truncate`: its end,
    keeping a BOS, with room for `max_tokens`), each checked to be in the vocabulary."""
    check_prompt(prompt)
    ids = tokenizer.encode(prompt, parse_special=True) if isinstance(prompt, str) else prompt
    ids = fit_prompt(
        ids, context, truncate=truncate, max_tokens=max_tokens, bos_id=tokenizer.bos_id
    )
    if not ids:
        raise MetallicError("the prompt is empty (and the model adds no BOS token)")
    check_token_ids(ids, vocab_size)
    return ids


def check_token_ids(ids: Sequence[int], vocab_size: int) -> None:
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise MetallicError(f"token id {bad} is outside the vocabulary of {vocab_size}")
