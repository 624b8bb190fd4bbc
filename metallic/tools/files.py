"""Output files a command writes at its end, checked at its start."""

from __future__ import annotations

from pathlib import Path

from metallic.errors import MetallicError


def check_writable(path: Path, option: str) -> None:
    """Fail now, in one line, if `path` cannot be written, rather than after a long run; the
    check leaves no file behind."""
    existed = path.exists()
    try:
        with path.open("a"):
            pass
    except OSError as err:
        raise MetallicError(f"{option} {path}: cannot write: {err.strerror or err}") from None
    if not existed:
        path.unlink()
