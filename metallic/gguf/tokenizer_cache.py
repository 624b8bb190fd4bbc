"""The tables a tokenizer derives from GGUF metadata, kept on disk for later loads to read back.

Deriving the merges of a vocabulary is most of a tokenizer's build: every cut of each of Gemma 3's
262,144 tokens into two tokens (0.4 s), or the validation of Llama 3's 280,147 merge lines (0.4 s).
Loading them back as token-id pairs takes milliseconds.

An entry is named by a sha256 of everything the derivation reads, by value (every ``tokenizer.*``
key and ``general.name``), and of the code that derives it (`fingerprint`'s ``code``), so another
file, or another metallic, never reads a stale entry. It is written to a temporary file, flushed
and renamed into place, so its name never shows a partial entry; an entry that cannot be read or
does not hold what it should (a damaged disk, a hand edit) is ignored, and the caller derives
the tables again and writes the entry anew.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from metallic.gguf.cache import cache_dir

FOLDER = "tokenizers"  # under metallic's cache folder
FORMAT = b"metallic tokenizer tables 1"  # bump when the entry's layout changes
# Entries kept: the most recently used. Each metallic version and tokenizer makes its own (about
# 4 MB for Gemma 3), so without a bound the folder would only grow.
MAX_ENTRIES = 16


@dataclass(frozen=True)
class DerivedTables:
    """What a build derives at length: its merges, and whether special-token texts overlap."""

    merges: np.ndarray  # int32 [m, 2]: the (left, right) token ids of each merge, by rank
    overlaps: tuple[bool, bool]  # of the user-defined texts; of all special texts


def default_folder() -> Path:
    """Where metallic keeps tokenizer tables: in its cache folder (see `cache_dir`)."""
    return cache_dir() / FOLDER


def fingerprint(metadata: Mapping[str, Any], code: bytes) -> str:
    """A sha256 of the metadata a tokenizer is built from and of the ``code`` building it."""
    digest = hashlib.sha256(FORMAT + b"\0" + code)
    keys = sorted(key for key in metadata if key.startswith("tokenizer.") or key == "general.name")
    for key in keys:
        digest.update(f"\0{key}\0".encode())
        _hash_value(digest, metadata[key])
    return digest.hexdigest()


def _hash_value(digest: Any, value: Any) -> None:
    """Hash a metadata value so that values of other types or contents hash otherwise; the big
    arrays (tokens, scores, types, merges) go through numpy, not one `repr` per element."""
    if isinstance(value, list):
        kinds = sorted(kind.__name__ for kind in set(map(type, value)))
        digest.update(f"list {len(value)} {kinds}:".encode())
        if kinds == ["str"]:
            lengths = np.fromiter(map(len, value), np.int64, len(value))
            digest.update(lengths.tobytes())
            digest.update("".join(value).encode("utf-8", "surrogatepass"))
            return
        if kinds in (["float"], ["int"]):
            try:
                array = np.asarray(value, np.float64 if kinds == ["float"] else np.int64)
            except OverflowError:  # an int beyond 64 bits: `repr` below
                pass
            else:
                digest.update(array.tobytes())
                return
    digest.update(f"{type(value).__name__}:{value!r}".encode("utf-8", "surrogatepass"))


def entry_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.npz"


def load(folder: Path, key: str, vocab_size: int) -> DerivedTables | None:
    """The tables stored under `key`, or None where there is no readable, sound entry."""
    try:
        with np.load(entry_path(folder, key), allow_pickle=False) as entry:
            stored_key = bytes(entry["key"]).decode()
            merges = entry["merges"]
            overlaps = entry["overlaps"]
    except Exception:  # numpy's header parser alone raises half a dozen kinds
        return None  # missing, damaged (zip's CRC check included), or no entry at all
    sound = (
        stored_key == key
        and merges.dtype == np.int32
        and merges.ndim == 2
        and merges.shape[1] == 2
        and (merges.size == 0 or (merges.min() >= 0 and merges.max() < vocab_size))
        and overlaps.dtype == np.bool_
        and overlaps.shape == (2,)
    )
    if not sound:
        return None
    with contextlib.suppress(OSError):
        os.utime(entry_path(folder, key))  # used now: the last to be pruned
    return DerivedTables(merges=merges, overlaps=(bool(overlaps[0]), bool(overlaps[1])))


def store(folder: Path, key: str, tables: DerivedTables) -> None:
    """Write the entry atomically; a folder that cannot be written only costs the next build."""
    path = entry_path(folder, key)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".part")
    except OSError:
        return
    temporary = Path(name)
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(
                file,
                key=np.frombuffer(key.encode(), np.uint8),
                merges=np.ascontiguousarray(tables.merges, np.int32),
                overlaps=np.array(tables.overlaps, np.bool_),
            )
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError:
        pass
    finally:
        temporary.unlink(missing_ok=True)
    _prune(folder)


def _prune(folder: Path) -> None:
    """Remove all but the MAX_ENTRIES most recently used entries (best effort: another process
    may be pruning or reading the same folder)."""
    entries = []
    for entry in folder.glob("*.npz"):
        with contextlib.suppress(OSError):
            entries.append((entry.stat().st_mtime, entry))
    entries.sort(reverse=True)
    for _, entry in entries[MAX_ENTRIES:]:
        with contextlib.suppress(OSError):
            entry.unlink()
