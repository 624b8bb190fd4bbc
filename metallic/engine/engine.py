"""The engine: many requests at once, one step at a time.

`add_request` queues a prompt, `step` runs one model step for every running sequence (the
scheduler decides what, the model runner computes it) and returns what each request got, `abort`
drops a request and frees its KV blocks. `generate`, `stream`, `generate_tokens` and
`generate_batch` are loops over these.

Steps overlap the host with the device: `step` queues the next step (decode inputs still on the
device feed it there) before it reads the tokens of the one in flight, so the GPU computes while
the host detokenizes, matches stop strings and schedules. A sequence that turns out to have ended
has computed one token too many, which nobody sees.

One thread may drive `step` while others call `add_request` and `abort`: requests wait in an
inbox that the next step takes in, and everything else happens under the engine's lock.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from metallic.engine.arguments import (
    PromptTooLong,
    check_load_options,
    check_token_ids,
    encode_prompt,
)
from metallic.engine.blocks import BlockManager
from metallic.engine.loader import load_model
from metallic.engine.model_runner import Launched, ModelRunner
from metallic.engine.planner import KVPlanner
from metallic.engine.sampling import Sampler, SamplingParams
from metallic.engine.scheduler import KVCacheTooSmall, Scheduler
from metallic.engine.sequence import GenerationStats, RequestOutput, Status, TokenLogprob
from metallic.engine.sequence import Sequence as Seq
from metallic.errors import MetallicError
from metallic.models.kv_store import KVStore
from metallic.runtime.placement import KVBudgetExceeded
from metallic.runtime.transfer import PinnedRing

PREFILL_CHUNK = 512  # the most tokens of one sequence in a step (bounds attention's scores)
DEFAULT_MAX_SEQS = 64  # sequences running at once

log = logging.getLogger("metallic")


class BatchError(MetallicError):
    """Some requests of a batch failed; the others completed (see `completions`)."""

    def __init__(self, message: str, completions: list[Completion]) -> None:
        super().__init__(message)
        self.completions = completions


@dataclass
class GeneratedToken:
    """One step's result: the chosen id, its text piece, and optionally the top log-probs."""

    token_id: int
    text: str
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class StepTimes:
    """Host seconds per phase of `step`, summed over steps. While the device keeps up, `wait`
    (for the tokens of the step in flight) is where it computes; the rest is host work that a
    step on the device must outlast for the host not to be the limit."""

    steps: int = 0
    schedule: float = 0.0  # what runs next, KV blocks, growth, preemption
    launch: float = 0.0  # batch, forward and sampling queued, prefix blocks hashed
    wait: float = 0.0  # the previous step's tokens reaching the host
    collect: float = 0.0  # detokenizing, stop strings, ending requests


@dataclass
class Completion:
    """A finished request of a batch: its text and ids, or the error that ended it."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    error: Exception | None = None


class Engine:
    """A loaded model serving requests; create it with `metallic.load`."""

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        context_size: int | None = None,
        native: bool | None = None,
        cuda_graphs: bool = True,
        progress: Callable[[int, int], None] | None = None,
        gpu_layers: int | None = None,
        memory_budget: int | str | None = None,
        max_num_seqs: int = DEFAULT_MAX_SEQS,
        max_kv_tokens: int | None = None,
        prefix_cache: bool = True,
        context_override: bool = False,
    ) -> None:
        """`context_size`: the most tokens (prompt and output) of one sequence (default: the
        model's, at most 4096); `max_num_seqs`: sequences running at once (more wait their
        turn); `prefix_cache`: reuse the KV blocks of prompts' shared beginnings. `gpu_layers`
        keeps only the first N layers on the device and streams the rest from the host;
        `memory_budget` (bytes, or text such as "2G") plans placement to fit it, KV cache
        included, and moves layers to the host when the KV cache outgrows what is left.
        `path` may name a known model (`metallic models`); `context_size` may not pass the
        model's training context unless `context_override`. See `loader.load_model` for the
        rest."""
        check_load_options(
            path,
            device=device,
            dtype=dtype,
            context_size=context_size,
            context_override=context_override,
            native=native,
            cuda_graphs=cuda_graphs,
            progress=progress,
            gpu_layers=gpu_layers,
            memory_budget=memory_budget,
        )
        for name, value in (("max_num_seqs", max_num_seqs), ("max_kv_tokens", max_kv_tokens)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise TypeError(f"{name} must be an integer, got {value!r}")
            if value is not None and value < 1:
                raise MetallicError(f"{name} must be at least 1, got {value}")
        step_tokens = max(PREFILL_CHUNK, max_num_seqs)
        loaded = load_model(
            path,
            device=device,
            dtype=dtype,
            context_size=context_size,
            context_override=context_override,
            step_tokens=step_tokens,
            n_seqs=max_num_seqs,
            native=native,
            progress=progress,
            gpu_layers=gpu_layers,
            memory_budget=memory_budget,
        )
        self.path, self.gguf, self.config = loaded.path, loaded.gguf, loaded.config
        self.tokenizer, self.device, self.dtype = loaded.tokenizer, loaded.device, loaded.dtype
        self.plan, self.memory, self.staging = loaded.plan, loaded.memory, loaded.staging
        self.residency, self.model = loaded.residency, loaded.model
        self.context_size = loaded.context_size
        max_num_seqs = loaded.max_seqs  # a device budget may admit fewer
        layout, scratch = loaded.layout, loaded.kv_sizes.scratch
        self._kv_sizes = loaded.kv_sizes
        most = loaded.kv_sizes.most(max_num_seqs)
        if max_kv_tokens is not None:
            most = [min(n, -(-max_kv_tokens // layout.block_size) + scratch) for n in most]
        start = [min(n, top) for n, top in zip(loaded.kv_start, most, strict=True)]
        self.store = KVStore(layout, start, self.config, self.device, loaded.act_dtype, self.memory)
        self.blocks = BlockManager(layout, start, scratch, prefix_cache)
        self.planner = KVPlanner(self.store, self.blocks, self.residency, most)
        self.scheduler = Scheduler(
            self.blocks, self.planner, max_num_seqs, step_tokens, PREFILL_CHUNK
        )
        uploads = PinnedRing(self.device, slots=16)
        self.sampler = Sampler(
            self.config.vocab_size, self.device, sorted(self.tokenizer.stop_ids), uploads.upload
        )
        self.runner = ModelRunner(
            self.model,
            self.store,
            self.blocks,
            self.sampler,
            self.context_size,
            _prefill_bucket,
            cuda_graphs,
            lambda: self.residency.version,
            uploads,
            budgeted=self.plan is not None and self.plan.budget is not None,
        )
        self.last_stats = GenerationStats()
        self.step_times = StepTimes()
        self.failure: Exception | None = None  # the last exception a step ran into
        self._lock = threading.RLock()
        self._inbox: deque[Seq] = deque()  # added, not yet taken in by a step
        self._aborts: deque[object] = deque()
        self._active: dict[object, Seq] = {}  # request id -> its sequence, until it ends
        self._request_ids = itertools.count()  # for requests that bring no id
        self._seq_ids = itertools.count()  # the sampler's keys: unique whatever the ids
        self._in_flight: Launched | None = None
        self._ended: list[RequestOutput] = []  # outputs of requests ended between steps

    # Requests: the engine loop.

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        request_id: object = None,
        logprobs: int | None = None,
        truncate: bool = False,
    ) -> object:
        """Queue a prompt (text, or token ids) for generation; returns its request id (the one
        given, or a new integer). `logprobs`: report each generated token's log-probability
        and that many alternatives. Bad parameters or a prompt that does not fit raise here,
        before anything is scheduled."""
        params = params or SamplingParams()
        params.validate()
        if logprobs is not None and (isinstance(logprobs, bool) or not 0 <= logprobs <= 1000):
            raise MetallicError(f"logprobs must be an integer in [0, 1000], got {logprobs!r}")
        ids = self.encode_prompt(prompt, truncate=truncate, max_tokens=params.max_tokens)
        self._check_fits(len(ids) + 1)
        with self._lock:
            if request_id is None:
                request_id = next(self._request_ids)
                while request_id in self._active:  # a caller chose this number before
                    request_id = next(self._request_ids)
            elif request_id in self._active:
                raise MetallicError(f"request id {request_id!r} is already in use")
            seq = Seq(
                next(self._seq_ids),
                request_id,
                ids,
                params,
                self.tokenizer,
                len(self.blocks.pools),
                self.context_size,
                logprobs,
            )
            self._active[request_id] = seq
            self._inbox.append(seq)
        return request_id

    def abort(self, request_id: object) -> None:
        """End a request now: its KV blocks go back at once when no step is running, else as
        the running step ends. Unknown or finished ids are ignored."""
        self._aborts.append(request_id)
        if self._lock.acquire(blocking=False):
            try:
                self._ended += self._take_inbox()
            finally:
                self._lock.release()

    def has_unfinished(self) -> bool:
        queued = self._inbox or self._aborts or self._ended  # _ended: aborted between steps
        return bool(queued or self.scheduler.has_work() or self._in_flight)

    def step(self) -> list[RequestOutput]:
        """Run one step: queue the next piece of work, then collect the tokens of the step
        queued before it. Returns what each request got; a request's last output has
        `finished` set. An exception inside ends every request with it as their error."""
        with self._lock:
            outputs, self._ended = self._ended, []
            outputs += self._take_inbox()
            times = self.step_times
            try:
                began = time.perf_counter()
                work = self.scheduler.schedule()
                for seq in work.failed:
                    error = KVBudgetExceeded(
                        f"the KV cache cannot hold a sequence of {len(seq.token_ids)} tokens "
                        "even alone (raise --gpu-memory or lower --ctx-size)"
                    )
                    outputs.append(self._end(seq, "error", error))
                scheduled = time.perf_counter()
                launched = self.runner.launch(work, self._in_flight) if work.chunks else None
                for chunk in work.chunks:
                    self.blocks.commit(chunk.seq)
                previous, self._in_flight = self._in_flight, launched
                queued = time.perf_counter()
                if previous is not None:
                    fetched = previous.fetch()
                    arrived = time.perf_counter()
                    outputs += self._collect(previous, *fetched)
                    times.wait += arrived - queued
                    times.collect += time.perf_counter() - arrived
                times.steps += 1
                times.schedule += scheduled - began
                times.launch += queued - scheduled
                if not self.has_unfinished():
                    self.planner.relieve()
            except Exception as err:
                outputs += self._fail_all(err)
            return outputs

    def _take_inbox(self) -> list[RequestOutput]:
        """Take in the requests added and aborted since the last step."""
        outputs = []
        while self._inbox:
            seq = self._inbox.popleft()
            self.sampler.add(seq.seq_id, seq.params, seq.token_ids)
            self.scheduler.add(seq)
        while self._aborts:
            seq = self._active.get(self._aborts.popleft())
            if seq is not None:
                outputs.append(self._end(seq, "abort"))
        return outputs

    def _collect(
        self, launched: Launched, ids: list[int], logprobs: list[list[float]]
    ) -> list[RequestOutput]:
        """The tokens of a step that ran: resolve them, detokenize, and end what ended."""
        by_row = dict(zip(launched.logprob_rows, logprobs, strict=True))
        now = time.perf_counter()
        outputs = []
        for row, (seq, index) in enumerate(launched.sampled):
            if seq.finished:  # ended (or aborted) after this step was queued
                continue
            token = ids[row]
            text, finish = seq.resolve(index, token)
            seq.first_token_at = seq.first_token_at or now
            out = RequestOutput(seq.request_id, [token], text)
            if seq.logprobs is not None:
                values, k, n = by_row[row], launched.top_k, seq.logprobs
                top = list(zip(map(int, values[1 : 1 + n]), values[1 + k : 1 + k + n], strict=True))
                out.logprobs = [TokenLogprob(token, values[0], top)]
            if finish:
                end = self._end(seq, finish)
                out.finished, out.finish_reason, out.stats = True, finish, end.stats
            outputs.append(out)
        for chunk in launched.step.chunks:
            if chunk.seq.status is Status.RUNNING:
                self.blocks.commit(chunk.seq)
        return outputs

    def _end(self, seq: Seq, reason: str, error: Exception | None = None) -> RequestOutput:
        """Finish `seq`: its blocks and sampler state go back, its id is free again."""
        if seq in self._inbox:  # added while a step ran, never taken in
            self._inbox.remove(seq)
        else:
            self.scheduler.remove(seq)
            self.sampler.remove(seq.seq_id)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.finished_at = time.perf_counter()
        del self._active[seq.request_id]
        return RequestOutput(seq.request_id, [], "", None, True, reason, error, stats=seq.stats())

    def _fail_all(self, error: Exception) -> list[RequestOutput]:
        """A step failed: every request ends with the error, and the engine starts afresh."""
        if not isinstance(error, MetallicError):
            log.exception("engine step failed")
        self.failure = error
        self._in_flight = None
        return [self._end(seq, "error", error) for seq in list(self._active.values())]

    # One request, or a batch, from start to end (the caller drives the engine).

    def generate_tokens(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        logprobs: int = 0,
        truncate: bool = False,
    ) -> Iterator[GeneratedToken]:
        """Yield each generated token with its text piece until EOS, a stop string or the limit.

        Drives the engine itself: do not use while another thread calls `step`."""
        request = self.add_request(prompt, params, logprobs=logprobs or None, truncate=truncate)
        ended = False
        try:
            while not ended:
                for out in self.step():
                    if out.request_id != request:
                        continue
                    ended = out.finished
                    if out.error is not None:
                        raise out.error
                    top = out.logprobs[0].top if out.logprobs else []
                    for token in out.token_ids:
                        yield GeneratedToken(token, out.text, top)
                    if out.stats is not None:
                        self.last_stats = out.stats
        finally:
            if not ended:
                self.abort(request)
            self._settle()

    def stream(
        self, prompt: str | list[int], max_tokens: int = 256, **sampling: object
    ) -> Iterator[str]:
        """Yield text pieces as they are generated (keyword arguments: `SamplingParams` fields)."""
        params = _params(max_tokens, sampling)
        for step in self.generate_tokens(prompt, params):
            if step.text:
                yield step.text

    def generate(self, prompt: str | list[int], max_tokens: int = 256, **sampling: object) -> str:
        """The whole completion of `prompt` as one string."""
        return "".join(self.stream(prompt, max_tokens, **sampling))

    def generate_batch(
        self, prompts: Sequence[str | list[int]], max_tokens: int = 256, **sampling: object
    ) -> list[str]:
        """The completions of many prompts, run together (keyword arguments: `SamplingParams`
        fields, shared by all). If some fail, the others still complete, and a `BatchError`
        carries every completion."""
        return [c.text for c in self.complete_batch(prompts, _params(max_tokens, sampling))]

    def generate_batch_tokens(
        self, prompts: Sequence[str | list[int]], max_tokens: int = 256, **sampling: object
    ) -> list[list[int]]:
        """`generate_batch`, returning each completion's token ids."""
        completions = self.complete_batch(prompts, _params(max_tokens, sampling))
        return [c.token_ids for c in completions]

    def complete_batch(
        self, prompts: Sequence[str | list[int]], params: SamplingParams
    ) -> list[Completion]:
        """Run every prompt to its end; see `generate_batch`."""
        params.validate()
        completions = [Completion() for _ in prompts]
        index: dict[object, int] = {}
        for i, prompt in enumerate(prompts):
            try:
                index[self.add_request(prompt, params)] = i
            except MetallicError as err:
                completions[i].error = err
        pending = set(index)
        try:
            while pending:
                for out in self.step():
                    if out.request_id not in pending:
                        continue
                    done = completions[index[out.request_id]]
                    done.text += out.text
                    done.token_ids += out.token_ids
                    if out.finished:
                        done.finish_reason = out.finish_reason or ""
                        done.error = out.error
                        pending.discard(out.request_id)
        finally:
            for request in pending:
                self.abort(request)
            self._settle()
        failed = [(i, c.error) for i, c in enumerate(completions) if c.error is not None]
        if failed:
            first, error = failed[0]
            raise BatchError(
                f"{len(failed)} of {len(prompts)} requests failed (request {first}: {error})",
                completions,
            )
        return completions

    def _settle(self) -> None:
        """Finish the step still in flight when no request is left, so the engine is idle."""
        while self.has_unfinished() and not self._active:
            self.step()

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Teacher-forced logits [len, vocab] of every position (for evaluation and tests)."""
        check_token_ids(token_ids, self.config.vocab_size)
        if len(token_ids) > self.context_size:
            raise PromptTooLong(
                f"the sequence has {len(token_ids)} tokens but the context holds "
                f"{self.context_size} (raise --ctx-size or shorten it)"
            )
        with self._lock:
            self._settle()
            seq = Seq(-1, None, token_ids, SamplingParams(), self.tokenizer, 0, 0)
            seq.reset_blocks(len(self.blocks.pools))
            rows = []
            try:
                for start in range(0, len(token_ids), PREFILL_CHUNK):
                    end = min(len(token_ids), start + PREFILL_CHUNK)
                    if not self.blocks.reserve(seq, start, end) and not (
                        self.planner.grow(self.blocks.missing(seq, end))
                        and self.blocks.reserve(seq, start, end)
                    ):
                        raise KVBudgetExceeded(
                            f"the KV cache cannot hold {end} positions "
                            "(raise --gpu-memory or lower --ctx-size)"
                        )
                    rows.append(self.runner.forward_chunk(seq, start, end))
                return torch.cat(rows)
            finally:
                self.blocks.release(seq)
                self.planner.relieve()

    # Prompts and what the engine holds.

    def encode_prompt(
        self, prompt: str | list[int], *, truncate: bool = False, max_tokens: int | None = None
    ) -> list[int]:
        """The prompt's token ids as they enter the context (`--truncate`: its end, keeping a
        BOS, with room for `max_tokens`)."""
        return encode_prompt(
            prompt,
            self.tokenizer,
            self.context_size,
            self.config.vocab_size,
            truncate=truncate,
            max_tokens=max_tokens,
        )

    def _check_fits(self, n_tokens: int) -> None:
        """A sequence of `n_tokens` must fit the KV cache at its largest, alone."""
        bs, scratch = self.blocks.block_size, len(self.blocks.scratch_tables[0])
        layout, planner = self.store.layout, self.planner
        # Alone, a sequence holds all its blocks, or on a windowed pool the window's.
        need = [scratch + min(-(-n_tokens // bs), n) for n in self._kv_sizes.per_sequence]
        most = min(top - scratch for top in planner.max_blocks) * bs
        if any(n > top for n, top in zip(need, planner.max_blocks, strict=True)):
            raise KVCacheTooSmall(
                f"a sequence of {n_tokens} tokens does not fit a KV cache of {most} tokens "
                "(raise max_kv_tokens)"
            )
        limit = planner.max_kv_bytes()
        if limit is not None and layout.bytes(need) > limit:
            raise KVBudgetExceeded(
                f"the KV cache needs {layout.bytes(need) / 2**20:.0f} MiB for a {n_tokens}-token "
                f"sequence but the device budget leaves it at most {limit / 2**20:.0f} MiB "
                "(raise --gpu-memory or lower --ctx-size)"
            )

    def stats(self) -> dict[str, object]:
        """Where memory went and how requests ran: device, weight and KV-cache bytes, the KV
        pools (blocks held and cached per window), placement, the memory pool, the scheduler,
        the prefix cache, and the last `generate`'s figures."""
        layout = self.store.layout
        pools = [
            stats
            | {
                "layers": layout.layer_pool.count(p),
                "bytes": self.store.pool_bytes(p),
            }
            for p, stats in enumerate(self.blocks.stats())
        ]
        blocks = self.blocks
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "weight_bytes": self.residency.weight_bytes(),
            "kv_cache_bytes": self.store.nbytes,
            "kv_pools": pools,
            "placement": self.residency.stats(self.config.n_layers),
            "memory_pool": self.memory.stats() if self.memory is not None else None,
            "staging": self.staging.stats(),
            "scheduler": {
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting) + len(self._inbox),
                "preemptions": self.scheduler.preemptions,
                "steps": self.runner.steps,
                "kv_growths": self.planner.growths,
            },
            "prefix_cache": {
                "queries": blocks.queries,
                "prompt_tokens": blocks.looked_up,
                "hit_tokens": blocks.hits,
            },
            "step_times": vars(self.step_times),
            "last_run": vars(self.last_stats),
        }


def _prefill_bucket(n_tokens: int) -> int:
    """Token counts of a prompt chunk that get a captured graph: powers of two from 16 up to
    PREFILL_CHUNK. A chunk is padded up to its bucket: at most 2x the tokens, against launch
    costs that exceed the whole prefill's GPU time on small models."""
    return min(PREFILL_CHUNK, max(16, 1 << (n_tokens - 1).bit_length()))


def _params(max_tokens: int, sampling: dict[str, object]) -> SamplingParams:
    known = SamplingParams.__dataclass_fields__
    unknown = sorted(set(sampling) - set(known))
    if unknown:
        raise MetallicError(f"unknown sampling option(s): {', '.join(unknown)}")
    if "stop" in sampling and isinstance(sampling["stop"], (list, str)):
        stop = sampling["stop"]
        sampling = {**sampling, "stop": (stop,) if isinstance(stop, str) else tuple(stop)}
    return replace(SamplingParams(), max_tokens=max_tokens, **sampling)  # type: ignore[arg-type]


def load(path: str | Path | None = None, **options: object) -> Engine:
    """Open a GGUF model (default: Gemma 3 270M Q4_K_M) and return a ready `Engine`."""
    return Engine(path, **options)  # type: ignore[arg-type]
