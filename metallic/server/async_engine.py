"""The engine for coroutines: the engine runs in a process of its own, each request gets an asyncio
queue of its outputs.

Creating an `AsyncEngine` spawns the engine process (`engine_process`) and waits until the model is
loaded; the tokenizer and chat template are read here from the same file, so prompts are encoded
and checked in the front end. (So, as with any `multiprocessing` spawn, a script that creates one
must guard its entry point with `if __name__ == "__main__":`.) Submissions and aborts go to the
engine as messages; a reader thread receives its step outputs and hands each batch of them to the
event loop in one `call_soon_threadsafe`, which sorts them into the queues of the requests they
belong to. The event loop never waits for a step and the engine never waits for the event loop: the
two share no interpreter lock.

A step that raises ends every request it touched with the error; the engine is then considered
dead, as it is when its process exits unasked: open requests end with the error, new ones are
refused, and `error` says why (`/health` reports it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

from metallic.engine.arguments import encode_prompt
from metallic.engine.sampling import SamplingParams
from metallic.engine.sequence import RequestOutput
from metallic.errors import MetallicError
from metallic.gguf import tokenizer_cache
from metallic.gguf.reader import open_gguf
from metallic.gguf.tokenizer import Tokenizer
from metallic.server import engine_process
from metallic.server.engine_process import EngineInfo, Submission

log = logging.getLogger("metallic.server")

STOP_TIMEOUT = 30.0  # seconds the engine process gets to end its requests and exit


class EngineUnavailable(Exception):
    """The engine has stopped (it failed, or the server is shutting down)."""


class RequestGroup:
    """The engine requests that answer one HTTP request (its prompts times `n` choices): their
    outputs in one queue, in the order they arrive, so streamed choices interleave."""

    def __init__(self, request_ids: list[str], owner: AsyncEngine) -> None:
        self.request_ids = request_ids
        self._index = {request_id: i for i, request_id in enumerate(request_ids)}
        self._open = set(request_ids)
        self._aborted = False
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._owner = owner

    @property
    def finished(self) -> bool:
        return not self._open

    async def next_outputs(self) -> list[tuple[int, RequestOutput]]:
        """Wait for outputs and return all that have arrived, one per request (the outputs of
        several steps merged), each with the index of the request it belongs to; [] once every
        request has finished. When the event loop falls behind the engine, streams so send
        fewer, larger chunks instead of falling further behind."""
        if not self._open:
            return []
        arrived = [await self._queue.get()]
        while not self._queue.empty():
            arrived.append(self._queue.get_nowait())
        merged: dict[object, RequestOutput] = {}
        for out in arrived:
            if out.finished:
                self._open.discard(out.request_id)
            earlier = merged.get(out.request_id)
            merged[out.request_id] = out if earlier is None else _merge(earlier, out)
        return [(self._index[rid], out) for rid, out in merged.items()]

    def abort(self) -> None:
        """End the requests still open (their client went away): their KV blocks are freed
        before the next step, and each gets a last output saying "abort"."""
        if self._aborted or not self._open:
            return
        self._aborted = True
        self._owner.abort(sorted(self._open))
        for request_id in self._open:
            self.put(RequestOutput(request_id, [], "", None, True, "abort"))

    def put(self, out: RequestOutput) -> None:
        self._queue.put_nowait(out)


def _merge(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one."""
    logprobs = None
    if earlier.logprobs is not None or later.logprobs is not None:
        shift = len(earlier.text)
        moved = [replace(e, text_offset=e.text_offset + shift) for e in later.logprobs or []]
        logprobs = (earlier.logprobs or []) + moved
    return RequestOutput(
        later.request_id,
        earlier.token_ids + later.token_ids,
        earlier.text + later.text,
        logprobs,
        later.finished,
        later.finish_reason,
        later.error,
        later.stats,
    )


class AsyncEngine:
    """The front end's handle on the engine process."""

    def __init__(
        self,
        model: Path | str,
        options: dict[str, Any] | None = None,
        *,
        progress_label: str | None = None,
        verbose: bool = False,
    ) -> None:
        """`options` go to `Engine`; `progress_label` names the loading bar on stderr;
        `verbose` logs the engine's own messages."""
        self.error: Exception | None = None  # why the engine stopped for good
        self.stats: dict[str, Any] = {}  # the engine's latest `Engine.stats()`
        self._loop: asyncio.AbstractEventLoop | None = None
        self._groups: dict[str, RequestGroup] = {}  # open request id -> its group (event loop)
        self._stopping = False
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._send_lock = threading.Lock()
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        command_reader, self._commands = context.Pipe(duplex=False)
        self._events, event_writer = context.Pipe(duplex=False)
        self._process = context.Process(
            target=engine_process.run,
            args=(command_reader, event_writer, model, options or {}, progress_label, verbose),
            name="metallic-engine",
            daemon=True,
        )
        self._process.start()
        command_reader.close()  # the child's ends: closed here, so its exit reads as EOF
        event_writer.close()
        kind, payload = self._receive_start()
        if kind == "failed":
            self._process.join()
            raise payload
        info: EngineInfo = payload
        self.path = info.path
        self.context_size, self.vocab_size = info.context_size, info.vocab_size
        self.stats = info.stats
        self.metadata = open_gguf(info.path).metadata
        # The engine process stored the tokenizer's derived tables just now: read them back.
        self.tokenizer = Tokenizer.from_metadata(self.metadata, tokenizer_cache.default_folder())
        self._reader = threading.Thread(target=self._read, name="metallic-events", daemon=True)

    def _receive_start(self) -> tuple[str, Any]:
        try:
            message = self._events.recv()
        except EOFError:
            self._process.join()
            raise MetallicError(
                f"the engine process exited while loading (exit code {self._process.exitcode})"
            ) from None
        return message[0], message[1]

    @property
    def alive(self) -> bool:
        return self.error is None and self._process.is_alive()

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """The prompt's ids, checked as the engine checks them."""
        return encode_prompt(prompt, self.tokenizer, self.context_size, self.vocab_size)

    def start(self) -> None:
        """Start receiving the engine's outputs; call from the event loop that awaits them."""
        self._loop = asyncio.get_running_loop()
        self._reader.start()

    async def stop(self) -> None:
        """Abort what still runs, end the engine process and close every open request."""
        self._stopping = True
        if self._process.is_alive():
            self._send(("stop",))
            await asyncio.to_thread(self._process.join, STOP_TIMEOUT)
        if self._process.is_alive():
            log.warning("the engine process did not stop within %.0f s; killing it", STOP_TIMEOUT)
            self._process.kill()
            await asyncio.to_thread(self._process.join)
        self._end_open(EngineUnavailable("the server is shutting down"), "abort")

    def submit(
        self,
        request_id: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
        logprobs: int | None,
    ) -> RequestGroup:
        """Queue one engine request per (prompt, params) pair, named `request_id-i`."""
        self._check_alive()
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        group = RequestGroup(ids, self)
        submissions = []
        for rid, prompt, p in zip(ids, prompts, params, strict=True):
            self._groups[rid] = group
            submissions.append(Submission(rid, prompt, p, logprobs))
        self._send(("add", submissions))
        return group

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._groups.pop(rid, None)
        self._send(("abort", request_ids))

    def call(self, function: Callable[..., Any], *args: object, timeout: float = 60.0) -> Any:
        """`function(engine, *args)` run in the engine process between steps, and its result
        (both must pickle; `function` a module-level function): for tests and diagnostics.
        Blocks: call from a thread other than the event loop."""
        self._check_alive()
        call_id = next(self._call_ids)
        future: Future = Future()
        self._calls[call_id] = future
        self._send(("call", call_id, function, args))
        return future.result(timeout)

    def _check_alive(self) -> None:
        if self._stopping:
            raise EngineUnavailable("the server is shutting down")
        if not self.alive:
            raise EngineUnavailable(str(self.error or "the engine process has exited"))

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._commands.send(message)
        except (BrokenPipeError, OSError):
            pass  # the engine process is gone; the reader reports why

    # The reader thread.

    def _read(self) -> None:
        """Receive the engine's messages until it stops. If it died, or its process exited
        unasked, the engine is dead: `error` says why and every open request ends with it."""
        reason: Exception | None = None
        stopped = False
        try:
            while reason is None and not stopped:
                batch = [self._events.recv()]
                while self._events.poll():
                    batch.append(self._events.recv())
                outputs: list[RequestOutput] = []
                for message in batch:
                    kind = message[0]
                    if kind == "outputs":
                        outputs += message[1]
                    elif kind == "stats":
                        self.stats = message[1]
                    elif kind == "result":
                        self._resolve(*message[1:])
                    elif kind == "died":
                        reason = message[1]
                    elif kind == "stopped":
                        stopped = True
                if outputs:
                    self._call(self._dispatch, outputs)
        except (EOFError, OSError):
            self._process.join(1.0)
            if not self._stopping:
                code = self._process.exitcode
                reason = EngineUnavailable(f"the engine process exited (exit code {code})")
        if reason is not None:
            self.error = reason
            log.error("the engine stopped: %s: %s", type(reason).__name__, reason)
            self._call(self._end_open, reason, "error")
        for future in self._calls.values():
            future.set_exception(EngineUnavailable(str(reason or "the engine stopped")))

    def _resolve(self, call_id: int, value: object, error: Exception | None) -> None:
        future = self._calls.pop(call_id)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def _call(self, callback: Any, *args: object) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(callback, *args)

    # The event loop.

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            rid = str(out.request_id)
            group = self._groups.pop(rid, None) if out.finished else self._groups.get(rid)
            if group is not None:
                group.put(out)

    def _end_open(self, error: Exception, reason: str) -> None:
        groups, self._groups = self._groups, {}
        for rid, group in groups.items():
            group.put(RequestOutput(rid, [], "", None, True, reason, error))
