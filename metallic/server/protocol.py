"""The OpenAI wire format: requests in, validated; responses, stream chunks and errors out.

Requests are pydantic models in strict mode, so a string where a number belongs is an error as it
is at OpenAI, and fields metallic does not use (`user`, `logit_bias` when empty, ...) are ignored
as OpenAI ignores unknown ones. Responses are plain dicts: a stream writes one chunk per token,
and building them needs no validation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from metallic.engine.sampling import SamplingParams
from metallic.engine.sequence import RequestOutput, TokenLogprob
from metallic.gguf.tokenizer import Tokenizer

MAX_LOGPROBS = 20  # alternatives per token a request may ask for (OpenAI's chat limit)
MAX_CHOICES = 128  # `n`, as OpenAI limits it
LOWEST_LOGPROB = -9999.0  # log(0) as JSON can carry it

Number = Annotated[float, Field(allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]


class APIError(Exception):
    """An error answered as OpenAI shapes it: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """The first of pydantic's complaints about a request body, as a 400 naming the field."""
    first = errors[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}")
    loc = [str(part) for part in first["loc"] if part != "body"]
    if not loc:
        return APIError(400, f"the body must be a JSON object: {first['msg']}")
    return APIError(400, f"{'.'.join(loc)}: {first['msg']}", param=loc[0])


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: the usage so far in every chunk


class GenerationRequest(BaseModel):
    """What completions and chat share: the model, sampling and how to answer."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=0, lt=1 << 64)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Number] | None = None
    # Extensions beyond OpenAI's parameters, as vLLM and llama.cpp's server accept them.
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    ignore_eos: bool = False

    def token_limit(self) -> int | None:
        return self.max_tokens

    def sampling(self, max_tokens: int | None, choice: int, window: int) -> SamplingParams:
        """The engine's parameters for choice number `choice`, with OpenAI's defaults
        (temperature 1, no top-p, top-k, min-p or penalties). Choices get seeds one apart, so
        they differ but a seed still gives the same text. Penalties count the last `window`
        tokens (the context: the whole sequence, prompt included)."""
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not s for s in stop):
            raise APIError(400, "stop strings must not be empty", param="stop")
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=self.top_k or 0,
            top_p=1.0 if self.top_p is None else self.top_p,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            penalty_last_n=window,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=None if self.seed is None else (self.seed + choice) % (1 << 64),
            max_tokens=max_tokens,
            stop=stop,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: one text, one list of ids, or several of either."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]  # type: ignore[list-item]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return list(prompt)  # type: ignore[arg-type]

    def check_supported(self) -> None:
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    max_completion_tokens: Annotated[int, Field(gt=0)] | None = None

    def token_limit(self) -> int | None:
        """`max_completion_tokens` replaces the older `max_tokens` where both are given."""
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        """Alternatives per token to report; None when log-probabilities are off."""
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs to be true", param="top_logprobs")
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


@dataclass
class Choice:
    """One choice as it accumulates: text, token count, log-probabilities, why it ended."""

    index: int
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # text offset of each token
    length: int = 0  # characters so far
    finish_reason: str | None = None

    def add(self, out: RequestOutput) -> None:
        entries = out.logprobs or []
        self.offsets += [self.length + e.text_offset for e in entries]
        self.logprobs += entries
        self.tokens += len(out.token_ids)
        self.text.append(out.text)
        self.length += len(out.text)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Formatter:
    """Responses and chunks of one endpoint, for one request (its id, model, creation time)."""

    object = ""
    chunk_object = ""

    def __init__(self, request_id: str, model: str, tokenizer: Tokenizer, top: int | None):
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.top = top  # alternatives per token, None when log-probabilities are off

    def token(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.request_id, "object": kind, "created": self.created, "model": self.model}

    def response(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        body = self.head(self.object)
        body["choices"] = [self.choice(c) for c in choices]
        body["usage"] = usage(prompt_tokens, sum(c.tokens for c in choices))
        return body

    def chunk(
        self, choices: list[dict[str, Any]], with_usage: bool, so_far: tuple[int, int] | None
    ) -> dict[str, Any]:
        """A streamed chunk; `so_far` (prompt, completion tokens) puts the usage until now in
        it, else `with_usage` a null usage (OpenAI's: only the last chunk has one)."""
        body = self.head(self.chunk_object)
        body["choices"] = choices
        if so_far is not None:
            body["usage"] = usage(*so_far)
        elif with_usage:
            body["usage"] = None
        return body

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        body = self.head(self.chunk_object)
        body["choices"] = []
        body["usage"] = usage(prompt_tokens, completion_tokens)
        return body

    def choice(self, choice: Choice) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, index: int, out: RequestOutput, offset: int) -> dict[str, Any]:
        """A stream chunk's choice: what `out` adds to choice `index`, whose text had `offset`
        characters before it."""
        raise NotImplementedError


class CompletionFormatter(Formatter):
    object = "text_completion"
    chunk_object = "text_completion"

    def choice(self, choice: Choice) -> dict[str, Any]:
        return {
            "index": choice.index,
            "text": "".join(choice.text),
            "logprobs": self._logprobs(choice.logprobs, choice.offsets),
            "finish_reason": choice.finish_reason,
        }

    def delta(self, index: int, out: RequestOutput, offset: int) -> dict[str, Any]:
        entries = out.logprobs or []
        return {
            "index": index,
            "text": out.text,
            "logprobs": self._logprobs(entries, [offset + e.text_offset for e in entries]),
            "finish_reason": out.finish_reason if out.finished else None,
        }

    def _logprobs(self, entries: list[TokenLogprob], offsets: list[int]) -> dict | None:
        """The legacy layout: the chosen tokens, their log-probabilities, and per token the
        `logprobs` most likely tokens plus the chosen one (so 0 gives one entry)."""
        if self.top is None:
            return None
        tops = []
        for e in entries:
            top = {self.token(i): _finite(lp) for i, lp in e.top}
            top.setdefault(self.token(e.token_id), _finite(e.logprob))
            tops.append(top)
        return {
            "tokens": [self.token(e.token_id) for e in entries],
            "token_logprobs": [_finite(e.logprob) for e in entries],
            "top_logprobs": tops,
            "text_offset": offsets,
        }


class ChatFormatter(Formatter):
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def choice(self, choice: Choice) -> dict[str, Any]:
        return {
            "index": choice.index,
            "message": {"role": "assistant", "content": "".join(choice.text)},
            "logprobs": self._logprobs(choice.logprobs),
            "finish_reason": choice.finish_reason,
        }

    def role_delta(self, index: int) -> dict[str, Any]:
        """The first chunk of each choice names the speaker, as OpenAI's streams do."""
        delta = {"role": "assistant", "content": ""}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def delta(self, index: int, out: RequestOutput, offset: int) -> dict[str, Any]:
        return {
            "index": index,
            "delta": {"content": out.text} if out.text else {},
            "logprobs": self._logprobs(out.logprobs or []),
            "finish_reason": out.finish_reason if out.finished else None,
        }

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        piece = self.tokenizer.token_bytes(token_id)
        text = piece.decode("utf-8", errors="replace")
        return {"token": text, "logprob": _finite(logprob), "bytes": list(piece)}

    def _logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if self.top is None:
            return None
        content = []
        for e in entries:
            entry = self._entry(e.token_id, e.logprob)
            entry["top_logprobs"] = [self._entry(i, lp) for i, lp in e.top]
            content.append(entry)
        return {"content": content}


def _finite(logprob: float) -> float:
    return max(logprob, LOWEST_LOGPROB)
