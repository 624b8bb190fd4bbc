"""Live servers on loopback for the client tests: uvicorn in a background thread, on a free port,
serving an engine in its own process, as `metallic serve` does (a test reaches into it with
`AsyncEngine.call`, to inject a fault or read its state)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import uvicorn

from metallic.server.app import create_app
from metallic.server.async_engine import AsyncEngine
from metallic.server.launch import Server, bind, url
from metallic.testing.synthetic import write_synthetic_model


class LiveServer:
    def __init__(
        self, model: Path, options: dict, name: str = "test-model", api_key: str | None = None
    ):
        self.engine = AsyncEngine(model, options)
        self.name = name
        sock = bind("127.0.0.1", 0)
        self.url = url(sock, "127.0.0.1")
        app = create_app(self.engine, name, api_key)
        config = uvicorn.Config(
            app, log_config=None, log_level="warning", timeout_graceful_shutdown=5
        )
        self.server = Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def client(self, **options: object) -> openai.OpenAI:
        options = {"api_key": "unused", "max_retries": 0, "timeout": 120, **options}
        return openai.OpenAI(base_url=self.url + "/v1", **options)  # type: ignore[arg-type]

    def async_client(self, **options: object) -> openai.AsyncOpenAI:
        options = {"api_key": "unused", "max_retries": 0, "timeout": 120, **options}
        return openai.AsyncOpenAI(base_url=self.url + "/v1", **options)  # type: ignore[arg-type]

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "server did not shut down"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_synthetic_model(tmp_path_factory.mktemp("server") / "tiny.gguf", "tiny-llama")


def tiny_options(**options: object) -> dict:
    """f32 on the CPU: batched and single steps then agree to float rounding, so greedy and
    seeded texts do not depend on what else shares a step."""
    return {"device": "cpu", "dtype": "f32", "context_size": 512, **options}


@pytest.fixture(scope="module")
def tiny(tiny_model) -> Iterator[LiveServer]:
    """A server of the tiny model, shared by a module's tests (each leaves it idle)."""
    server = LiveServer(tiny_model, tiny_options(), "tiny")
    yield server
    server.close()


@pytest.fixture
def start_tiny(tiny_model) -> Iterator[Callable[..., LiveServer]]:
    """Start a server of the tiny model of one's own (an API key, engine options, a fault)."""
    servers: list[LiveServer] = []

    def start(api_key: str | None = None, **engine_options: object) -> LiveServer:
        servers.append(LiveServer(tiny_model, tiny_options(**engine_options), "tiny", api_key))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(scope="module")
def gemma(default_model_path) -> Iterator[LiveServer]:
    """The default model, served as "gemma"."""
    server = LiveServer(default_model_path, {"device": "cpu", "context_size": 512}, "gemma")
    yield server
    server.close()
