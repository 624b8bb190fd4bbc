"""One request's state as the engine carries it from arrival to its last token.

Everything that belongs to a request lives here, so the scheduler, block manager and model runner
share no per-request dictionaries: its ids, sampling parameters, status, how many tokens have
their keys computed, its block table in every KV pool, its detokenizer and stop matcher, timing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from metallic.engine.detokenizer import StopMatcher, StreamingDetokenizer
from metallic.engine.sampling import SamplingParams
from metallic.gguf.tokenizer import Tokenizer

PENDING = -1  # a sampled token whose id is still on the device (see Sequence.pending_row)


class Status(Enum):
    WAITING = "waiting"  # not started, or preempted: to be (re)computed from its tokens
    RUNNING = "running"  # holds KV blocks; prefilling in chunks, then decoding
    FINISHED = "finished"


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose keys came from the prefix cache
    prefill_seconds: float = 0.0  # arrival to first token
    decode_seconds: float = 0.0  # first token to the last
    finish_reason: str = ""

    @property
    def decode_tokens_per_second(self) -> float:
        steps = max(self.generated_tokens - 1, 0)  # the first token comes out of the prefill
        return steps / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model, and the most likely alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    # Characters of its output's text before this token's text: 0 for a step's one token; more
    # once outputs merge (a lagging stream), so each token keeps its own place in the text.
    text_offset: int = 0


@dataclass
class RequestOutput:
    """What one step produced for one request: new tokens and text, and whether it ended."""

    request_id: object
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    error: Exception | None = None
    stats: GenerationStats | None = None  # on the last output of a request


class Sequence:
    def __init__(
        self,
        seq_id: int,
        request_id: object,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        n_pools: int,
        max_len: int,
        logprobs: int | None = None,
    ) -> None:
        """`max_len`: the most tokens (prompt and generated) the sequence may reach, the
        context size or less."""
        self.seq_id = seq_id
        self.request_id = request_id
        self.params = params
        self.token_ids = list(prompt_ids)
        self.n_prompt = len(prompt_ids)
        self.max_len = max_len
        self.max_tokens = params.max_tokens or max_len
        self.logprobs = logprobs
        self.status = Status.WAITING
        self.num_computed = 0  # tokens whose keys are in the KV cache
        self.num_cached = 0  # of them, prompt tokens found in the prefix cache
        self.block_hashes: list[bytes] = []  # of its full computed blocks, in order
        self.reset_blocks(n_pools)
        self.stop_ids = tokenizer.stop_ids
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.stops = StopMatcher(params.stop)
        self.pending_row = -1  # the device row of a PENDING last token's id
        self.finish_reason: str | None = None
        self.arrival = time.perf_counter()
        self.first_token_at = 0.0
        self.finished_at = 0.0

    def reset_blocks(self, n_pools: int) -> None:
        """Hold no block (new, preempted or finished)."""
        self.tables: list[list[int]] = [[] for _ in range(n_pools)]
        self.first_live = [0] * n_pools  # per pool, the lowest logical block still held
        self.block_hashes = []

    @property
    def n_generated(self) -> int:
        return len(self.token_ids) - self.n_prompt

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def prefilling(self) -> bool:
        """Tokens other than the last are still to be computed (a prompt, or a preempted
        sequence's prompt and output)."""
        return self.num_computed < len(self.token_ids) - 1

    def room(self) -> int:
        """Tokens it may still generate (after those sampled, still pending or not)."""
        return min(self.max_tokens - self.n_generated, self.max_len - len(self.token_ids))

    def resolve(self, index: int, token: int) -> tuple[str, str | None]:
        """The sampled id of the token at `index` has arrived: the text it completes and, if the
        sequence ends with it, why ("stop": an end-of-generation token or a stop string;
        "length": the token limit or the context). A sequence that ends drops the token sampled
        after it, if the next step was already queued."""
        self.token_ids[index] = token
        if token in self.stop_ids and not self.params.ignore_eos:
            text, finish = "", "stop"
        else:
            text = self.stops.push(self.detokenizer.push(token))
            finish = "stop" if self.stops.stopped else None
            generated = index + 1 - self.n_prompt
            if finish is None and (generated >= self.max_tokens or index + 1 >= self.max_len):
                finish = "length"
        if finish:
            del self.token_ids[index + 1 :]
            if not self.stops.stopped:  # text held back for a possible stop string
                text += self.stops.push(self.detokenizer.flush()) + self.stops.flush()
        return text, finish

    def stats(self) -> GenerationStats:
        first = self.first_token_at or self.finished_at
        return GenerationStats(
            prompt_tokens=self.n_prompt,
            generated_tokens=self.n_generated,
            cached_tokens=self.num_cached,
            prefill_seconds=max(0.0, first - self.arrival),
            decode_seconds=max(0.0, self.finished_at - first),
            finish_reason=self.finish_reason or "",
        )
