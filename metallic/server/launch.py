"""Run the server: bind the socket, load the model, serve until SIGTERM or SIGINT.

The socket is bound before the model loads, so a taken port fails in a second, not after the load.
The engine runs in a process of its own (`engine_process`); this one serves HTTP. A signal stops
accepting connections, lets the requests in flight finish for up to `shutdown_timeout` seconds,
aborts the rest, stops the engine and exits 0 (uvicorn itself would re-raise the signal after its
shutdown, ending the process by it).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from metallic.errors import MetallicError
from metallic.server import engine_process
from metallic.server.app import create_app
from metallic.server.async_engine import AsyncEngine

log = logging.getLogger("metallic.server")


class Server(uvicorn.Server):
    """uvicorn's server, announcing its URL once it listens and exiting 0 on a signal."""

    def __init__(self, config: uvicorn.Config, announce: str = "") -> None:
        super().__init__(config)
        self.announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.announce:
            print(self.announce, flush=True)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: object) -> None:
        if not self.should_exit:
            log.info(
                "%s: shutting down (requests in flight get %s s to finish)",
                signal.Signals(sig).name,
                self.config.timeout_graceful_shutdown,
            )
        super().handle_exit(sig, frame)  # type: ignore[arg-type]


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: any free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        raise MetallicError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.set_inheritable(True)
    return sock


def url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def configure_logging(verbose: bool) -> None:
    """As the engine process logs (`engine_process.configure_logging`), and a line per request
    always."""
    engine_process.configure_logging(verbose)
    log.setLevel(logging.INFO)


def serve(
    model: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    shutdown_timeout: float = 30.0,
    verbose: bool = False,
    **engine_options: object,
) -> int:
    """Serve `model` until a signal; `engine_options` go to `Engine`."""
    configure_logging(verbose)
    sock = bind(host, port)
    engine = AsyncEngine(
        model,
        engine_options,
        progress_label="loading",
        verbose=verbose,
    )
    name = model_name or Path(engine.path).name.removesuffix(".gguf")
    app = create_app(engine, name, api_key)
    config = uvicorn.Config(
        app,
        log_config=None,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=shutdown_timeout,
    )
    address = url(sock, host)
    announce = f"metallic: serving {name} at {address}/v1 (Ctrl-C to stop)"
    Server(config, announce).run(sockets=[sock])
    return 0
