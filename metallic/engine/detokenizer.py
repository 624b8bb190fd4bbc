"""Streaming generated tokens out as text: whole UTF-8 characters only, stop strings held back.

A token is a run of bytes, not of characters: byte-fallback vocabularies spell an emoji as four
one-byte tokens, and BPE merges may end mid-character. ``StreamingDetokenizer`` therefore decodes
the concatenated byte stream incrementally, emitting a character only once all its bytes have
arrived. ``StopMatcher`` sits after it: text that might be the start of a stop string waits until
the next pieces show whether the stop completes (then it and everything after are dropped).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from typing import Protocol

from metallic.engine.sampling import SamplingError


class TokenBytes(Protocol):
    """What the detokenizer needs from a tokenizer (metallic.gguf.tokenizer.Tokenizer has it)."""

    def token_bytes(self, token_id: int) -> bytes: ...

    def is_control(self, token_id: int) -> bool: ...


class StreamingDetokenizer:
    """Turns token ids, one at a time, into text pieces that never split a character.

    Control tokens (``<eos>``, ``<end_of_turn>``, ...) produce no text unless ``skip_special`` is
    false. Invalid bytes become U+FFFD as soon as they are known to be invalid; an incomplete
    character left at the end becomes U+FFFD in ``flush``.
    """

    def __init__(self, tokenizer: TokenBytes, *, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (often "", for a partial character)."""
        if self._skip_special and self._tokenizer.is_control(token_id):
            return ""
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End the stream: return what is still held (as U+FFFD if incomplete) and reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text


class StopMatcher:
    """Cuts a text stream at the first stop string, emitting nothing of the stop itself.

    ``push`` returns the text that is safe to show now; a tail that could still grow into a stop
    string is held until later pieces decide. Once a stop string completes, ``stop`` names it,
    the text before it has been returned, and all further input is ignored.
    """

    def __init__(self, stop_strings: Iterable[str]) -> None:
        self._stops = tuple(stop_strings)
        if any(not stop for stop in self._stops):
            raise SamplingError("stop strings must be non-empty")
        self._held = ""
        self.stop: str | None = None

    @property
    def stopped(self) -> bool:
        return self.stop is not None

    def push(self, piece: str) -> str:
        """Add a piece of text; return what can be emitted now."""
        if self.stopped:
            return ""
        text = self._held + piece
        # The stop a character-by-character stream would see first: the earliest to end, and of
        # those ending together the longest. Choosing so makes the result independent of how
        # the text was cut into pieces.
        found = [(text.find(stop), stop) for stop in self._stops]
        found = [(start + len(stop), start, stop) for start, stop in found if start >= 0]
        if found:
            _, start, self.stop = min(found)
            self._held = ""
            return text[:start]
        hold = max((self._partial_stop_length(text, stop) for stop in self._stops), default=0)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        """End of generation without a stop: the held tail was ordinary text after all."""
        text, self._held = self._held, ""
        return "" if self.stopped else text

    @staticmethod
    def _partial_stop_length(text: str, stop: str) -> int:
        """Length of the longest end of ``text`` that is a proper beginning of ``stop``."""
        for length in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:length]):
                return length
        return 0
