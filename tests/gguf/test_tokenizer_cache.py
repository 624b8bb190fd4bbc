"""The on-disk cache of a tokenizer's derived tables (gguf/tokenizer_cache.py): a cached build
tokenizes exactly as a fresh one, another vocabulary never reads the entry, and a damaged entry is
rebuilt silently."""

from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from metallic.gguf import tokenizer as tokenizer_module
from metallic.gguf import tokenizer_cache
from metallic.gguf.reader import open_gguf
from metallic.gguf.tokenizer import Tokenizer

TEXTS = [
    "Hello world! The capital of France is Paris.",
    "  leading spaces, tabs\tand\nnew lines\n\n",
    "emoji 🦙🔥 Café naïve 3.14159 -42 1,000,000 مرحبا",
    "<s> and </s> as plain text",
]


def _metadata(vocab_dir: Path, name: str) -> dict[str, Any]:
    return dict(open_gguf(vocab_dir / f"ggml-vocab-{name}.gguf").metadata)


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.npz"))


def _same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    for text in TEXTS:
        for parse_special in (False, True):
            assert a.encode(text, parse_special=parse_special) == b.encode(
                text, parse_special=parse_special
            )
    ids = list(range(0, a.vocab_size, 97))
    assert a.decode(ids) == b.decode(ids)
    assert a.stop_ids == b.stop_ids


def _no_derivation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make deriving merges or overlaps fail: a build must then take them from the cache."""

    def refuse(*_: Any) -> Any:
        raise AssertionError("derived again instead of read from the cache")

    for name in ("_spm_merges", "_merges", "_overlapping"):
        monkeypatch.setattr(tokenizer_module, name, refuse)


@pytest.mark.parametrize("name", ["llama-spm", "llama-bpe"])
def test_a_cached_build_tokenizes_as_a_fresh_one(
    vocab_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    metadata = _metadata(vocab_dir, name)
    fresh = Tokenizer.from_metadata(metadata)
    assert _entries(tmp_path) == []
    stored = Tokenizer.from_metadata(metadata, tmp_path)
    assert len(_entries(tmp_path)) == 1
    assert list(tmp_path.glob(".*")) == []  # no temporary file left behind
    _no_derivation(monkeypatch)
    cached = Tokenizer.from_metadata(metadata, tmp_path)
    _same_tokenizer(fresh, stored)
    _same_tokenizer(fresh, cached)


@pytest.mark.parametrize(
    ("name", "key", "change"),
    [
        ("llama-spm", "tokenizer.ggml.scores", lambda v: [v[0] + 1.0, *v[1:]]),
        ("llama-spm", "tokenizer.ggml.tokens", lambda v: [*v[:-1], v[-1] + "x"]),
        ("llama-spm", "tokenizer.ggml.token_type", lambda v: [*v[:-1], 4]),
        ("llama-bpe", "tokenizer.ggml.merges", lambda v: v[1:]),
        ("llama-bpe", "tokenizer.ggml.pre", lambda v: "gpt-2"),
        ("llama-bpe", "general.name", lambda v: "phi-3"),
    ],
)
def test_other_metadata_never_reads_the_entry(
    vocab_dir: Path, tmp_path: Path, name: str, key: str, change: Any
) -> None:
    metadata = _metadata(vocab_dir, name)
    Tokenizer.from_metadata(metadata, tmp_path)
    changed = {**metadata, key: change(metadata.get(key))}
    code = tokenizer_module._derivation_code()
    assert tokenizer_cache.fingerprint(changed, code) != tokenizer_cache.fingerprint(metadata, code)
    rebuilt = Tokenizer.from_metadata(changed, tmp_path)
    assert len(_entries(tmp_path)) == 2
    _same_tokenizer(rebuilt, Tokenizer.from_metadata(changed))


def test_values_of_other_types_fingerprint_otherwise() -> None:
    base = {"tokenizer.ggml.scores": [1.0, 2.0], "tokenizer.ggml.add_bos_token": True}
    others = [
        {**base, "tokenizer.ggml.scores": [1, 2]},
        {**base, "tokenizer.ggml.add_bos_token": 1},
        {**base, "tokenizer.ggml.tokens": ["a\0", "b"]},
        {**base, "tokenizer.ggml.tokens": ["a", "\0b"]},
        {**base, "unrelated.key": 1},  # not read by a build: the same entry
    ]
    prints = [tokenizer_cache.fingerprint(m, b"code") for m in [base, *others]]
    assert len(set(prints[:-1])) == len(prints) - 1
    assert prints[-1] == prints[0]
    assert tokenizer_cache.fingerprint(base, b"other code") != prints[0]


def _damage_truncate(path: Path, _: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage_garbage(path: Path, _: Path) -> None:
    path.write_bytes(b"not a zip file at all")


def _damage_flip_byte(path: Path, _: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the merges: the zip's CRC no longer matches
    path.write_bytes(bytes(data))


def _damage_ids_out_of_range(path: Path, _: Path) -> None:
    with np.load(path) as entry:
        arrays = dict(entry)
    arrays["merges"] = arrays["merges"] + 10**6
    with path.open("wb") as file:
        np.savez(file, **arrays)


def _damage_other_entry(path: Path, other: Path) -> None:
    path.write_bytes(other.read_bytes())  # a sound entry of another vocabulary, renamed


@pytest.mark.parametrize(
    "damage",
    [
        _damage_truncate,
        _damage_garbage,
        _damage_flip_byte,
        _damage_ids_out_of_range,
        _damage_other_entry,
    ],
)
def test_a_damaged_entry_is_rebuilt_silently(
    vocab_dir: Path, tmp_path: Path, damage: Any, caplog: pytest.LogCaptureFixture
) -> None:
    other_folder = tmp_path / "other"
    Tokenizer.from_metadata(_metadata(vocab_dir, "llama-bpe"), other_folder)
    metadata = _metadata(vocab_dir, "llama-spm")
    folder = tmp_path / "cache"
    Tokenizer.from_metadata(metadata, folder)
    (entry,) = _entries(folder)
    damage(entry, _entries(other_folder)[0])
    assert tokenizer_cache.load(folder, entry.stem, 32000) is None
    rebuilt = Tokenizer.from_metadata(metadata, folder)
    _same_tokenizer(rebuilt, Tokenizer.from_metadata(metadata))
    assert tokenizer_cache.load(folder, entry.stem, rebuilt.vocab_size) is not None  # rewritten
    assert not caplog.records


def test_an_unwritable_folder_only_costs_the_cache(vocab_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("")
    metadata = _metadata(vocab_dir, "llama-spm")
    built = Tokenizer.from_metadata(metadata, blocker / "tokenizers")  # cannot be a folder
    _same_tokenizer(built, Tokenizer.from_metadata(metadata))


def test_an_entry_is_a_plain_zip_of_arrays(vocab_dir: Path, tmp_path: Path) -> None:
    """No pickles: loading an entry never runs code from the cache folder."""
    Tokenizer.from_metadata(_metadata(vocab_dir, "llama-bpe"), tmp_path)
    (entry,) = _entries(tmp_path)
    with zipfile.ZipFile(entry) as archive:
        assert sorted(archive.namelist()) == ["key.npy", "merges.npy", "overlaps.npy"]
    with np.load(entry, allow_pickle=False) as arrays:
        assert arrays["merges"].dtype == np.int32


def test_no_damage_to_an_entry_raises_or_passes_for_its_tables(tmp_path: Path) -> None:
    """Random byte flips, cuts and insertions: `load` gives the stored tables or None."""
    tables = tokenizer_cache.DerivedTables(
        np.arange(2000, dtype=np.int32).reshape(-1, 2) % 50, (False, True)
    )
    tokenizer_cache.store(tmp_path, "key", tables)
    path = tokenizer_cache.entry_path(tmp_path, "key")
    sound = path.read_bytes()
    rng = random.Random(0)
    for trial in range(3000):
        data = bytearray(sound)
        if trial % 3 == 0:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif trial % 3 == 1:
            del data[rng.randrange(len(data)) :]
        else:
            at = rng.randrange(len(data))
            data[at:at] = rng.randbytes(rng.randint(1, 9))
        path.write_bytes(bytes(data))
        loaded = tokenizer_cache.load(tmp_path, "key", 50)
        if loaded is not None:  # the damage missed what is read (a timestamp, say)
            assert np.array_equal(loaded.merges, tables.merges)
            assert loaded.overlaps == tables.overlaps


def test_the_folder_keeps_only_the_most_recently_used_entries(tmp_path: Path) -> None:
    """Each version and vocabulary adds an entry; past MAX_ENTRIES the least recently used go,
    and reading an entry counts as using it."""
    tables = tokenizer_cache.DerivedTables(np.zeros((1, 2), np.int32), (False, False))
    keys = [f"{i:064x}" for i in range(tokenizer_cache.MAX_ENTRIES + 3)]
    for age, key in enumerate(keys):
        tokenizer_cache.store(tmp_path, key, tables)
        old = 1_000_000 + age  # distinct times, oldest first, whatever the clock's resolution
        os.utime(tokenizer_cache.entry_path(tmp_path, key), (old, old))
    assert tokenizer_cache.load(tmp_path, keys[3], vocab_size=1) is not None  # used now
    tokenizer_cache.store(tmp_path, "f" * 64, tables)
    kept = {p.stem for p in tmp_path.glob("*.npz")}
    assert len(kept) == tokenizer_cache.MAX_ENTRIES
    assert keys[3] in kept and "f" * 64 in kept
    assert not kept & set(keys[:3] + keys[4:5])  # the least recently used went first
