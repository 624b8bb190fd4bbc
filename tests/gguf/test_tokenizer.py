"""The GGUF tokenizer against llama.cpp: its own test vectors, the default model, round trips.

llama.cpp is the reference throughout: ../shared/vocab holds its test strings and ids for five
vocabulary families, and tests/fixtures/tokenizer_gemma3.json holds its ids and detokenized text
for the default model (written by scripts/make_tokenizer_fixtures.py with llama-cpp-python).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from metallic.errors import MetallicError, TokenizerError
from metallic.gguf import tokenizer as tokenizer_module
from metallic.gguf.reader import open_gguf
from metallic.gguf.tokenizer import Tokenizer

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer_gemma3.json"
VOCABS = ("gpt-2", "llama-bpe", "llama-spm", "phi-3", "qwen2")
TEST_SEPARATOR = "\n__ggml_vocab_test__\n"

# From llama.cpp (llama-cpp-python 0.3.36) on the ../shared/vocab files: its end-of-generation
# set (llama_vocab_is_eog over all ids), BOS, EOS, and the add_bos / add_eos flags.
LLAMA_CPP_VOCAB_FACTS = {
    "gpt-2": ([50256], 50256, 50256, False, False),
    "llama-bpe": ([128001, 128009], 128000, 128001, True, False),
    "llama-spm": ([2], 1, 2, True, False),
    "phi-3": ([2, 32000, 32007], 1, 32000, True, False),
    "qwen2": ([128247, 151643, 151645], 151643, 151643, False, False),
}

ROUND_TRIP_TEXTS = [
    "Hello world",
    "  two leading spaces and two trailing  ",
    "line\nbreaks\n\n\tand tabs\r\n",
    "日本語、中文、한국어",
    "مرحبا بالعالم — שלום עולם",
    "emoji 🦙🔥👍🏽 🇫🇷 👨\u200d👩\u200d👧",
    "Café naïve Cafe\u0301",
    "def f(x):\n    return x ** 2  # comment\n",
    "numbers 3.14159 -42 1,000,000",
    "<table> and </s> as plain text",
]


@pytest.fixture(scope="module")
def vocab_tokenizer(vocab_dir: Path) -> Callable[[str], Tokenizer]:
    """Builds each ../shared/vocab tokenizer once per module."""
    cache: dict[str, Tokenizer] = {}

    def load(name: str) -> Tokenizer:
        if name not in cache:
            metadata = open_gguf(vocab_dir / f"ggml-vocab-{name}.gguf").metadata
            cache[name] = Tokenizer.from_metadata(metadata)
        return cache[name]

    return load


@pytest.fixture(scope="module")
def vocab_metadata(vocab_dir: Path) -> Callable[[str], dict[str, Any]]:
    def load(name: str) -> dict[str, Any]:
        return dict(open_gguf(vocab_dir / f"ggml-vocab-{name}.gguf").metadata)

    return load


@pytest.fixture(scope="module")
def gemma(default_model_path: Path) -> Tokenizer:
    return Tokenizer.from_metadata(open_gguf(default_model_path).metadata)


@pytest.fixture(scope="module")
def gemma_reference() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text(encoding="utf-8"))


def read_vocab_tests(vocab_dir: Path, name: str) -> list[tuple[str, list[int]]]:
    """The (text, ids) pairs of a vocab's .inp/.out files, split as llama.cpp's test does."""
    raw = (vocab_dir / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    texts = raw.split(TEST_SEPARATOR)
    if raw.endswith(TEST_SEPARATOR):
        texts.pop()
    lines = (vocab_dir / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(lines), f"{name}: {len(texts)} strings but {len(lines)} id lines"
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines, strict=True)]


# -- (1) llama.cpp's own test vectors -------------------------------------------------------------


def test_every_vocab_file_is_checked(vocab_dir: Path) -> None:
    found = {path.name.removeprefix("ggml-vocab-") for path in vocab_dir.glob("ggml-vocab-*.gguf")}
    assert found == {f"{name}.gguf" for name in VOCABS}


@pytest.mark.parametrize("name", VOCABS)
def test_vocab_matches_llama_cpp(
    name: str, vocab_dir: Path, vocab_tokenizer: Callable[[str], Tokenizer]
) -> None:
    tokenizer = vocab_tokenizer(name)
    cases = read_vocab_tests(vocab_dir, name)
    mismatches = []
    for number, (text, expected) in enumerate(cases):
        got = tokenizer.encode(text, add_special=False, parse_special=False)
        if got != expected:
            mismatches.append(f"#{number} {text!r}\n  llama.cpp {expected}\n  metallic  {got}")
    assert not mismatches, f"{len(mismatches)}/{len(cases)} differ:\n" + "\n".join(mismatches)


@pytest.mark.parametrize("name", VOCABS)
def test_vocab_round_trips(
    name: str, vocab_dir: Path, vocab_tokenizer: Callable[[str], Tokenizer]
) -> None:
    tokenizer = vocab_tokenizer(name)
    for text, _ in read_vocab_tests(vocab_dir, name):
        assert tokenizer.decode(tokenizer.encode(text, add_special=False)) == text
        with_special = tokenizer.encode(text, add_special=True)
        assert tokenizer.decode(with_special, skip_special=True) == text


@pytest.mark.parametrize("name", VOCABS)
def test_vocab_special_tokens_match_llama_cpp(
    name: str, vocab_tokenizer: Callable[[str], Tokenizer]
) -> None:
    tokenizer = vocab_tokenizer(name)
    stop_ids, bos_id, eos_id, add_bos, add_eos = LLAMA_CPP_VOCAB_FACTS[name]
    assert sorted(tokenizer.stop_ids) == stop_ids
    assert (tokenizer.bos_id, tokenizer.eos_id) == (bos_id, eos_id)
    assert (tokenizer.add_bos, tokenizer.add_eos) == (add_bos, add_eos)
    assert tokenizer.kind == ("spm" if name in ("llama-spm", "phi-3") else "bpe")
    ids = tokenizer.encode("Hi", add_special=True)
    assert (ids[0] == bos_id) == add_bos
    assert (ids[-1] == eos_id) == add_eos
    assert tokenizer.encode("Hi", add_special=False) == ids[add_bos : len(ids) - add_eos]


def test_phi3_special_tokens_swallow_following_whitespace(
    vocab_tokenizer: Callable[[str], Tokenizer],
) -> None:
    """llama.cpp strips the whitespace after Phi-3's special tokens it parses (ids from it)."""
    phi3 = vocab_tokenizer("phi-3")
    text = "<|user|>  \n Hi \n<|end|>"
    parsed = phi3.encode(text, add_special=False, parse_special=True)
    assert parsed == [32010, 6324, 29871, 13, 32007]
    assert phi3.encode(text, add_special=False, parse_special=False) == [
        529, 29989, 1792, 29989, 29958, 259, 13, 6324, 29871, 13, 29966, 29989, 355, 29989, 29958,
    ]  # fmt: skip
    chat = "<|user|>\nHello<|end|>\n<|assistant|>"
    assert phi3.encode(chat, add_special=False, parse_special=True) == [32010, 15043, 32007, 32001]


# -- (2) the default model against llama.cpp ------------------------------------------------------


def test_gemma_fixture_is_varied(gemma_reference: dict[str, Any]) -> None:
    texts = {case["text"] for case in gemma_reference["cases"]}
    assert len(texts) >= 40
    assert "" in texts
    flags = {(case["add_special"], case["parse_special"]) for case in gemma_reference["cases"]}
    assert len(flags) == 4


def assert_encodes_like_llama_cpp(tokenizer: Tokenizer, reference: dict[str, Any]) -> None:
    mismatches = []
    for case in reference["cases"]:
        got = tokenizer.encode(
            case["text"], add_special=case["add_special"], parse_special=case["parse_special"]
        )
        if got != case["ids"]:
            mismatches.append(
                f"{case['text']!r} add_special={case['add_special']} "
                f"parse_special={case['parse_special']}\n"
                f"  llama.cpp {case['ids']}\n  metallic  {got}"
            )
    assert not mismatches, f"{len(mismatches)} cases differ:\n" + "\n".join(mismatches)


def assert_decodes_like_llama_cpp(tokenizer: Tokenizer, reference: dict[str, Any]) -> None:
    for case in reference["cases"]:
        assert tokenizer.decode(case["ids"]) == case["decoded"], case["text"]
        plain = tokenizer.decode(case["ids"], skip_special=True)
        assert plain == case["decoded_plain"], case["text"]


def assert_vocabulary_like_llama_cpp(tokenizer: Tokenizer, reference: dict[str, Any]) -> None:
    assert tokenizer.vocab_size == reference["vocab_size"]
    assert (tokenizer.bos_id, tokenizer.eos_id) == (reference["bos_id"], reference["eos_id"])
    assert (tokenizer.add_bos, tokenizer.add_eos) == (reference["add_bos"], reference["add_eos"])
    assert sorted(tokenizer.stop_ids) == reference["eog_ids"]
    control = [i for first, end in reference["control_ranges"] for i in range(first, end)]
    assert [i for i in range(tokenizer.vocab_size) if tokenizer.is_control(i)] == control
    pieces = {int(i): bytes.fromhex(piece) for i, piece in reference["pieces"].items()}
    assert {i: tokenizer.token_bytes(i) for i in pieces} == pieces


def test_gemma_encodes_like_llama_cpp(gemma: Tokenizer, gemma_reference: dict[str, Any]) -> None:
    assert_encodes_like_llama_cpp(gemma, gemma_reference)


def test_gemma_decodes_like_llama_cpp(gemma: Tokenizer, gemma_reference: dict[str, Any]) -> None:
    assert_decodes_like_llama_cpp(gemma, gemma_reference)


def test_gemma_vocabulary_matches_llama_cpp(
    gemma: Tokenizer, gemma_reference: dict[str, Any]
) -> None:
    assert gemma.vocab_size == 262144 and gemma.kind == "spm"
    assert_vocabulary_like_llama_cpp(gemma, gemma_reference)


def test_gemma_chat_turn_uses_single_special_tokens(gemma: Tokenizer) -> None:
    turn = "<start_of_turn>user\nHi<end_of_turn>\n"
    ids = gemma.encode(turn, add_special=True, parse_special=True)
    start, end = (
        gemma.encode("<start_of_turn>", False, True),
        gemma.encode("<end_of_turn>", False, True),
    )
    assert len(start) == len(end) == 1
    assert ids[0] == gemma.bos_id and ids[1] == start[0] and end[0] in ids
    assert end[0] in gemma.stop_ids and gemma.eos_id in gemma.stop_ids
    assert len(gemma.encode(turn, add_special=True, parse_special=False)) > len(ids)


@pytest.mark.parametrize("short_text", [0, 10**9], ids=["hf-bpe", "python"])
def test_both_encoders_match_llama_cpp(
    short_text: int,
    monkeypatch: pytest.MonkeyPatch,
    vocab_dir: Path,
    default_model_path: Path,
    gemma_reference: dict[str, Any],
    chat_model_path: Path,
    smollm2_reference: dict[str, Any],
) -> None:
    """Short texts are merged in Python, longer ones by HF's BPE: each encoder alone gives
    llama.cpp's ids for every reference text (fresh tokenizers: once built, HF's BPE serves
    every text)."""
    monkeypatch.setattr(tokenizer_module, "SHORT_TEXT", short_text)
    for path, reference in [
        (default_model_path, gemma_reference),
        (chat_model_path, smollm2_reference),
    ]:
        tokenizer = Tokenizer.from_metadata(open_gguf(path).metadata)
        assert_encodes_like_llama_cpp(tokenizer, reference)
        assert (tokenizer._backend is None) == (short_text > 0)
    for name in VOCABS:
        tokenizer = Tokenizer.from_metadata(
            open_gguf(vocab_dir / f"ggml-vocab-{name}.gguf").metadata
        )
        for text, expected in read_vocab_tests(vocab_dir, name):
            assert tokenizer.encode(text, add_special=False) == expected, (name, text)


def test_a_long_text_builds_the_backend_and_encodes_alike(default_model_path: Path) -> None:
    metadata = open_gguf(default_model_path).metadata
    short, long = Tokenizer.from_metadata(metadata), Tokenizer.from_metadata(metadata)
    text = "The capital of France is Paris; déjà vu 🦙 " * 50
    assert len(text) < tokenizer_module.SHORT_TEXT < len(text * 8)
    expected = short.encode(text)
    assert short._backend is None
    long.encode(text * 8)
    assert long._backend is not None
    assert long.encode(text) == expected


# -- (3) round trips, bytes and errors ------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_gemma_round_trips(gemma: Tokenizer, text: str) -> None:
    assert gemma.decode(gemma.encode(text, add_special=False)) == text
    assert gemma.decode(gemma.encode(text), skip_special=True) == text
    assert gemma.decode(gemma.encode(text)) == "<bos>" + text


@pytest.mark.parametrize("name", ["gemma", *VOCABS])
def test_token_bytes_join_to_the_text(
    name: str, gemma: Tokenizer, vocab_tokenizer: Callable[[str], Tokenizer]
) -> None:
    """Byte-fallback and byte-level tokens cut characters; their bytes still join to the text."""
    tokenizer = gemma if name == "gemma" else vocab_tokenizer(name)
    text = "rare 𝔘𝔫𝔦 emoji 🦙🔥 and 中文 and Café"
    ids = tokenizer.encode(text, add_special=False)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    assert tokenizer.decode(ids) == text
    prefixed = name in ("llama-spm", "phi-3")  # their first token carries the added space
    assert b"".join(pieces).decode() == (" " + text if prefixed else text)
    cut = tokenizer.encode("𝔘", add_special=False)
    assert len(cut) > 1  # not one token: its pieces are partial UTF-8
    with pytest.raises(UnicodeDecodeError):
        tokenizer.token_bytes(cut[-1]).decode()


def test_space_prefix_is_dropped_once(vocab_tokenizer: Callable[[str], Tokenizer]) -> None:
    llama = vocab_tokenizer("llama-spm")
    ids = llama.encode(" Hello", add_special=False)
    assert llama.token_bytes(ids[0]).startswith(b" ")  # the prefixed space lives in a token
    assert llama.decode(ids) == " Hello"
    assert llama.decode(llama.encode(" Hello"), skip_special=True) == " Hello"
    assert llama.decode(llama.encode(" Hello")) == "<s>  Hello"


def test_overlapping_special_tokens_are_cut_longest_first() -> None:
    """llama.cpp cuts the longest special token first, even when a shorter one starts earlier."""
    metadata = _tiny_spm(user_defined=["ab", "bcd"])
    tokenizer = Tokenizer.from_metadata(metadata)
    ids = tokenizer.encode("xabcd", add_special=False)
    tokens = metadata["tokenizer.ggml.tokens"]
    assert [tokens[i] for i in ids] == ["x", "a", "bcd"]
    assert tokenizer.decode(ids) == "xabcd"


def test_default_pre_tokenizer_matches_llama_cpp(
    vocab_metadata: Callable[[str], dict[str, Any]],
) -> None:
    """A byte-level file without tokenizer.ggml.pre gets llama.cpp's "default" regexes.

    Ids from llama.cpp for the gpt-2 vocabulary with the pre-tokenizer name removed or set to
    "default" (the same for both), and with its own "gpt-2" for contrast.
    """
    text = "Price: $1234567.89 (x+y<=z) ...done"
    metadata = vocab_metadata("gpt-2")
    del metadata["tokenizer.ggml.pre"]
    default = [18124, 25, 220, 3, 10163, 29228, 22, 13, 4531, 220, 7, 87, 10, 88, 27, 28, 89, 8]
    default += [220, 986, 28060]
    assert Tokenizer.from_metadata(metadata).encode(text, add_special=False) == default
    metadata["tokenizer.ggml.pre"] = "gpt-2"
    gpt2 = [18124, 25, 720, 10163, 2231, 3134, 13, 4531, 357, 87, 10, 88, 27, 28, 89, 8, 2644]
    assert Tokenizer.from_metadata(metadata).encode(text, add_special=False) == [*gpt2, 28060]


def test_unknown_pre_tokenizer_is_refused(vocab_metadata: Callable[[str], dict[str, Any]]) -> None:
    metadata = vocab_metadata("gpt-2")
    metadata["tokenizer.ggml.pre"] = "made-up-pre"
    with pytest.raises(TokenizerError, match="made-up-pre") as err:
        Tokenizer.from_metadata(metadata)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("model", ["bert", "t5", "rwkv", None])
def test_unknown_model_is_refused(
    vocab_metadata: Callable[[str], dict[str, Any]], model: str | None
) -> None:
    metadata = vocab_metadata("llama-spm")
    metadata["tokenizer.ggml.model"] = model
    with pytest.raises(TokenizerError, match=f"tokenizer.ggml.model {model!r}"):
        Tokenizer.from_metadata(metadata)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("tokenizer.ggml.tokens", None, "tokenizer.ggml.tokens"),
        ("tokenizer.ggml.tokens", ["a", "a"], "more than once"),
        ("tokenizer.ggml.scores", None, "tokenizer.ggml.scores"),
        ("tokenizer.ggml.scores", [0.0], "tokenizer.ggml.scores"),
        ("tokenizer.ggml.token_type", "normal", "tokenizer.ggml.token_type"),
        ("tokenizer.ggml.add_bos_token", "yes", "add_bos_token"),
    ],
)
def test_bad_spm_metadata_is_refused(key: str, value: Any, message: str) -> None:
    metadata = _tiny_spm()
    metadata[key] = value
    with pytest.raises(TokenizerError, match=message) as err:
        Tokenizer.from_metadata(metadata)
    assert isinstance(err.value, MetallicError) and "\n" not in str(err.value)


@pytest.mark.parametrize("value", [2**32 - 1, 265, -1, "2", 2.0, True])
def test_special_ids_outside_the_vocabulary_are_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture, value: Any
) -> None:
    """As llama.cpp does: a bad id keeps the default (EOS 2 for SentencePiece) and warns."""
    metadata = _tiny_spm()  # 265 tokens
    metadata["tokenizer.ggml.eos_token_id"] = value
    with caplog.at_level("WARNING", logger="metallic"):
        tokenizer = Tokenizer.from_metadata(metadata)
    assert tokenizer.eos_id == 2 and 2 in tokenizer.stop_ids
    assert f"ignoring tokenizer.ggml.eos_token_id = {value!r}" in caplog.text
    assert "265-token vocabulary (using 2)" in caplog.text


def test_valid_special_ids_are_used_silently(caplog: pytest.LogCaptureFixture) -> None:
    metadata = _tiny_spm()
    metadata["tokenizer.ggml.eos_token_id"] = 264
    with caplog.at_level("WARNING", logger="metallic"):
        assert Tokenizer.from_metadata(metadata).eos_id == 264
    assert not caplog.records


def test_bad_merges_are_refused(vocab_metadata: Callable[[str], dict[str, Any]]) -> None:
    metadata = vocab_metadata("gpt-2")
    metadata["tokenizer.ggml.merges"] = [*metadata["tokenizer.ggml.merges"][:10], "zq xj"]
    with pytest.raises(TokenizerError, match="zq xj"):
        Tokenizer.from_metadata(metadata)


def test_bad_calls_raise_tokenizer_errors(gemma: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        gemma.decode([1, gemma.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        gemma.token_bytes(-1)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        gemma.is_control(10**9)
    with pytest.raises(TokenizerError, match="bytes"):
        gemma.encode(b"not text")  # type: ignore[arg-type]
    with pytest.raises(TokenizerError, match="surrogate"):
        gemma.encode("broken \ud800 text")
    assert gemma.encode("", add_special=False) == []
    assert gemma.encode("") == [gemma.bos_id]
    assert gemma.decode([]) == ""


def _tiny_spm(user_defined: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """A minimal SentencePiece vocabulary: specials, byte tokens, letters, user-defined tokens."""
    letters = ["▁", *"abcdx"]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *letters]
    tokens += user_defined
    types = [2, 3, 3] + [6] * 256 + [1] * len(letters) + [4] * len(user_defined)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [-float(i) for i in range(len(tokens))],
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": False,
    }


# -- (4) SmolLM2: the starcoder split and a vocabulary without some byte tokens (issue 15) --------

SMOLLM2_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tokenizer_smollm2.json"
SMOLLM2_MISSING_BYTES = [4, 6, 19, 20, 22, 29, 192, 193, 241, 242, *range(245, 256)]


@pytest.fixture(scope="module")
def smollm2_metadata(chat_model_path: Path) -> dict[str, Any]:
    return dict(open_gguf(chat_model_path).metadata)


@pytest.fixture(scope="module")
def smollm2(smollm2_metadata: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_metadata(smollm2_metadata)


@pytest.fixture(scope="module")
def smollm2_reference() -> dict[str, Any]:
    return json.loads(SMOLLM2_FIXTURE.read_text(encoding="utf-8"))


def test_smollm2_vocabulary_lacks_byte_tokens(smollm2_metadata: dict[str, Any]) -> None:
    """The case the fixture is for: 21 of the 256 byte-level tokens are missing."""
    from metallic.gguf.tokenizer import _BYTE_CHARS

    tokens = set(smollm2_metadata["tokenizer.ggml.tokens"])
    missing = [b for b, char in enumerate(_BYTE_CHARS) if char not in tokens]
    assert missing == SMOLLM2_MISSING_BYTES
    assert smollm2_metadata["tokenizer.ggml.pre"] == "smollm"


def test_smollm2_encodes_like_llama_cpp(
    smollm2: Tokenizer, smollm2_reference: dict[str, Any]
) -> None:
    assert any("\x04" in case["text"] for case in smollm2_reference["cases"])
    assert_encodes_like_llama_cpp(smollm2, smollm2_reference)


def test_smollm2_decodes_like_llama_cpp(
    smollm2: Tokenizer, smollm2_reference: dict[str, Any]
) -> None:
    assert_decodes_like_llama_cpp(smollm2, smollm2_reference)


def test_smollm2_vocabulary_matches_llama_cpp(
    smollm2: Tokenizer, smollm2_reference: dict[str, Any]
) -> None:
    assert smollm2.vocab_size == 49152 and smollm2.kind == "bpe"
    assert_vocabulary_like_llama_cpp(smollm2, smollm2_reference)


@pytest.mark.parametrize(
    "name", ["starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"]
)
def test_starcoder_family_splits_like_smollm(
    smollm2: Tokenizer, smollm2_metadata: dict[str, Any], name: str
) -> None:
    """llama.cpp gives these names the same regexes as smollm (digits one by one, then GPT-2's
    split); they differ only in the detokenizer's space clean-up, which metallic never does."""
    metadata = {**smollm2_metadata, "tokenizer.ggml.pre": name}
    text = "Price: $1234567.89 in 2024, isn't it? 3 apples"
    ids = Tokenizer.from_metadata(metadata).encode(text, add_special=False)
    assert ids == smollm2.encode(text, add_special=False)
    digits = [smollm2.decode([i]) for i in ids if smollm2.decode([i]).strip().isdigit()]
    assert all(len(piece.strip()) == 1 for piece in digits)


def _byte_level_vocab(
    missing: str = "", merges: tuple[str, ...] = ("a b",), pre: str = "smollm"
) -> dict[str, Any]:
    from metallic.gguf.tokenizer import _BYTE_CHARS

    byte_tokens = [char for char in _BYTE_CHARS if char not in missing]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [*byte_tokens, "ab"],
        "tokenizer.ggml.merges": list(merges),
    }


def test_a_byte_without_a_token_is_dropped_and_still_separates() -> None:
    """As llama.cpp: the byte leaves no token, and the text either side merges on its own (no
    "ab" across it; HF's BPE alone would join them)."""
    metadata = _byte_level_vocab(missing="\u0104")  # GPT-2's stand-in for the byte 0x04
    tokenizer = Tokenizer.from_metadata(metadata)
    tokens = metadata["tokenizer.ggml.tokens"]
    ab, a, b = tokens.index("ab"), tokens.index("a"), tokens.index("b")
    assert tokenizer.encode("ab") == [ab]
    assert tokenizer.encode("a\x04b") == [a, b]
    assert tokenizer.encode("\x04\x04") == []
    assert tokenizer.encode("ab\x04ab") == [ab, ab]
    assert tokenizer.decode(tokenizer.encode("x\x04y")) == "xy"


def test_a_merge_that_joins_a_byte_without_a_token_is_refused() -> None:
    metadata = _byte_level_vocab(missing="\u0104", merges=("a b", "\u0104 a"))
    metadata["tokenizer.ggml.tokens"].append("\u0104a")
    with pytest.raises(TokenizerError, match="joins a byte that has no token"):
        Tokenizer.from_metadata(metadata)
