"""Streaming detokenization (whole characters only) and stop-string matching across pieces."""

from __future__ import annotations

import random

import pytest

from metallic.engine.detokenizer import StopMatcher, StreamingDetokenizer
from metallic.engine.sampling import SamplingError

EOS = 300


class FakeTokenizer:
    """Ids 0-255 are byte-fallback tokens; higher ids are listed pieces; EOS is a control token."""

    def __init__(self, pieces: dict[int, bytes]) -> None:
        self.pieces = {**{byte: bytes([byte]) for byte in range(256)}, **pieces, EOS: b"<eos>"}

    def token_bytes(self, token_id: int) -> bytes:
        return self.pieces[token_id]

    def is_control(self, token_id: int) -> bool:
        return token_id == EOS


def stream(tokenizer: FakeTokenizer, ids: list[int], **options: bool) -> list[str]:
    """Pieces emitted for each id, then the flush."""
    detokenizer = StreamingDetokenizer(tokenizer, **options)
    return [detokenizer.push(token) for token in ids] + [detokenizer.flush()]


def test_emoji_from_four_byte_tokens_appears_only_when_complete() -> None:
    tokenizer = FakeTokenizer({256: b"Hi "})
    emoji = "😀".encode()
    pieces = stream(tokenizer, [256, *emoji, 256])
    assert pieces == ["Hi ", "", "", "", "😀", "Hi ", ""]


def test_cjk_split_inside_characters_by_multi_byte_tokens() -> None:
    data = "中文字".encode()  # 9 bytes; tokens cut after bytes 2, 4 and 8
    tokenizer = FakeTokenizer({256: data[:2], 257: data[2:4], 258: data[4:8], 259: data[8:]})
    assert stream(tokenizer, [256, 257, 258, 259]) == ["", "中", "文", "字", ""]


def test_random_mixed_script_text_survives_any_byte_split() -> None:
    rng = random.Random(0)
    alphabet = "ab é中文😀🇫🇷\nñ"
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30)))
        data = text.encode()
        cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(0, 8))))
        chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
        tokenizer = FakeTokenizer({256 + i: chunk for i, chunk in enumerate(chunks)})
        pieces = stream(tokenizer, [256 + i for i in range(len(chunks))])
        assert "".join(pieces) == text
        assert all("\ufffd" not in piece for piece in pieces)


def test_control_tokens_are_skipped_unless_asked_for() -> None:
    tokenizer = FakeTokenizer({256: b"done"})
    assert stream(tokenizer, [256, EOS]) == ["done", "", ""]
    assert stream(tokenizer, [256, EOS], skip_special=False) == ["done", "<eos>", ""]


def test_control_token_inside_a_split_character_does_not_break_it() -> None:
    data = "é".encode()
    assert stream(FakeTokenizer({}), [data[0], EOS, data[1]]) == ["", "", "é", ""]


def test_invalid_and_truncated_bytes_become_replacement_characters() -> None:
    tokenizer = FakeTokenizer({256: b"ok"})
    assert stream(tokenizer, [256, 0xFF, 256]) == ["ok", "\ufffd", "ok", ""]
    assert stream(tokenizer, [256, 0xE4, 0xB8]) == ["ok", "", "", "\ufffd"]
    # a lead byte followed by a non-continuation byte: the lead is replaced, the rest survives
    assert "".join(stream(tokenizer, [0xE4, 256])) == "\ufffdok"


def test_flush_resets_for_a_new_stream() -> None:
    detokenizer = StreamingDetokenizer(FakeTokenizer({}))
    detokenizer.push(0xF0)
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.push(ord("x")) == "x"


def match_stream(stops: list[str], pieces: list[str]) -> tuple[list[str], StopMatcher]:
    matcher = StopMatcher(stops)
    emitted = [matcher.push(piece) for piece in pieces]
    emitted.append(matcher.flush())
    return emitted, matcher


def test_no_stop_passes_everything_through() -> None:
    emitted, matcher = match_stream([], ["Hello", " world", ""])
    assert emitted == ["Hello", " world", "", ""]
    assert not matcher.stopped


def test_stop_spanning_pieces_is_held_then_dropped() -> None:
    emitted, matcher = match_stream(["</s>"], ["Hello <", "/", "s> and more", "after"])
    assert emitted == ["Hello ", "", "", "", ""]
    assert matcher.stop == "</s>"


def test_held_tail_is_released_when_it_is_not_a_stop() -> None:
    emitted, matcher = match_stream(["\n\n"], ["a\n", "b\n", "\n", "c"])
    assert emitted == ["a", "\nb", "", "", ""]
    assert matcher.stop == "\n\n"
    emitted, matcher = match_stream(["END"], ["x E", "N"])
    assert emitted == ["x ", "", "EN"]  # the end of generation releases the held "EN"
    assert not matcher.stopped


def test_overlapping_stop_prefixes() -> None:
    # "abcd" and "bce" share "bc"; the second completes first, the text stops before its start
    emitted, matcher = match_stream(["abcd", "bce"], ["xab", "c", "e", "d"])
    assert emitted == ["x", "", "a", "", ""]
    assert matcher.stop == "bce"
    # a stop whose start repeats: "aaab" must stop after the first "a"
    emitted, matcher = match_stream(["aab"], ["a", "a", "a", "b"])
    assert "".join(emitted) == "a"
    assert matcher.stop == "aab"


def test_first_completed_stop_wins_however_the_text_was_cut() -> None:
    # "ab" completes before "aabb" although "aabb" starts earlier
    for pieces in (["aabb"], ["aab", "b"], ["a", "a", "b", "b"]):
        emitted, matcher = match_stream(["aabb", "ab"], pieces)
        assert "".join(emitted) == "a"
        assert matcher.stop == "ab"
    # two stops ending on the same character: the longer one (earlier start) wins
    emitted, matcher = match_stream(["world", "o world"], ["hello world!"])
    assert emitted == ["hell", ""]
    assert matcher.stop == "o world"


def test_stop_matcher_agrees_with_searching_the_whole_text() -> None:
    rng = random.Random(1)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(2)]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, 5)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        emitted, matcher = match_stream(stops, pieces)
        # the first stop to be completed, reading one character at a time
        hits = sorted(
            (text.find(stop) + len(stop), text.find(stop)) for stop in stops if stop in text
        )
        assert "".join(emitted) == (text[: hits[0][1]] if hits else text)
        assert matcher.stopped == bool(hits)


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(SamplingError, match="non-empty"):
        StopMatcher(["ok", ""])
