"""Tokenizers rebuilt from GGUF metadata that give exactly the token ids llama.cpp gives.

GGUF files carry two kinds of vocabulary that metallic supports:

- ``llama``: SentencePiece BPE. Spaces become U+2581, a space is prefixed to each run of text
  (``add_space_prefix``), and adjacent symbols merge greedily by the *score* of the token they form
  (highest first, leftmost on ties); characters outside the vocabulary fall back to ``<0xNN>``
  byte tokens. The file stores scores, not merges, so the merge list is derived here: every way
  of cutting a token into two tokens is a merge, ranked by the score of the whole.
- ``gpt2``: byte-level BPE with ranked merges, after a pre-tokenizer regex that depends on
  ``tokenizer.ggml.pre`` (``gpt-2``, ``llama-bpe``/Llama 3, ``qwen2``, ``smollm``/``starcoder``,
  ``default``). A byte-level vocabulary may lack some of the 256 byte tokens (SmolLM2 lacks 21,
  control bytes and bytes its training text never held); like llama.cpp, encoding drops them.

The merging of long texts runs in the HF ``tokenizers`` library (Rust), which is what makes
encoding them fast; short texts (a prompt) are merged in Python as llama.cpp merges them, which
spares a run the build of HF's model (see SHORT_TEXT), and the tables derived from the metadata
are cached on disk (see `tokenizer_cache`). Everything llama.cpp does around the merging is
reproduced here: the token attributes it derives from token types and names, the splitting of
text at special tokens (user-defined tokens always, control tokens only with ``parse_special``),
BOS/EOS, its end-of-generation set and its detokenizer. Anything else (other models, other
pre-tokenizers) is refused with `TokenizerError`.
"""

from __future__ import annotations

import functools
import heapq
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import Regex, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from metallic.errors import TokenizerError
from metallic.gguf import tokenizer_cache
from metallic.gguf.tokenizer_cache import DerivedTables

log = logging.getLogger("metallic")

SPACE_MARK = "\u2581"  # how SentencePiece spells a space inside tokens

# GGUF `tokenizer.ggml.token_type` values.
_TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_CONTROL = 1, 2, 3
_TYPE_USER_DEFINED, _TYPE_UNUSED, _TYPE_BYTE = 4, 5, 6

# llama.cpp's token attributes (bit flags), derived from the types and then adjusted by name.
_UNKNOWN, _UNUSED, _NORMAL, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 4, 8, 16, 32
_LSTRIP, _RSTRIP = 128, 256
_ATTR_OF_TYPE = np.zeros(8, np.int64)  # by type; undefined and out-of-range types have none
_ATTR_OF_TYPE[[_TYPE_NORMAL, _TYPE_UNKNOWN, _TYPE_CONTROL]] = [_NORMAL, _UNKNOWN, _CONTROL]
_ATTR_OF_TYPE[[_TYPE_USER_DEFINED, _TYPE_UNUSED, _TYPE_BYTE]] = [_USER_DEFINED, _UNUSED, _BYTE]
_SPECIAL = _UNKNOWN | _CONTROL  # parsed only with parse_special, hidden by skip_special
_SPLIT_OUT = _SPECIAL | _USER_DEFINED  # token texts cut out of the text before the BPE runs

_ASCII_SPACE = " \t\n\v\f\r"  # C isspace(), which llama.cpp uses to strip around special tokens
# Texts up to this many characters are merged in Python (`_merge_adjacent`, ~1.5 ms per 1000
# characters) rather than by HF's BPE, whose build (0.4-0.5 s for Gemma 3's vocabulary, 0.2 s for
# Llama 3's, most of a short run's tokenizer) is then left until a longer text needs it.
SHORT_TEXT = 8192

# Token texts llama.cpp promotes to control tokens and stop on (its end-of-generation set).
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    }
)
# Roles llama.cpp finds by name when the file has no id for them; a found token becomes control.
# (key suffix of tokenizer.ggml.<key>, deprecated key or "", names, whether it ends generation)
_NAMED_ROLES: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    (
        "eot_token_id",
        "",
        (
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|end_of_text|>",
            "<EOT>",
            "_<EOT>",
            "[EOT]",
            "<｜end▁of▁sentence｜>",
            "<end_of_utterance>",
        ),
        True,
    ),
    ("eom_token_id", "", ("<|eom_id|>",), True),
    (
        "fim_pre_token_id",
        "prefix_token_id",
        (
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ),
        False,
    ),
    (
        "fim_suf_token_id",
        "suffix_token_id",
        (
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ),
        False,
    ),
    (
        "fim_mid_token_id",
        "middle_token_id",
        (
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ),
        False,
    ),
    ("fim_pad_token_id", "", ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"), True),
    (
        "fim_rep_token_id",
        "",
        ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
        True,
    ),
    ("fim_sep_token_id", "", ("<|file_sep|>",), True),
)
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")  # gpt-oss

# Pre-tokenizer regexes, as llama.cpp runs them (its hand-written matchers implement these).
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_REGEX = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    """One llama.cpp pre-tokenizer type: regexes applied in turn, and the flags that go with it."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a whole pre-token that is in the vocab is taken as is
    add_bos: bool = False  # llama.cpp's default for tokenizer.ggml.add_bos_token


_GPT2 = _PreTokenizer((_GPT2_REGEX,))
_LLAMA3 = _PreTokenizer((_LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_QWEN2 = _PreTokenizer((_QWEN2_REGEX,))
_STARCODER = _PreTokenizer((r"\p{N}", _GPT2_REGEX))  # every digit alone, then GPT-2's split
# The names llama.cpp maps to these five types and treats no differently otherwise (it strips
# whitespace around the mask token of the jina and modern-bert ones, which are left out).
_PRE_TOKENIZERS: dict[str, _PreTokenizer] = {
    "default": _PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **dict.fromkeys(("gpt-2", "phi-2", "gigachat", "a.x-4.0", "mellum", "exaone4"), _GPT2),
    **dict.fromkeys(
        (
            "llama-bpe",
            "llama3",
            "llama-v3",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ),
        _LLAMA3,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
    **dict.fromkeys(
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
        _STARCODER,
    ),
}


class Tokenizer:
    """Text to token ids and back, as llama.cpp does it for the GGUF file it was built from.

    Build one with `Tokenizer.from_metadata`. Encoding and decoding are thread-safe.
    """

    def __init__(
        self,
        *,
        kind: str,
        tokens: list[str],
        attrs: list[int],
        pieces: list[bytes],
        backend: Callable[[], _HFTokenizer],
        short_encoder: Callable[[str], list[int]],
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool,
        add_eos: bool,
        add_space_prefix: bool,
        stop_ids: frozenset[int],
        overlaps: tuple[bool, bool],
    ) -> None:
        """``backend`` builds HF's tokenizer when first needed; ``short_encoder`` encodes a run
        of text without it, fast enough for a short text. ``overlaps``: whether special-token
        texts overlap (`_overlapping`): among the user-defined ones, among all that are cut out
        of a text."""
        self._kind = kind
        self._tokens = tokens
        self._attrs = attrs
        self._pieces = pieces
        self._make_backend = backend
        self._backend: _HFTokenizer | None = None
        self._backend_lock = threading.Lock()
        self._short_encoder = short_encoder
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._add_bos = add_bos
        self._add_eos = add_eos
        self._add_space_prefix = add_space_prefix
        self._stop_ids = stop_ids
        self._prefix = SPACE_MARK if kind == "spm" and add_space_prefix else ""
        self._splitters = tuple(
            _SpecialSplitter(entries, overlapping)
            for entries, overlapping in zip(_split_out(tokens, attrs), overlaps, strict=True)
        )  # indexed by parse_special

    @classmethod
    def from_metadata(
        cls, metadata: Mapping[str, Any], cache_folder: Path | None = None
    ) -> Tokenizer:
        """Build the tokenizer a GGUF file describes (``open_gguf(path).metadata``).

        With ``cache_folder`` the tables the build derives at length (its merges) are read from
        there when an earlier build of the same metadata stored them, else derived and stored
        (see `tokenizer_cache`).

        Raises `TokenizerError` for a tokenizer model other than ``llama``/``gpt2``, a ``gpt2``
        pre-tokenizer other than those listed in the module docstring (aliases llama.cpp treats
        alike included), or metadata that is malformed. Like llama.cpp, ``llama`` files ignore
        ``tokenizer.ggml.pre``, and a ``gpt2`` file without it gets the ``default`` one.
        """
        model = metadata.get("tokenizer.ggml.model")
        if model not in ("llama", "gpt2"):
            raise TokenizerError(
                f"unsupported tokenizer.ggml.model {model!r} (supported: 'llama', 'gpt2')"
            )
        tokens = _tokens(metadata)
        n = len(tokens)
        index = _index(tokens)
        key = tokenizer_cache.fingerprint(metadata, _derivation_code()) if cache_folder else None
        cached = tokenizer_cache.load(cache_folder, key, n) if cache_folder and key else None
        spelling = _Spelling.of(tokens)
        types = metadata.get("tokenizer.ggml.token_type")
        if types is None:
            attrs = [_NORMAL] * n
        elif isinstance(types, list) and len(types) >= n and set(map(type, types)) == {int}:
            attrs = _ATTR_OF_TYPE[np.clip(types[:n], 0, len(_ATTR_OF_TYPE) - 1)].tolist()
        else:
            raise TokenizerError(f"tokenizer.ggml.token_type is not a list of {n} token types")
        if model == "llama":
            kind = "spm"
            _check_byte_fallback(index)
            scores = _scores(metadata, n)
            merges = cached.merges if cached else _spm_merges(spelling, scores)
            backend = functools.partial(_spm_backend, tokens, index, spelling, merges)
            short_encoder = functools.partial(_spm_encode, index=index, scores=scores.tolist())
            # llama.cpp's defaults for SentencePiece files that leave these keys out
            default_bos, default_eos, default_add_bos, default_space_prefix = 1, 2, True, True
        else:
            kind = "bpe"
            pre = _pre_tokenizer(metadata)
            merges = cached.merges if cached else _merges(metadata, index)
            backend = functools.partial(_bpe_backend, tokens, index, merges, pre)
            short_encoder = _BpeMerger(index, merges, _bpe_pre_tokenizer(index, pre), pre)
            default_bos, default_eos, default_add_bos, default_space_prefix = (
                None,
                None,
                pre.add_bos,
                False,
            )
        bos_id = _special_id(metadata, "bos_token_id", n, default_bos)
        eos_id = _special_id(metadata, "eos_token_id", n, default_eos)
        add_bos = _flag(metadata, "tokenizer.ggml.add_bos_token", default_add_bos)
        add_eos = _flag(metadata, "tokenizer.ggml.add_eos_token", False)
        add_space_prefix = _flag(metadata, "tokenizer.ggml.add_space_prefix", default_space_prefix)
        if add_bos and bos_id is None:
            raise TokenizerError(
                "the vocabulary asks for a BOS token but names none (bos_token_id)"
            )
        if add_eos and eos_id is None:
            raise TokenizerError(
                "the vocabulary asks for an EOS token but names none (eos_token_id)"
            )
        stop_ids = _adjust_attrs(metadata, tokens, index, attrs, eos_id)
        if cached:
            overlaps = cached.overlaps
        else:
            user_defined, with_control = _split_out(tokens, attrs)
            overlap_all = _overlapping([text for text, _, _ in with_control])
            overlap_user = overlap_all and _overlapping([text for text, _, _ in user_defined])
            overlaps = (overlap_user, overlap_all)
            if cache_folder and key:
                tokenizer_cache.store(cache_folder, key, DerivedTables(merges, overlaps))
        return cls(
            kind=kind,
            tokens=tokens,
            attrs=attrs,
            pieces=_pieces(kind, tokens, attrs, spelling),
            backend=backend,
            short_encoder=short_encoder,
            bos_id=bos_id,
            eos_id=eos_id,
            add_bos=add_bos,
            add_eos=add_eos,
            add_space_prefix=add_space_prefix,
            stop_ids=stop_ids,
            overlaps=overlaps,
        )

    # -- properties ------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """``"spm"`` (SentencePiece, tokenizer.ggml.model llama) or ``"bpe"`` (byte-level, gpt2)."""
        return self._kind

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        return self._eos_id

    @property
    def add_bos(self) -> bool:
        """Whether ``encode(add_special=True)`` starts with BOS."""
        return self._add_bos

    @property
    def add_eos(self) -> bool:
        """Whether ``encode(add_special=True)`` ends with EOS."""
        return self._add_eos

    @property
    def stop_ids(self) -> frozenset[int]:
        """Tokens that end generation: llama.cpp's end-of-generation set (EOS, EOT, EOM, ...)."""
        return self._stop_ids

    def is_control(self, token_id: int) -> bool:
        """Whether the token is special (control or unknown): it has no text when skipped."""
        return bool(self._attrs[self._check_id(token_id)] & _SPECIAL)

    # -- encoding --------------------------------------------------------------------------------

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of ``text``, with BOS/EOS as the file asks when ``add_special``.

        With ``parse_special`` the texts of control tokens (``<start_of_turn>``, ...) in ``text``
        become those tokens; without it they are ordinary text. User-defined tokens are always
        recognised, as in llama.cpp.
        """
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode str, not {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise TokenizerError(
                f"text is not valid Unicode (lone surrogate at position {err.start})"
            ) from None
        parts = self._splitters[bool(parse_special)].split(text) if text else []
        runs = [part for part in parts if isinstance(part, str)]
        if self._kind == "spm":
            runs = [self._prefix + run.replace(" ", SPACE_MARK) for run in runs]
        if not runs:
            encoded = iter(())
        elif self._backend is None and sum(map(len, runs)) <= SHORT_TEXT:
            encoded = iter([self._short_encoder(run) for run in runs])
        else:
            encoded = iter(
                encoding.ids
                for encoding in self._hf().encode_batch_fast(runs, add_special_tokens=False)
            )
        ids = [self._bos_id] if add_special and self._add_bos else []
        for part in parts:
            if isinstance(part, str):
                ids += next(encoded)
            else:
                ids.append(part)
        if add_special and self._add_eos:
            ids.append(self._eos_id)
        return ids

    def _hf(self) -> _HFTokenizer:
        """HF's tokenizer, built at the first call (by one thread; others wait for it)."""
        with self._backend_lock:
            if self._backend is None:
                self._backend = self._make_backend()
            return self._backend

    # -- decoding --------------------------------------------------------------------------------

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes the token adds to the text: UTF-8, possibly part of a character.

        Byte-fallback tokens give their one byte; control tokens give their text (a streaming
        detokenizer that hides them checks `is_control`); unused tokens give nothing.
        """
        return self._pieces[self._check_id(token_id)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """The text of ``ids``; ``skip_special`` leaves out control and unknown tokens.

        As in llama.cpp, when the vocabulary prefixes a space to the text (add_space_prefix) the
        first token's leading space is dropped, so ``decode(encode(s, add_special=False)) == s``.
        Unlike llama.cpp, a leading BOS that ``skip_special`` hides does not count as first, so
        the same holds with ``add_special=True``; and the clean-up llama.cpp applies to some
        byte-level vocabularies (dropping the space before ``.,!?`` and some apostrophes, HF's
        clean_up_tokenization_spaces) is not done, since it breaks round trips. Bytes that are
        not UTF-8 become U+FFFD.
        """
        attrs = self._attrs
        pieces = self._pieces
        checked = [self._check_id(token_id) for token_id in ids]
        first = 0
        if skip_special and checked and checked[0] == self._bos_id and attrs[checked[0]] & _SPECIAL:
            first = 1
        out = []
        for position, token_id in enumerate(checked):
            piece = b"" if skip_special and attrs[token_id] & _SPECIAL else pieces[token_id]
            if position == first and self._add_space_prefix and piece[:1] == b" ":
                piece = piece[1:]
            out.append(piece)
        return b"".join(out).decode("utf-8", errors="replace")

    def _check_id(self, token_id: int) -> int:
        if not isinstance(token_id, (int, np.integer)) or not 0 <= token_id < len(self._tokens):
            raise TokenizerError(
                f"token id {token_id!r} is outside the vocabulary (0..{len(self._tokens) - 1})"
            )
        return int(token_id)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(kind={self._kind!r}, vocab_size={self.vocab_size}, bos_id={self._bos_id},"
            f" eos_id={self._eos_id}, add_bos={self._add_bos}, add_eos={self._add_eos})"
        )


# -- special tokens -------------------------------------------------------------------------------


class _SpecialSplitter:
    """Cuts the texts of special tokens out of a text, as llama.cpp's partitioning does.

    llama.cpp takes the tokens longest first and cuts every leftmost occurrence of each out of
    the text still left. When no two token texts overlap (a suffix of one being a prefix of
    another, runs of one repeated character aside) that equals a single left-to-right scan taking
    the longest token at each position, which is fast; otherwise, or when tokens strip the
    whitespace around them, the cuts are made token by token in llama.cpp's order.
    """

    def __init__(self, entries: Sequence[tuple[str, int, int]], overlapping: bool) -> None:
        """``entries``: (text, id, attributes); ``overlapping``: `_overlapping` of their texts."""
        ordered = sorted(entries, key=lambda entry: -len(entry[0]))
        texts = [text for text, _, _ in ordered]
        strips = any(attr & (_LSTRIP | _RSTRIP) for _, _, attr in ordered)
        self._ordered = ordered if strips or overlapping else []
        # the scan: a regex finds where a token may start (by its first two characters), then a
        # walk down a trie of the texts finds the longest token starting there
        self._trie: dict[str, Any] = {}
        self._starts = None
        if texts and not self._ordered:
            for text, token_id, _ in ordered:
                node = self._trie
                for char in text:
                    node = node.setdefault(char, {})
                node[""] = token_id  # a text ends here ("" is no character, so no clash)
            starts = sorted({text[:2] for text in texts}, key=len, reverse=True)
            self._starts = re.compile("|".join(map(re.escape, starts)))

    def split(self, text: str) -> list[str | int]:
        """``text`` as runs of plain text (str) and special token ids (int), in order."""
        if self._ordered:
            return self._split_in_order(text)
        if self._starts is None:
            return [text]
        parts: list[str | int] = []
        done = 0  # text before this is in `parts`
        search = self._starts.search
        match = search(text)
        while match:
            at = position = end = match.start()
            node, token_id = self._trie, -1
            while position < len(text):
                node = node.get(text[position])
                if node is None:
                    break
                position += 1
                if "" in node:
                    token_id, end = node[""], position
            if token_id < 0:
                match = search(text, at + 1)
                continue
            if at > done:
                parts.append(text[done:at])
            parts.append(token_id)
            done = end
            match = search(text, done)
        if done < len(text):
            parts.append(text[done:])
        return parts

    def _split_in_order(self, text: str) -> list[str | int]:
        parts: list[str | int] = [text]
        for token_text, token_id, attr in self._ordered:
            if any(isinstance(part, str) and token_text in part for part in parts):
                cut: list[str | int] = []
                for part in parts:
                    if isinstance(part, str) and token_text in part:
                        cut += _cut(part, token_text, token_id, attr)
                    else:
                        cut.append(part)
                parts = cut
        return parts


def _split_out(
    tokens: list[str], attrs: list[int]
) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """The (text, id, attributes) of the tokens cut out of a text before the BPE runs: without
    parse_special (user-defined tokens), and with it (control and unknown tokens too)."""
    found = np.flatnonzero(np.asarray(attrs, np.int64) & _SPLIT_OUT).tolist()
    with_control = [(tokens[i], i, attrs[i]) for i in found]
    return [entry for entry in with_control if not entry[2] & _SPECIAL], with_control


def _cut(text: str, token_text: str, token_id: int, attr: int) -> list[str | int]:
    """Every leftmost occurrence of one token cut out of ``text``, stripping as the token asks."""
    parts: list[str | int] = []
    start, end = 0, len(text)
    while start < end:
        match = text.find(token_text, start)
        if match < 0:
            parts.append(text[start:])
            break
        left_end = match
        if attr & _LSTRIP:
            while left_end > start and text[left_end - 1] in _ASCII_SPACE:
                left_end -= 1
        if left_end > start:
            parts.append(text[start:left_end])
        parts.append(token_id)
        start = match + len(token_text)
        if attr & _RSTRIP:
            while start < end and text[start] in _ASCII_SPACE:
                start += 1
    return parts


def _overlapping(texts: Sequence[str]) -> bool:
    """Whether a proper suffix of one text is a proper prefix of another (same-char runs aside)."""
    by_prefix: dict[str, list[str]] = {}
    for text in texts:
        for k in range(1, len(text)):
            by_prefix.setdefault(text[:k], []).append(text)
    for text in texts:
        for k in range(1, len(text)):
            for other in by_prefix.get(text[k:], ()):
                if other != text and not _same_char_runs(text, other):
                    return True
    return False


def _same_char_runs(a: str, b: str) -> bool:
    return a.count(a[0]) == len(a) and b.count(a[0]) == len(b)


# -- the BPE backends -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spelling:
    """Every token text as code points in one array, for numpy work over the whole vocabulary."""

    codes: np.ndarray  # uint32 code points of all tokens, one after another
    starts: np.ndarray  # where each token's code points start
    lengths: np.ndarray  # how many code points each token has (never 0)

    @classmethod
    def of(cls, tokens: list[str]) -> _Spelling:
        lengths = np.fromiter(map(len, tokens), np.int64, len(tokens))
        codes = np.frombuffer("".join(tokens).encode("utf-32-le"), np.uint32)
        return cls(codes=codes, starts=np.cumsum(lengths) - lengths, lengths=lengths)


@functools.cache
def _derivation_code() -> bytes:
    """What the derived tables depend on besides the metadata: this module and HF's BPE."""
    try:
        source = Path(__file__).read_bytes()
    except OSError:  # no source beside the module: its version must do
        from metallic import __version__

        source = __version__.encode()
    return source + b"\0tokenizers " + tokenizers.__version__.encode()


def _check_byte_fallback(index: dict[str, int]) -> None:
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in index]
    if missing:
        raise TokenizerError(
            f"SentencePiece vocabulary lacks byte-fallback tokens ({missing[0]} and "
            f"{len(missing) - 1} more); metallic cannot encode text outside its vocabulary"
        )


def _merge_texts(tokens: list[str], merges: np.ndarray) -> list[tuple[str, str]]:
    """The (left, right) texts of merges given as token-id pairs."""
    texts = np.array(tokens, dtype=object)  # gathers the strings without a Python loop
    return list(zip(texts[merges[:, 0]].tolist(), texts[merges[:, 1]].tolist(), strict=True))


def _spm_backend(
    tokens: list[str], index: dict[str, int], spelling: _Spelling, merges: np.ndarray
) -> _HFTokenizer:
    """SentencePiece BPE as llama.cpp runs it, on HF's BPE model with merges derived from scores
    (`_spm_merges`); the vocabulary has every byte-fallback token (`_check_byte_fallback`)."""
    backend = _HFTokenizer(models.BPE(index, _merge_texts(tokens, merges), byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(_word_start(spelling)), "merged_with_next")
    return backend


def _merge_adjacent(
    symbols: list[str], rank: Callable[[str, str], float | None]
) -> tuple[list[str], list[int]]:
    """Join adjacent symbols, the pair of least ``rank`` first (leftmost on ties), until no pair
    has a rank: how both of llama.cpp's BPE tokenizers merge, which differ only in the rank of a
    pair. Returns the symbols (joined ones at their first position, "" behind them) and each
    symbol's next position.

    Symbols are texts at fixed start positions that only grow, so a queued pair is stale
    exactly when its two symbols' lengths no longer add up to its joined text's.
    """
    n = len(symbols)
    following = list(range(1, n + 1))
    preceding = list(range(-1, n - 1))
    queue: list[tuple[float, int, str]] = []

    def consider(left: int) -> None:
        right = following[left]
        if right < n:
            order = rank(symbols[left], symbols[right])
            if order is not None:
                heapq.heappush(queue, (order, left, symbols[left] + symbols[right]))

    for left in range(n - 1):
        consider(left)
    while queue:
        _, left, joined = heapq.heappop(queue)
        right = following[left]
        stale = not symbols[left] or right >= n
        if stale or len(symbols[left]) + len(symbols[right]) != len(joined):
            continue
        symbols[left], symbols[right] = joined, ""
        following[left] = following[right]
        if following[left] < n:
            preceding[following[left]] = left
        if preceding[left] >= 0:
            consider(preceding[left])
        consider(left)
    return symbols, following


def _spm_encode(text: str, index: dict[str, int], scores: Sequence[float]) -> list[int]:
    """llama.cpp's SentencePiece tokenizer, in Python: the pair whose joined text is the token of
    highest score joins first; a character that is no token becomes its UTF-8 bytes'
    ``<0xNN>`` tokens."""

    def rank(left: str, right: str) -> float | None:
        token_id = index.get(left + right)
        return None if token_id is None else -scores[token_id]

    symbols, following = _merge_adjacent(list(text), rank)
    ids = []
    at = 0
    while at < len(symbols):
        token_id = index.get(symbols[at])
        if token_id is None:
            ids += [index[f"<0x{byte:02X}>"] for byte in symbols[at].encode()]
        else:
            ids.append(token_id)
        at = following[at]
    return ids


class _BpeMerger:
    """llama.cpp's byte-level BPE tokenizer, in Python: the pre-tokenizer's pieces (HF's, as the
    backend runs it), each merged by the ranks of the file's merges."""

    def __init__(
        self,
        index: dict[str, int],
        merges: np.ndarray,
        pre_tokenizer: Any,
        pre: _PreTokenizer,
    ) -> None:
        self._index = index
        self._pre_tokenizer = pre_tokenizer
        self._ignore_merges = pre.ignore_merges
        self._n = len(index)
        keys = merges[:, 0].astype(np.int64) * self._n + merges[:, 1]
        self._ranks = dict(zip(keys.tolist(), range(len(keys)), strict=True))  # pairs are unique

    def __call__(self, text: str) -> list[int]:
        index, ids = self._index, []
        for piece, _ in self._pre_tokenizer.pre_tokenize_str(text):
            whole = index.get(piece) if self._ignore_merges else None
            if whole is not None:
                ids.append(whole)
                continue
            symbols, _ = _merge_adjacent(list(piece), self._rank)
            ids += [index[symbol] for symbol in symbols if symbol]
        return ids

    def _rank(self, left: str, right: str) -> int | None:
        return self._ranks.get(self._index[left] * self._n + self._index[right])


def _spm_merges(spelling: _Spelling, scores: np.ndarray) -> np.ndarray:
    """Every cut of a token into two tokens, ranked as llama.cpp merges them: int32 [m, 2] ids.

    llama.cpp joins the adjacent pair whose joined text is the token of highest score (leftmost
    on ties), whatever the pair. So each cut ``(a, b)`` of a token ``t`` with ``a`` and ``b`` in
    the vocabulary is a merge ranked by the score of ``t``. Cuts are found by 64-bit polynomial
    hashes of all prefixes and suffixes, then confirmed code point by code point.
    """
    n = len(spelling.lengths)
    codes = spelling.codes.astype(np.uint64) + 1
    starts, lengths = spelling.starts, spelling.lengths
    ends = starts + lengths
    longest = int(lengths.max())
    base = np.uint64(0x100000001B3)
    prefix_hash = np.empty_like(codes)
    prefix_hash[starts] = codes[starts]
    rows = np.arange(n)
    for column in range(1, longest):
        rows = rows[lengths[rows] > column]
        at = starts[rows] + column
        prefix_hash[at] = prefix_hash[at - 1] * base + codes[at]
    full_hash = prefix_hash[ends - 1]
    by_hash = np.argsort(full_hash)
    sorted_hash = full_hash[by_hash]
    if np.any(sorted_hash[1:] == sorted_hash[:-1]):
        raise TokenizerError("two vocabulary tokens hash alike; metallic cannot index this file")
    powers = np.cumprod(np.full(longest, base, np.uint64))  # powers[m - 1] = base**m

    def token_with_hash(hashes: np.ndarray) -> np.ndarray:
        # Looking up sorted queries walks the table in order: several times faster than
        # scattered lookups on a vocabulary this size, even counting the sort.
        order = np.argsort(hashes)
        ordered = hashes[order]
        at = np.minimum(np.searchsorted(sorted_hash, ordered), n - 1)
        found = np.empty(len(hashes), np.int64)
        found[order] = np.where(sorted_hash[at] == ordered, by_hash[at], -1)
        return found

    not_last = np.ones(len(codes), bool)
    not_last[ends - 1] = False
    cut_at = np.flatnonzero(not_last)  # the last code point of each possible left piece
    cut_rows = np.repeat(np.arange(n), lengths - 1)
    left = token_with_hash(prefix_hash[cut_at])
    keep = left >= 0
    cut_at, cut_rows, left = cut_at[keep], cut_rows[keep], left[keep]
    left_lengths = cut_at - starts[cut_rows] + 1
    right_lengths = lengths[cut_rows] - left_lengths
    right = token_with_hash(full_hash[cut_rows] - prefix_hash[cut_at] * powers[right_lengths - 1])
    keep = right >= 0
    cut_rows, left, right = cut_rows[keep], left[keep], right[keep]
    left_lengths, right_lengths = left_lengths[keep], right_lengths[keep]
    keep = (lengths[left] == left_lengths) & (lengths[right] == right_lengths)
    keep &= _same_codes(spelling.codes, starts[cut_rows], starts[left], left_lengths)
    keep &= _same_codes(
        spelling.codes, starts[cut_rows] + left_lengths, starts[right], right_lengths
    )
    cut_rows, left, right, left_lengths = (
        cut_rows[keep],
        left[keep],
        right[keep],
        left_lengths[keep],
    )
    order = np.lexsort((left_lengths, cut_rows, -scores[cut_rows]))
    return np.stack((left[order], right[order]), axis=1).astype(np.int32)


def _same_codes(codes: np.ndarray, a: np.ndarray, b: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """For each i, whether ``codes[a[i]:][:lengths[i]] == codes[b[i]:][:lengths[i]]``."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    offset = np.arange(len(owner)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    differs = codes[a[owner] + offset] != codes[b[owner] + offset]
    return np.bincount(owner[differs], minlength=len(lengths)) == 0


def _word_start(spelling: _Spelling) -> str:
    """Regex for the U+2581 that starts a word no token reaches across, to split text there.

    A merge joins two symbols into a token, so no merge crosses a point between two characters
    that are adjacent in no token. Before U+2581 that holds unless the character before it is
    one of the few that precede U+2581 inside some token; splitting there is therefore exact, and
    it lets HF's BPE work word by word instead of on a whole text at once (much faster).
    """
    codes = spelling.codes
    mark = ord(SPACE_MARK)
    inside = np.ones(len(codes), bool)
    inside[spelling.starts] = False
    before_mark = inside[1:] & (codes[1:] == mark) & (codes[:-1] != mark)
    excluded = {mark, *np.unique(codes[:-1][before_mark]).tolist()}
    return "(?<=[^" + "".join(f"\\x{{{code:X}}}" for code in sorted(excluded)) + f"]){SPACE_MARK}"


def _bpe_backend(
    tokens: list[str], index: dict[str, int], merges: np.ndarray, pre: _PreTokenizer
) -> _HFTokenizer:
    """Byte-level BPE as llama.cpp runs it: pre-tokenizer regexes, byte mapping, ranked merges.

    A byte without a token is dropped, as llama.cpp drops it. It still separates its neighbours:
    llama.cpp keeps it as a symbol that no merge joins, so the text either side of it merges on
    its own. HF's BPE would silently join the neighbours, so the byte is cut out as a split.
    """
    pairs = _merge_texts(tokens, merges)
    backend = _HFTokenizer(models.BPE(index, pairs, ignore_merges=pre.ignore_merges))
    backend.pre_tokenizer = _bpe_pre_tokenizer(index, pre)
    return backend


def _bpe_pre_tokenizer(index: dict[str, int], pre: _PreTokenizer) -> Any:
    """The regexes, GPT-2's byte mapping, and the cutting out of bytes without a token."""
    missing = [char for char in _BYTE_CHARS if char not in index]
    steps = [pre_tokenizers.Split(Regex(regex), "isolated") for regex in pre.regexes]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    if missing:
        gaps = "[" + "".join(f"\\x{{{ord(char):X}}}" for char in missing) + "]"
        steps.append(pre_tokenizers.Split(Regex(gaps), "removed"))
    return pre_tokenizers.Sequence(steps)


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte value (index = byte)."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in kept}
    for extra, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + extra)
    return [chars[b] for b in range(256)]


_BYTE_CHARS = _byte_chars()
_BYTE_SET = frozenset(_BYTE_CHARS)
_BYTE_OF_CODE = np.full(max(map(ord, _BYTE_CHARS)) + 1, -1, np.int16)
_BYTE_OF_CODE[[ord(char) for char in _BYTE_CHARS]] = np.arange(256)


# -- token pieces (detokenizing) ------------------------------------------------------------------


def _pieces(kind: str, tokens: list[str], attrs: list[int], spelling: _Spelling) -> list[bytes]:
    """The bytes each token renders as (llama.cpp's token_to_piece with special tokens shown).

    Normal tokens are converted all at once in numpy: SentencePiece tokens with U+2581 as a
    space, byte-level tokens through GPT-2's byte table.
    """
    codes, starts = spelling.codes, spelling.starts
    if kind == "spm":
        codes = np.where(codes == ord(SPACE_MARK), ord(" "), codes)
        data = codes.astype("<u4").tobytes().decode("utf-32-le").encode()
        sizes = 1 + (codes >= 0x80).astype(np.int64) + (codes >= 0x800) + (codes >= 0x10000)
        foreign = np.zeros(len(tokens), bool)
    else:
        in_table = codes < len(_BYTE_OF_CODE)
        byte_of = np.where(in_table, _BYTE_OF_CODE[np.where(in_table, codes, 0)], -1)
        data = byte_of.astype(np.uint8).tobytes()
        sizes = np.ones(len(codes), np.int64)
        foreign = np.add.reduceat((byte_of < 0).astype(np.int64), starts) > 0
    ends = np.cumsum(np.add.reduceat(sizes, starts))
    begins = np.concatenate(([0], ends[:-1]))
    pieces = [data[a:b] for a, b in zip(begins.tolist(), ends.tolist(), strict=True)]
    flags = np.asarray(attrs, np.int64)
    plain = (flags & _NORMAL != 0) & (flags & _SPLIT_OUT == 0) & ~foreign  # done above
    for token_id in np.flatnonzero(~plain).tolist():
        attr = attrs[token_id]
        if attr & _SPLIT_OUT:
            pieces[token_id] = tokens[token_id].encode()
        elif attr & _NORMAL:
            if foreign[token_id]:
                pieces[token_id] = _foreign_piece(tokens[token_id])
        elif attr & _BYTE:
            pieces[token_id] = _byte_token_value(tokens[token_id])
        else:
            pieces[token_id] = b""  # unused or undefined tokens render as nothing
    return pieces


def _foreign_piece(text: str) -> bytes:
    """A byte-level token with characters outside GPT-2's table, marked as llama.cpp marks it."""
    return b"".join(
        bytes([int(_BYTE_OF_CODE[ord(char)])])
        if ord(char) < len(_BYTE_OF_CODE) and _BYTE_OF_CODE[ord(char)] >= 0
        else f"[UNK_BYTE_0x{char.encode().hex()}{text}]".encode()
        for char in text
    )


def _byte_token_value(text: str) -> bytes:
    """The byte of a ``<0xNN>`` token (llama.cpp reads the two characters after ``<0x``)."""
    try:
        return bytes([int(text[3:5], 16)])
    except ValueError:
        return b"\0"


# -- metadata -------------------------------------------------------------------------------------


def _tokens(metadata: Mapping[str, Any]) -> list[str]:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or set(map(type, tokens)) != {str}:
        raise TokenizerError("tokenizer.ggml.tokens is missing or not a list of strings")
    try:
        "".join(tokens).encode("utf-8")
    except UnicodeEncodeError:
        raise TokenizerError("tokenizer.ggml.tokens holds text that is not valid Unicode") from None
    # llama.cpp renames empty tokens so that every text is distinct
    return [text or f"[EMPTY_{i}]" for i, text in enumerate(tokens)]


def _index(tokens: list[str]) -> dict[str, int]:
    index = {text: i for i, text in enumerate(tokens)}
    if len(index) != len(tokens):
        seen: set[str] = set()
        duplicate = next(text for text in tokens if text in seen or seen.add(text))
        raise TokenizerError(f"tokenizer.ggml.tokens lists {duplicate!r} more than once")
    return index


def _scores(metadata: Mapping[str, Any], n: int) -> np.ndarray:
    values = metadata.get("tokenizer.ggml.scores")
    if not isinstance(values, list) or len(values) < n:
        raise TokenizerError(
            "tokenizer.ggml.scores is missing or shorter than the vocabulary"
            " (a SentencePiece vocabulary needs a score per token)"
        )
    try:
        return np.asarray(values[:n], np.float64)
    except (TypeError, ValueError):
        raise TokenizerError("tokenizer.ggml.scores holds values that are not numbers") from None


def _merges(metadata: Mapping[str, Any], index: dict[str, int]) -> np.ndarray:
    """The ranked merges of a byte-level vocabulary, ``"a b"`` each (``a`` never empty), as
    int32 [m, 2] token ids."""
    lines = metadata.get("tokenizer.ggml.merges")
    if not isinstance(lines, list) or not all(isinstance(line, str) for line in lines):
        raise TokenizerError("tokenizer.ggml.merges is missing or not a list of strings")
    merges: dict[tuple[int, int], None] = {}  # first rank wins, as in llama.cpp
    for line in lines:
        cut = line.find(" ", 1)
        if cut < 0:
            continue  # llama.cpp keeps this as an empty pair, which can never apply
        left, right = line[:cut], line[cut + 1 :]
        if left + right not in index:
            raise TokenizerError(
                f"merge {line!r} in tokenizer.ggml.merges makes a token not in the vocabulary"
            )
        if left in index and right in index:
            merges.setdefault((index[left], index[right]))
        elif {left, right} & _BYTE_SET - index.keys():
            # a byte without a token is still a symbol to llama.cpp, so this merge could apply
            raise TokenizerError(
                f"merge {line!r} in tokenizer.ggml.merges joins a byte that has no token"
            )
        # otherwise a part is neither a token nor a byte, so the pair never forms
    return np.array(list(merges), np.int32).reshape(-1, 2)


def _pre_tokenizer(metadata: Mapping[str, Any]) -> _PreTokenizer:
    name = metadata.get("tokenizer.ggml.pre", "default")  # llama.cpp's fallback when absent
    if name not in _PRE_TOKENIZERS:
        raise TokenizerError(
            f"unsupported pre-tokenizer tokenizer.ggml.pre={name!r} (supported: "
            + ", ".join(sorted(_PRE_TOKENIZERS))
            + ")"
        )
    return _PRE_TOKENIZERS[name]


def _flag(metadata: Mapping[str, Any], key: str, default: bool) -> bool:
    value = metadata.get(key, default)
    if not isinstance(value, bool):
        raise TokenizerError(f"{key} must be a boolean, not {value!r}")
    return value


def _special_id(metadata: Mapping[str, Any], key: str, n: int, default: int | None) -> int | None:
    """The id ``tokenizer.ggml.<key>`` names; like llama.cpp, an id outside the vocabulary is
    ignored with a warning, keeping the default."""
    if default is not None and not 0 <= default < n:
        default = None
    value = metadata.get(f"tokenizer.ggml.{key}")
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n:
        return value
    log.warning(
        "ignoring tokenizer.ggml.%s = %.60r: not a token id of the %d-token vocabulary (using %s)",
        key,
        value,
        n,
        default,
    )
    return default


def _adjust_attrs(
    metadata: Mapping[str, Any],
    tokens: list[str],
    index: dict[str, int],
    attrs: list[int],
    eos_id: int | None,
) -> frozenset[int]:
    """Apply llama.cpp's by-name attribute fixes (in place); return its end-of-generation set."""
    n = len(tokens)
    stops: set[int] = set()
    for key, old_key, names, ends_generation in _NAMED_ROLES:
        role_id = _special_id(metadata, key, n, None)
        if old_key:
            role_id = _special_id(metadata, old_key, n, role_id)
        if role_id is None:  # found by name instead, and then treated as a control token
            role_ids = [index[name] for name in names if name in index]
            for token_id in role_ids:
                attrs[token_id] |= _CONTROL
        else:
            role_ids = [role_id]
        if ends_generation:
            stops.update(role_ids)
    for text in _EOG_TEXTS & index.keys():
        stops.add(index[text])
        attrs[index[text]] |= _CONTROL
    for text in _ALWAYS_RENDERED:
        if text in index:
            attrs[index[text]] = _USER_DEFINED
    if eos_id is not None:
        stops.add(eos_id)
    stop_texts = {tokens[i] for i in stops}
    # gpt-oss and solar-open: <|end|> ends a message, not the generation
    ends_message = {"<|call|>", "<|calls|>"} & stop_texts and {
        "<|return|>",
        "<|flush|>",
    } & stop_texts
    if "<|end|>" in stop_texts and ends_message:
        stops.discard(index["<|end|>"])
        attrs[index["<|end|>"]] = _USER_DEFINED
    # gemma4 and plamo2: </s> is an ordinary token there
    if "</s>" in stop_texts and {"<|tool_response>", "<|plamo:eos|>"} & stop_texts:
        stops.discard(index["</s>"])
        attrs[index["</s>"]] = _NORMAL
    # Phi-3: special tokens swallow the whitespace after them
    name = str(metadata.get("general.name", "")).lower()
    if "phi-3" in name or "phi3" in name:
        for token_id, attr in enumerate(attrs):
            if attr & _SPLIT_OUT:
                attrs[token_id] |= _RSTRIP
        if "</s>" in index:
            attrs[index["</s>"]] |= _RSTRIP
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            if text in index:
                attrs[index[text]] &= ~_RSTRIP
    return frozenset(stops)
