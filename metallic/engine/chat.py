"""Chat prompts: the GGUF file's own Jinja template when it has one, a built-in one otherwise.

A template comes from the model file, so it is untrusted code: it runs in jinja2's immutable
sandbox (no attribute writes, no unsafe calls, `range` of at most 100,000 items), and metallic
bounds what the sandbox does not: the rendered text's size (`MAX_RENDER_CHARS`, also checked
before a `*` repetition or a string method builds a huge string) and the time a render may take
(`RENDER_SECONDS`; a loop of a billion steps is stopped from a timer thread). Whatever goes wrong
inside a template becomes a one-line `TemplateError`.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any

import jinja2
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

from metallic.errors import MetallicError

Message = Mapping[str, str]
MAX_RENDER_CHARS = 8 << 20  # far above any prompt a context holds (~4 characters a token)
RENDER_SECONDS = 3.0  # real templates render in milliseconds


class TemplateError(MetallicError):
    """A chat template that does not parse, fails, or passes the size or time bound."""


# Built-in templates for files without `tokenizer.chat_template`, by model family.
# Whitespace that matters is written as string literals, so Jinja's block trimming cannot eat it.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages[0]['content'] ~ '\\n\\n' if messages and "
    "messages[0]['role'] == 'system' else '' %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{{ '<start_of_turn>' ~ ('model' if m['role'] == 'assistant' else 'user') ~ '\\n' }}"
    "{{ (system if loop.first else '') ~ (m['content'] | trim) ~ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{{ '<|start_header_id|>' ~ m['role'] ~ '<|end_header_id|>\\n\\n' }}"
    "{{ (m['content'] | trim) ~ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"gemma3": GEMMA_TEMPLATE, "qwen2": CHATML_TEMPLATE, "qwen3": CHATML_TEMPLATE}


def builtin_template(arch: str, tokens: Sequence[str]) -> str:
    """The family's template; llama files use Llama 3's when they carry its header tokens."""
    if arch == "llama":
        return LLAMA3_TEMPLATE if "<|start_header_id|>" in tokens else CHATML_TEMPLATE
    return BUILTIN_TEMPLATES.get(arch, CHATML_TEMPLATE)


class _TemplateRaised(Exception):
    """raise_exception() in a template: its message is the whole error."""


def _raise(message: str) -> None:
    raise _TemplateRaised(message)


class _TooLarge(Exception):
    pass


class _OutOfTime(BaseException):
    """Raised inside the rendering thread by `_TimeLimit` (a BaseException, so that no
    `except Exception` on the way out can swallow it)."""


def _too_large(what: str) -> _TooLarge:
    return _TooLarge(f"{what} would pass the bound of {MAX_RENDER_CHARS:,} characters")


def _power_bits(base: Any, exponent: Any) -> int:
    """About how many bits `base ** exponent` has (0 unless both are ints)."""
    if not (isinstance(base, int) and isinstance(exponent, int)) or abs(base) < 2:
        return 0
    return max(exponent, 0) * abs(base).bit_length()


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with the size checks it lacks."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            sequence, count = (left, right) if isinstance(right, int) else (right, left)
            repeats = isinstance(sequence, (str, list, tuple)) and isinstance(count, int)
            if repeats and len(sequence) * count > MAX_RENDER_CHARS:
                raise _too_large("a repetition")
        elif _power_bits(left, right) > MAX_RENDER_CHARS:
            raise _too_large("a power")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(getattr(__obj, "__self__", None), str):  # ljust, center, zfill, ...
            for value in (*args, *kwargs.values()):
                if isinstance(value, int) and value > MAX_RENDER_CHARS:
                    raise _too_large(f"a string of {value:,} characters")
        return super().call(__context, __obj, *args, **kwargs)


def _set_async_exception(thread_id: int, exception: type[BaseException] | None) -> None:
    """Raise `exception` in the thread at its next Python instruction (None: cancel it)."""
    target = ctypes.c_ulong(thread_id)
    ctypes.pythonapi.PyThreadState_SetAsyncExc(target, exception and ctypes.py_object(exception))


class _TimeLimit:
    """Stop the calling thread's Python code with `_OutOfTime` once `seconds` have passed.

    A template's loops never call back into metallic, so no clock can be checked from inside;
    a timer thread raises the exception in the rendering thread instead. Under the lock, an
    exception raised but not yet delivered when the block ends is cancelled, so it can never
    surface after the block."""

    def __init__(self, seconds: float) -> None:
        self._thread = threading.get_ident()
        self._lock = threading.Lock()
        self._active = True
        self._fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        with self._lock:
            if self._active:
                self._fired = True
                _set_async_exception(self._thread, _OutOfTime)

    def __enter__(self) -> None:
        self._timer.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._timer.cancel()
        with self._lock:
            self._active = False
            if self._fired:
                _set_async_exception(self._thread, None)


class ChatTemplate:
    """Renders a conversation into the prompt text the model was trained on."""

    def __init__(
        self,
        source: str,
        bos_token: str = "",
        eos_token: str = "",
        time_limit: float = RENDER_SECONDS,
    ) -> None:
        env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as err:
            raise TemplateError(f"chat template does not parse: {err}") from None
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.time_limit = time_limit

    @classmethod
    def for_model(cls, metadata: Mapping[str, Any]) -> ChatTemplate:
        tokens = metadata.get("tokenizer.ggml.tokens") or []

        def token(key: str) -> str:
            index = metadata.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else ""

        source = metadata.get("tokenizer.chat_template")
        if not isinstance(source, str) or not source.strip():
            source = builtin_template(str(metadata.get("general.architecture")), tokens)
        return cls(source, token("bos"), token("eos"))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text of `messages`, or a one-line `TemplateError`."""
        variables = {
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        pieces: list[str] = []
        size = 0
        try:
            with _TimeLimit(self.time_limit):
                for piece in self._template.generate(variables):
                    size += len(piece)
                    if size > MAX_RENDER_CHARS:
                        raise _too_large("the rendered prompt")
                    pieces.append(piece)
        except _OutOfTime:
            raise TemplateError(
                f"chat template failed to render: it ran past {self.time_limit:g} s"
            ) from None
        except _TemplateRaised as err:
            raise TemplateError(f"chat template: {err}") from None
        except Exception as err:  # any failure of untrusted code: recursion, memory, types
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise TemplateError(f"chat template failed to render: {detail}") from None
        return "".join(pieces)


def fit_history(
    messages: Sequence[Message], fits: Callable[[list[Message]], bool]
) -> tuple[list[Message], int]:
    """The conversation cut to fit: (kept messages, how many were dropped).

    A leading system message always stays; whole turns go, oldest first (a user message with
    the replies after it), so the kept part still starts with a user turn as templates expect.
    The last user turn is never dropped; whether it fits alone is for the caller to check."""
    system = list(messages[:1]) if messages and messages[0].get("role") == "system" else []
    turns = list(messages[len(system) :])
    dropped = 0
    while not fits(system + turns):
        cut = next((i for i in range(1, len(turns)) if turns[i].get("role") == "user"), 0)
        if not cut:
            break
        turns = turns[cut:]
        dropped += cut
    return system + turns, dropped
