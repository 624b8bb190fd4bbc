"""The engine's own process: it loads the model and steps it; the HTTP front end lives elsewhere.

The server runs in two processes so that the engine never waits for the front end: parsing
requests, rendering JSON and writing server-sent events for 64 streams take a core of their own,
and in one process they would hold the interpreter lock the engine loop needs between its
steps. This side receives commands over one pipe and answers over another:

    front end -> engine   ("add", [Submission, ...])  ("abort", [request id, ...])
                          ("call", call id, function, args)  ("stop",)
    engine -> front end   ("ready", EngineInfo)  ("failed", error)
                          ("outputs", [RequestOutput, ...])  ("stats", Engine.stats())
                          ("result", call id, value, error)  ("died", error)  ("stopped",)

Between steps the loop takes every command waiting; while nothing runs it sleeps on the pipe. A
step's outputs are pickled and written by a sender thread, which runs while the loop waits for
the device. A step that raises ends the process's service ("died"); a front end that goes away
(its end of the pipe closes) ends the process. Interrupts are the front end's to handle: it
stops accepting requests, lets those in flight finish, then sends "stop".
"""

from __future__ import annotations

import logging
import pickle
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from metallic.engine.sampling import SamplingParams
from metallic.engine.sequence import RequestOutput
from metallic.errors import MetallicError

STATS_INTERVAL = 0.5  # seconds between snapshots of `Engine.stats` while the engine is busy

log = logging.getLogger("metallic.server")


@dataclass
class Submission:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None


@dataclass
class EngineInfo:
    """What the front end needs to know of the loaded model."""

    path: Path
    context_size: int
    vocab_size: int
    stats: dict[str, Any]  # `Engine.stats()` once loaded


class EngineFault(Exception):
    """An engine error that could not cross to the front end as itself."""


def portable(err: Exception) -> Exception:
    """`err` if it survives pickling, else a plain `MetallicError` with its message (a user's
    error stays one) or an `EngineFault` with its type and message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        pass
    if isinstance(err, MetallicError):
        return MetallicError(str(err))
    return EngineFault(f"{type(err).__name__}: {err}")


def run(
    commands: Connection,
    events: Connection,
    model: Path | str,
    options: dict[str, Any],
    progress_label: str | None,
    verbose: bool,
) -> None:
    """The process's entry point: load the model, announce it, serve commands until "stop"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(verbose)
    from metallic.engine.engine import Engine
    from metallic.progress import terminal_bar

    outbox = _Outbox(events)
    try:
        progress = terminal_bar(progress_label) if progress_label else None
        engine = Engine(model, progress=progress, **options)
    except Exception as err:
        outbox.send(("failed", portable(err)))
        outbox.close()
        return
    info = EngineInfo(engine.path, engine.context_size, engine.config.vocab_size, engine.stats())
    outbox.send(("ready", info))
    try:
        _EngineLoop(engine, commands, outbox).run()
    finally:
        outbox.close()


def configure_logging(verbose: bool) -> None:
    """metallic's messages on stderr, in both processes: warnings and errors, and with `verbose`
    the engine's own (placement, residency, graph captures)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s metallic: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("metallic")
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)


class _Outbox:
    """Messages to the front end, pickled and written in order by a thread of their own."""

    def __init__(self, events: Connection) -> None:
        self._events = events
        self._queue: queue.SimpleQueue[tuple | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send_all, name="metallic-outbox")
        self._thread.start()

    def send(self, message: tuple) -> None:
        self._queue.put(message)

    def close(self) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join()

    def _send_all(self) -> None:
        while (message := self._queue.get()) is not None:
            try:
                self._events.send(message)
            except (BrokenPipeError, EOFError, OSError):
                return  # the front end has gone; the loop notices on its own pipe


class _EngineLoop:
    def __init__(self, engine: Any, commands: Connection, outbox: _Outbox) -> None:
        self.engine = engine
        self.commands = commands
        self.outbox = outbox
        self.admitted: set[str] = set()  # request ids the engine holds
        self.refused: list[RequestOutput] = []  # requests add_request refused, to report
        self.stopping = False

    def run(self) -> None:
        engine = self.engine
        refreshed = time.perf_counter()
        try:
            while not self.stopping:
                if not engine.has_unfinished():  # idle: report, then sleep until a command
                    self._deliver(self.refused)
                    self.refused = []
                    self.outbox.send(("stats", engine.stats()))
                    self._take_commands(wait=True)
                else:
                    self._take_commands(wait=False)
                if engine.has_unfinished():
                    outputs, self.refused = self.refused + engine.step(), []
                    self._deliver(outputs)
                    if engine.failure is not None:
                        raise engine.failure
                    if time.perf_counter() - refreshed > STATS_INTERVAL:
                        self.outbox.send(("stats", engine.stats()))
                        refreshed = time.perf_counter()
        except EOFError:
            return  # the front end went away without a word: nobody is left to serve
        except Exception as err:
            log.error("the engine failed", exc_info=True)
            self.outbox.send(("died", portable(err)))
            return
        for request_id in self.admitted:
            engine.abort(request_id)
        while engine.has_unfinished():
            engine.step()
        self.outbox.send(("stopped",))

    def _take_commands(self, wait: bool) -> None:
        """Every command waiting; with `wait`, sleep until one comes."""
        while self.commands.poll(None if wait else 0):
            wait = False
            self._handle(self.commands.recv())

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            for s in message[1]:
                self._add(s)
        elif kind == "abort":
            for request_id in message[1]:
                if request_id in self.admitted:
                    self.admitted.discard(request_id)
                    self.engine.abort(request_id)
        elif kind == "call":
            _, call_id, function, args = message
            try:
                self.outbox.send(("result", call_id, function(self.engine, *args), None))
            except Exception as err:
                self.outbox.send(("result", call_id, None, portable(err)))
        elif kind == "stop":
            self.stopping = True

    def _add(self, s: Submission) -> None:
        """Add a request; one the engine refuses ends at once with the reason."""
        try:
            self.engine.add_request(
                s.prompt_ids, s.params, request_id=s.request_id, logprobs=s.logprobs
            )
            self.admitted.add(s.request_id)
        except Exception as err:
            error = portable(err)
            self.refused.append(RequestOutput(s.request_id, [], "", None, True, "error", error))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self.admitted.discard(str(out.request_id))
            if out.error is not None:
                out.error = portable(out.error)
        if outputs:
            self.outbox.send(("outputs", outputs))
