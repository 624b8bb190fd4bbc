"""Model files in the user's cache folder, made once, atomically, under a lock.

A cached file is only ever written to a temporary file beside it, checked against its pinned
sha256, flushed to disk and then renamed into place, so its name never shows a partial file. An
exclusive lock (``flock`` on a lock file beside it) makes concurrent first runs wait for the one
that writes instead of racing it. A file whose bytes do not match (an older non-atomic writer,
a damaged disk, a hand edit) is made again. A small stamp beside each file records the size and
modification time its hash was checked at, so later runs skip re-hashing hundreds of MB.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from metallic.errors import MetallicError

try:
    import fcntl
except ImportError:  # Windows: no flock; the atomic rename still keeps partial files out
    fcntl = None  # type: ignore[assignment]

CHUNK = 1 << 20


def cache_dir() -> Path:
    """metallic's cache folder: $METALLIC_CACHE, else $XDG_CACHE_HOME/metallic, else
    ~/.cache/metallic."""
    explicit = os.environ.get("METALLIC_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "metallic"


class CacheError(MetallicError):
    """A cached file that cannot be made: bytes that do not match, or a folder not writable."""


class HashingWriter:
    """A binary file wrapper that hashes what is written through it (no second read)."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.file.write(data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _stamp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.sha256")


def _stamp_of(path: Path, sha256: str) -> dict[str, object]:
    info = path.stat()
    return {"sha256": sha256, "size": info.st_size, "mtime_ns": info.st_mtime_ns}


def _stamped(path: Path, sha256: str) -> bool:
    """Whether `path` was verified as it is now (same size and modification time)."""
    try:
        return json.loads(_stamp_path(path).read_text()) == _stamp_of(path, sha256)
    except (OSError, ValueError):
        return False


def is_cached(path: Path, sha256: str) -> bool:
    """Whether `path` holds the verified file (checked by its stamp: no hashing)."""
    return path.is_file() and _stamped(path, sha256)


def _write_stamp(path: Path, sha256: str) -> None:
    stamp = _stamp_path(path)
    temporary = stamp.with_name(stamp.name + ".tmp")
    temporary.write_text(json.dumps(_stamp_of(path, sha256)))
    os.replace(temporary, stamp)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path`'s lock file (created beside it, never deleted: deleting
    it would let a waiting process lock a file that a newcomer no longer sees)."""
    with path.with_name(f".{path.name}.lock").open("a") as lock:
        if fcntl is not None:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some systems cannot open a folder; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def cached_file(path: Path, sha256: str, write: Callable[[HashingWriter], None], what: str) -> Path:
    """`path` with the bytes whose sha256 is `sha256`, made by `write` unless already there.

    `write` gets a file to write the content into; it may raise `MetallicError` (a download that
    failed). `what` names the file in errors.
    """
    if is_cached(path, sha256):
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            # made by another process while this one waited, or left unstamped by an older one
            if path.is_file() and (_stamped(path, sha256) or sha256_file(path) == sha256):
                _write_stamp(path, sha256)
                return path
            for stale in path.parent.glob(f".{path.name}.*.part"):
                stale.unlink(missing_ok=True)  # left by a killed writer: none runs now
            _make(path, sha256, write, what)
            _write_stamp(path, sha256)
    except OSError as err:
        raise CacheError(f"cannot write {what} to {path.parent}: {err.strerror or err}") from None
    return path


def _make(path: Path, sha256: str, write: Callable[[HashingWriter], None], what: str) -> None:
    """Write into a temporary file beside `path`, check, flush to disk, rename into place."""
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    temporary = Path(name)
    try:
        with os.fdopen(handle, "wb") as file:
            writer = HashingWriter(file)
            write(writer)
            file.flush()
            os.fsync(file.fileno())
        digest = writer.digest.hexdigest()
        if digest != sha256:
            raise CacheError(
                f"{what}: the bytes have sha256 {digest[:16]}..., not the expected "
                f"{sha256[:16]}... (a damaged download or package; try again)"
            )
        os.replace(temporary, path)
        _fsync_dir(path.parent)
    finally:
        temporary.unlink(missing_ok=True)
