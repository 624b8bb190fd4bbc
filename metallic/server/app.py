"""The routes: OpenAI's models, completions and chat completions, plus health and metrics.

Every error is OpenAI-shaped JSON. Before anything reaches the engine a request is checked in
full: its body (at most 10 MB, valid JSON, fields of the right types and ranges), the model name,
the prompt (not empty, token ids in the vocabulary, a chat the template can render) and that the
prompt and `max_tokens` fit the context together. A client that goes away has its requests
aborted at once: a stream notices as its response is cancelled, a plain request by a watcher on
the connection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metallic.engine.arguments import PromptTooLong
from metallic.engine.chat import ChatTemplate
from metallic.errors import MetallicError
from metallic.server.async_engine import AsyncEngine, EngineUnavailable, RequestGroup
from metallic.server.metrics import RequestTrace, ServerMetrics
from metallic.server.protocol import (
    APIError,
    ChatFormatter,
    ChatRequest,
    Choice,
    CompletionFormatter,
    CompletionRequest,
    Formatter,
    GenerationRequest,
    validation_error,
)

log = logging.getLogger("metallic.server")

MAX_BODY_BYTES = 10 * 2**20
CLIENT_CLOSED = 499  # the status logged for a request whose client left (nginx's convention)


def create_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    """The ASGI app serving `engine` as `model_name`; with `api_key`, every route but /health
    wants `Authorization: Bearer <api_key>`. The engine process is stopped when the app stops."""
    service = _Service(engine, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.stop()

    app = FastAPI(
        title="metallic", lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None
    )
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> Response:
        return service.reject(request, err)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> Response:
        return service.reject(request, validation_error(list(err.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        return service.reject(request, APIError(err.status_code, str(err.detail)))

    @app.get("/health")
    async def health() -> Response:
        if engine.alive:
            return JSONResponse({"status": "ok"})
        reason = engine.error or "the engine is not running"
        return JSONResponse({"status": "error", "error": str(reason)}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [service.model_card()]})

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        service.check_model(name)
        return JSONResponse(service.model_card())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await service.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        return await service.chat(body, request)

    app.add_middleware(_BodyLimit)
    if api_key:
        app.add_middleware(_ApiKey, key=api_key)
    return app


class _Service:
    """What the routes do, over one engine and its model."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.metrics = ServerMetrics(engine)
        self.tokenizer = engine.tokenizer
        self.context = engine.context_size
        self.template = ChatTemplate.for_model(engine.metadata)
        self.created = int(time.time())

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "metallic",
            "max_model_len": self.context,
        }

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist (this server has {self.model_name!r})",
                param="model",
                code="model_not_found",
            )

    def reject(self, request: Request, err: APIError) -> Response:
        """Answer an error before generation, counted and logged like every request."""
        self.metrics.requests.labels(_route(request), str(err.status)).inc()
        log.info("%s %s %d: %s", request.method, request.url.path, err.status, err.message)
        return JSONResponse(err.body(), status_code=err.status)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        body.check_supported()
        prompts = [self._encode(prompt) for prompt in body.prompts()]
        formatter = CompletionFormatter(
            _new_id("cmpl"), self.model_name, self.tokenizer, body.logprobs
        )
        return await self._generate(request, body, prompts, formatter)

    async def chat(self, body: ChatRequest, request: Request) -> Response:
        self.check_model(body.model)
        top = body.logprob_count()
        try:
            text = self.template.render(body.conversation())
        except MetallicError as err:
            raise APIError(400, str(err), param="messages") from None
        bos = self.template.bos_token
        ids = self.tokenizer.encode(
            text, add_special=not (bos and text.startswith(bos)), parse_special=True
        )
        prompt = self._encode(ids, param="messages")
        formatter = ChatFormatter(_new_id("chatcmpl"), self.model_name, self.tokenizer, top)
        return await self._generate(request, body, [prompt], formatter)

    def _encode(self, prompt: str | list[int], param: str = "prompt") -> list[int]:
        """The prompt's ids, checked: not empty, in the vocabulary, shorter than the context."""
        if not prompt:
            raise APIError(400, f"{param} must not be empty", param=param)
        try:
            return self.engine.encode_prompt(prompt)
        except PromptTooLong as err:
            raise APIError(400, str(err), param=param, code="context_length_exceeded") from None
        except MetallicError as err:
            raise APIError(400, str(err), param=param) from None

    async def _generate(
        self,
        request: Request,
        body: GenerationRequest,
        prompts: list[list[int]],
        formatter: Formatter,
    ) -> Response:
        limit = body.token_limit()
        for ids in prompts:
            if limit is not None and len(ids) + limit > self.context:
                raise APIError(
                    400,
                    f"the context holds {self.context} tokens: a prompt of {len(ids)} leaves "
                    f"room for {self.context - len(ids)}, not max_tokens={limit}",
                    param="max_tokens",
                    code="context_length_exceeded",
                )
        choices = [
            (ids, body.sampling(limit, j, self.context)) for ids in prompts for j in range(body.n)
        ]
        for _, params in choices:
            try:
                params.validate()
            except MetallicError as err:
                raise APIError(400, str(err)) from None
        trace = RequestTrace(self.metrics, _route(request), formatter.request_id)
        trace.prompt_tokens = sum(len(ids) for ids in prompts)
        try:
            group = self.engine.submit(
                formatter.request_id,
                [ids for ids, _ in choices],
                [params for _, params in choices],
                formatter.top,
            )
        except EngineUnavailable as err:
            raise APIError(503, f"the engine is not running: {err}") from None
        if body.stream:
            usage = (body.include_usage, body.continuous_usage)
            events = self._stream(group, formatter, trace, *usage)
            return _EventStream(events, group, trace)
        return await self._respond(request, group, formatter, trace)

    async def _respond(
        self, request: Request, group: RequestGroup, formatter: Formatter, trace: RequestTrace
    ) -> Response:
        """Wait for every choice, then answer with all of them (or with the first error)."""
        choices = [Choice(i) for i in range(len(group.request_ids))]
        watcher = asyncio.create_task(_abort_on_disconnect(request, group))
        error, status = None, CLIENT_CLOSED
        try:
            while not group.finished and error is None:
                for index, out in await group.next_outputs():
                    trace.tokens(index, len(out.token_ids))
                    choices[index].add(out)
                    if out.error is not None:
                        error = _engine_error(out.error)
                        break
                    if out.finished:
                        choices[index].finish_reason = out.finish_reason
                        trace.finish_reason(out.finish_reason or "")
            if error is not None:
                status = error.status
            elif "abort" not in trace.reasons:
                status = 200
        finally:
            watcher.cancel()
            group.abort()
            trace.end(status)
        if error is not None:
            return JSONResponse(error.body(), status_code=error.status)
        return JSONResponse(formatter.response(choices, trace.prompt_tokens))

    async def _stream(
        self,
        group: RequestGroup,
        formatter: Formatter,
        trace: RequestTrace,
        usage: bool,
        continuous: bool,
    ) -> AsyncIterator[str]:
        """Server-sent events: a chunk per choice and step, each output's tokens as they come
        (outputs that arrived together go out in one write), the usage if asked (`continuous`:
        the usage so far in every chunk, as vLLM's extension does), [DONE]."""
        n = len(group.request_ids)
        offsets = [0] * n
        status = CLIENT_CLOSED

        def so_far() -> tuple[int, int] | None:
            return (trace.prompt_tokens, trace.generated) if continuous else None

        try:
            if isinstance(formatter, ChatFormatter):
                roles = [
                    formatter.chunk([formatter.role_delta(i)], usage, so_far()) for i in range(n)
                ]
                yield "".join(map(_event, roles))
            error = None
            while not group.finished and error is None:
                events = []
                for index, out in await group.next_outputs():
                    trace.tokens(index, len(out.token_ids))
                    if out.error is not None:
                        error = _engine_error(out.error)
                        break
                    if out.finished:
                        trace.finish_reason(out.finish_reason or "")
                    if out.text or out.logprobs or out.finished:
                        delta = formatter.delta(index, out, offsets[index])
                        events.append(_event(formatter.chunk([delta], usage, so_far())))
                    offsets[index] += len(out.text)
                if events:
                    yield "".join(events)
            if error is not None:
                group.abort()
                status = error.status
                yield _event(error.body())
            else:
                status = 200
                if usage:
                    yield _event(formatter.usage_chunk(trace.prompt_tokens, trace.generated))
            yield "data: [DONE]\n\n"
        finally:
            group.abort()
            trace.end(status)


class _EventStream(StreamingResponse):
    """Server-sent events that end their request however the response ends: a client that
    leaves before the first event is sent never starts the generator, whose own clean-up then
    never runs."""

    def __init__(self, events: AsyncIterator[str], group: RequestGroup, trace: RequestTrace):
        super().__init__(events, media_type="text/event-stream")
        self.group = group
        self.trace = trace

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.group.abort()
            self.trace.end(CLIENT_CLOSED)


def _route(request: Request) -> str:
    """The route a request matched, as declared ("/v1/models/{name:path}"), or "other": metric
    labels must not grow with every path a client invents."""
    route = request.scope.get("route")
    return getattr(route, "path", "other")


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# Characters JSON leaves raw that some clients' line splitting (Python's str.splitlines, say)
# takes for line ends, cutting an event in two: escaped, as JSON allows.
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _event(body: dict[str, Any]) -> str:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    if "\x85" in text or "\u2028" in text or "\u2029" in text:
        text = text.translate(_LINE_BREAKS)
    return f"data: {text}\n\n"


def _engine_error(err: Exception) -> APIError:
    """A request that failed in the engine: its own fault (a MetallicError such as a KV demand
    that can never fit) is a 400, anything else a 500."""
    if isinstance(err, EngineUnavailable):
        return APIError(503, f"the engine is not running: {err}")
    if isinstance(err, MetallicError):
        return APIError(400, str(err))
    return APIError(500, f"the engine failed: {type(err).__name__}: {err}")


async def _abort_on_disconnect(request: Request, group: RequestGroup) -> None:
    """Abort `group` when the client closes its connection before the answer is ready."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            group.abort()
            return


async def _send_error(send: Send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _BodyLimit:
    """Refuse bodies over MAX_BODY_BYTES with a 413: read the body (declared or chunked) up to
    the limit, then hand it on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = APIError(
            413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="request_too_large"
        )
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await _send_error(send, too_large)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client left; the app sees it at its first receive
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY_BYTES:
                await _send_error(send, too_large)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)


def _replay(body: bytes, receive: Receive) -> Callable[[], Awaitable[Message]]:
    """A receive that gives `body` once, then waits on the connection (for a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed


class _ApiKey:
    """Every route but /health needs `Authorization: Bearer <key>`, else a 401."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.expected = f"Bearer {key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                message = "invalid or missing API key (send Authorization: Bearer KEY)"
                await _send_error(send, APIError(401, message, code="invalid_api_key"))
                return
        await self.app(scope, receive, send)
