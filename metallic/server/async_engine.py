"""The engine for coroutines: one background thread steps it, each request gets an asyncio queue.

Only the engine thread touches the engine. It takes in new requests and aborts between steps,
runs `step` while anything is unfinished, and otherwise sleeps on an event that a submission sets.
Each step's outputs cross to the event loop in one `call_soon_threadsafe`, which sorts them into
the queues of the requests they belong to. So the event loop never waits for a step (the engine
holds its lock through one), and the engine never waits for the event loop.

A step that raises ends every request it touched with the error; the engine is then considered
dead, as it is when the thread itself fails: open requests end with the error, new ones are
refused, and `error` says why (`/health` reports it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.engine.sequence import RequestOutput

log = logging.getLogger("metallic.server")

STATS_INTERVAL = 0.5  # seconds between snapshots of `Engine.stats` while the engine is busy


class EngineUnavailable(Exception):
    """The engine has stopped (it failed, or the server is shutting down)."""


@dataclass
class _Submission:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    logprobs: int | None


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
        logprobs = (earlier.logprobs or []) + (later.logprobs or [])
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
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.error: Exception | None = None  # why the engine stopped for good
        self.stats: dict[str, Any] = engine.stats()  # refreshed by the engine thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._groups: dict[str, RequestGroup] = {}  # open request id -> its group (event loop)
        self._submissions: deque[_Submission] = deque()
        self._aborts: deque[str] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._admitted: set[str] = set()  # request ids the engine holds (engine thread)

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        """Requests submitted that the engine has not taken in yet."""
        return len(self._submissions)

    def start(self) -> None:
        """Start the engine thread; call from the event loop that will await the outputs."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="metallic-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Abort what still runs, end the thread and close every open request."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._end_open(EngineUnavailable("the server is shutting down"), "abort")

    def submit(
        self,
        request_id: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
        logprobs: int | None,
    ) -> RequestGroup:
        """Queue one engine request per (prompt, params) pair, named `request_id-i`."""
        if self._stopping or self.error is not None:
            raise EngineUnavailable(str(self.error or "the server is shutting down"))
        ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        group = RequestGroup(ids, self)
        for rid, prompt, p in zip(ids, prompts, params, strict=True):
            self._groups[rid] = group
            self._submissions.append(_Submission(rid, prompt, p, logprobs))
        self._wake.set()
        return group

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._groups.pop(rid, None)
        self._aborts.extend(request_ids)
        self._wake.set()

    # The engine thread.

    def _run(self) -> None:
        engine = self.engine
        refreshed = time.perf_counter()
        try:
            while not self._stopping:
                self._wake.clear()
                outputs = self._take_in()
                if engine.has_unfinished():
                    outputs += engine.step()
                    self._deliver(outputs)
                    if engine.failure is not None:
                        raise engine.failure
                    if time.perf_counter() - refreshed > STATS_INTERVAL:
                        self.stats, refreshed = engine.stats(), time.perf_counter()
                else:
                    self._deliver(outputs)
                    self.stats = engine.stats()
                    self._wake.wait()
            for rid in self._admitted:
                engine.abort(rid)
            while engine.has_unfinished():
                engine.step()
        except Exception as err:
            self.error = err
            log.error("the engine stopped: %s: %s", type(err).__name__, err)
            self._call(self._end_open, err, "error")

    def _take_in(self) -> list[RequestOutput]:
        """Add the submitted requests (those the engine refuses end at once with the reason),
        then drop the aborted ones."""
        refused = []
        while self._submissions:
            s = self._submissions.popleft()
            try:
                self.engine.add_request(
                    s.prompt_ids, s.params, request_id=s.request_id, logprobs=s.logprobs
                )
                self._admitted.add(s.request_id)
            except Exception as err:
                refused.append(RequestOutput(s.request_id, [], "", None, True, "error", err))
        while self._aborts:
            rid = self._aborts.popleft()
            if rid in self._admitted:
                self._admitted.discard(rid)
                self.engine.abort(rid)
        return refused

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self._admitted.discard(out.request_id)
        if outputs:
            self._call(self._dispatch, outputs)

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
