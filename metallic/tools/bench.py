"""`metallic bench`: llama-bench's tests on this machine, with their spread over repetitions.

Tests, in tokens per second (mean and standard deviation over the repetitions; each test runs
first untimed, as warm-up: kernel compiles, graph captures, KV-cache growth, and again while a
warm-up moved device tensors that graphs bake in: a KV cache that grew leaves the memory pool
fragmented, the pool compacts once the engine is idle, and the next run recaptures its graphs):
- pp{P}: a prompt of P random tokens, from its arrival to its first sampled token.
- tg{N}: N tokens generated one at a time after a 1-token prompt (greedy, EOS ignored), from the
  first token to the last.
- batch-{B}: B requests of `batch_prompt` random tokens submitted together, N generated each
  after the first: the aggregate decode speed llama-batched-bench calls S_TG (the tokens
  generated after every sequence has its first one, over that time).

Every prompt is new random tokens, so no prefix cache can serve it. On the GPU the intervals are
timed with CUDA events on the engine's stream (`EventTimer`: an interval ends when the device has
computed the step whose tokens end it), read back once per run; on the CPU with the host clock
as the tokens reach the host (`HostTimer`). The per-op profile (`--profile`) is
tools/profiling.py's.

The JSON document (`SCHEMA`, a JSON Schema) holds the versions, the device, the model, the
settings, every repetition's figure, and the profile when one ran. `bench_record` turns it into
the record format of benchmarks/common.py (tests `pp512`, `tg128`, `batch-8`, ...; engine
`metallic`).
"""

from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from gguf import LlamaFileType

from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.engine.sequence import RequestOutput
from metallic.errors import MetallicError
from metallic.ops.dispatch import use_kernels
from metallic.tools.doctor import device_info, versions
from metallic.tools.profiling import CUDA_EVENTS, HOST_CLOCK, ProfileSession, profile_report

SCHEMA_ID = "metallic-bench/1"

_COUNT = {"type": "integer", "minimum": 1}
_RATE = {"type": "number", "exclusiveMinimum": 0}
_TEXT_OR_NULL = {"type": ["string", "null"]}
SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["schema", "date", "versions", "device", "model", "settings", "results"],
    "properties": {
        "schema": {"enum": [SCHEMA_ID]},
        "date": {"type": "string"},  # ISO 8601, local time
        "versions": {
            "type": "object",
            "required": ["metallic", "torch", "triton", "gguf", "python"],
            "properties": {
                name: _TEXT_OR_NULL for name in ("metallic", "torch", "triton", "gguf", "python")
            },
        },
        "device": {
            "type": "object",
            "required": ["type", "name", "capability", "dtype", "kernels"],
            "properties": {
                "type": {"enum": ["cuda", "cpu"]},
                "name": {"type": "string"},
                "capability": _TEXT_OR_NULL,  # "9.0" on CUDA
                "dtype": {"type": "string"},  # of activations and the KV cache
                "kernels": {"type": "boolean"},  # Triton kernels (else the torch path)
            },
        },
        "model": {
            "type": "object",
            "required": ["name", "path", "architecture", "file_type", "parameters", "size_bytes"],
            "properties": {
                "name": {"type": "string"},
                "path": {"type": "string"},
                "architecture": {"type": "string"},
                "file_type": {"type": "string"},
                "parameters": _COUNT,
                "size_bytes": _COUNT,  # tensor bytes in the file
            },
        },
        "settings": {
            "type": "object",
            "required": [
                "prompt",
                "generate",
                "batch",
                "batch_prompt",
                "repetitions",
                "context",
                "clock",
            ],
            "properties": {
                "clock": {"enum": [HOST_CLOCK, CUDA_EVENTS]},
                "prompt": {"type": "array", "items": _COUNT, "minItems": 1},
                "generate": {"type": "array", "items": _COUNT, "minItems": 1},
                "batch": {"type": "array", "items": _COUNT},
                "batch_prompt": _COUNT,
                "repetitions": _COUNT,
                "context": _COUNT,
            },
        },
        "results": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["test", "kind", "prompt", "generate", "batch", "samples_ts"],
                "properties": {
                    "test": {"type": "string"},  # pp512, tg128, batch-8
                    "kind": {"enum": ["pp", "tg", "batch"]},
                    "prompt": _COUNT,  # tokens per prompt
                    "generate": {"type": "integer", "minimum": 0},  # decoded per sequence
                    "batch": _COUNT,  # sequences together
                    "samples_ts": {"type": "array", "items": _RATE, "minItems": 1},
                    "samples_s": {"type": "array", "items": _RATE, "minItems": 1},
                    "avg_ts": _RATE,
                    "stddev_ts": {"type": "number", "minimum": 0},
                },
            },
        },
        "profile": {"type": "object"},  # metallic/tools/profiling.py: profile_report
    },
}


@dataclass(frozen=True)
class Settings:
    prompt: list[int]
    generate: list[int]
    batch: list[int]
    batch_prompt: int = 128
    repetitions: int = 5
    seed: int = 0

    def context(self) -> int:
        """Tokens one sequence needs at most (prompt, first token and the generated ones)."""
        longest = max(self.generate) + 1
        return max(max(self.prompt) + 1, 1 + longest, self.batch_prompt + longest)


@dataclass(frozen=True)
class Test:
    kind: str  # "pp", "tg" or "batch"
    prompt: int
    generate: int
    batch: int

    @property
    def name(self) -> str:
        if self.kind == "pp":
            return f"pp{self.prompt}"
        return f"tg{self.generate}" if self.kind == "tg" else f"batch-{self.batch}"


def parse_counts(text: str, option: str) -> list[int]:
    """ "512" or "1,8,32": positive integers, else a one-line error naming the option."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise MetallicError(f"{option} takes positive integers separated by commas, not {text!r}")
    return values


def tests_of(settings: Settings) -> list[Test]:
    return (
        [Test("pp", p, 0, 1) for p in settings.prompt]
        + [Test("tg", 1, n, 1) for n in settings.generate]
        + [Test("batch", settings.batch_prompt, settings.generate[0], b) for b in settings.batch]
    )


def random_prompts(vocab: int, n: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=generator).tolist() for _ in range(n)]


class HostTimer:
    """The host clock, read as each step's tokens reach the host: where steps run on the CPU,
    the host is the device."""

    name = HOST_CLOCK

    def start(self) -> float:
        return time.perf_counter()

    def step(self, engine: Engine) -> tuple[list[RequestOutput], float]:
        outputs = engine.step()
        return outputs, time.perf_counter()

    def finish(self) -> None:
        """Nothing to wait for: the stamps are already times."""

    def seconds(self, start: float, stop: float) -> float:
        return stop - start


class EventTimer:
    """CUDA events on the engine's stream, read once per run (`finish`). The engine queues step
    n + 1 before it reads step n's tokens, so the event recorded just before a call to
    `engine.step()` completes when the device has finished step n, the step whose tokens that
    call returns: stamps are the device's times, free of the host's lag in reading them."""

    name = CUDA_EVENTS

    def __init__(
        self,
        device: torch.device,
        new_event: Callable[[], Any] | None = None,
        stream: Any = None,
    ) -> None:
        """`new_event` and `stream`: what to record on, by default timing events on the
        device's current stream (tests pass stand-ins)."""
        self.device = device
        self.new_event = new_event or (lambda: torch.cuda.Event(enable_timing=True))
        self.stream = stream
        self._last: Any = None

    def start(self) -> Any:
        event = self.new_event()
        stream = torch.cuda.current_stream(self.device) if self.stream is None else self.stream
        event.record(stream)
        self._last = event
        return event

    def step(self, engine: Engine) -> tuple[list[RequestOutput], Any]:
        stamp = self.start()
        return engine.step(), stamp

    def finish(self) -> None:
        """Wait once for the run's last event; every earlier one has completed then."""
        self._last.synchronize()

    def seconds(self, start: Any, stop: Any) -> float:
        return start.elapsed_time(stop) * 1e-3


def timer_for(device: torch.device) -> HostTimer | EventTimer:
    """CUDA events on the GPU, the host clock on the CPU."""
    return EventTimer(device) if device.type == "cuda" else HostTimer()


def run_once(
    engine: Engine, test: Test, seed: int, timer: HostTimer | EventTimer | None = None
) -> tuple[int, float]:
    """(tokens, seconds) of one run of `test` on fresh prompts, timed by `timer` (by default
    the engine's device's: `timer_for`)."""
    timer = timer or timer_for(engine.device)
    prompts = random_prompts(engine.config.vocab_size, test.batch, test.prompt, seed)
    max_tokens = 1 if test.kind == "pp" else test.generate + 1
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    began = timer.start()
    requests = {engine.add_request(prompt, params) for prompt in prompts}
    stamps: list[Any] = []  # one per step call
    first: dict[object, int] = {}  # each sequence's first token: the index of its step's stamp
    arrivals: list[int] = []  # the same for every token after a sequence's first
    while engine.has_unfinished():
        outputs, stamp = timer.step(engine)
        stamps.append(stamp)
        for out in outputs:
            if out.error is not None:
                raise out.error
            if out.request_id in requests and out.token_ids:
                if out.request_id in first:
                    arrivals.append(len(stamps) - 1)
                else:
                    first[out.request_id] = len(stamps) - 1
    timer.finish()
    times = [timer.seconds(began, stamp) for stamp in stamps]
    if test.kind == "pp":
        return test.prompt, times[first[next(iter(requests))]]
    decode_from = max(times[i] for i in first.values())
    decoded = [times[i] for i in arrivals if times[i] > decode_from]
    if not decoded:
        raise MetallicError(f"{test.name}: no token was decoded after the first ones")
    return len(decoded), max(decoded) - decode_from


MAX_WARM_UPS = 3  # untimed runs of a test at most (see the module docstring)


def _graph_inputs(engine: Engine) -> tuple[object, ...]:
    """What captured graphs depend on: a change means the next step recaptures."""
    return engine.store.generation, engine.residency.version


def run_tests(
    engine: Engine,
    settings: Settings,
    progress: Callable[[str], None] | None = None,
    timer: HostTimer | EventTimer | None = None,
) -> list[dict[str, Any]]:
    """Every test: warm-up runs (until one leaves the graphs' inputs in place), then
    `repetitions` timed runs (by `timer`, by default the device's)."""
    timer = timer or timer_for(engine.device)
    results = []
    for number, test in enumerate(tests_of(settings)):
        seed = settings.seed + 1000 * number
        for warm_up in range(MAX_WARM_UPS):
            if progress is not None:
                progress(f"{test.name}: warm-up")
            moved = _graph_inputs(engine)
            run_once(engine, test, seed - warm_up - 1, timer)
            if _graph_inputs(engine) == moved:
                break
        samples_ts, samples_s = [], []
        for rep in range(1, settings.repetitions + 1):
            if progress is not None:
                progress(f"{test.name}: run {rep}/{settings.repetitions}")
            tokens, seconds = run_once(engine, test, seed + rep, timer)
            samples_ts.append(tokens / seconds)
            samples_s.append(seconds)
        results.append(
            {
                "test": test.name,
                "kind": test.kind,
                "prompt": test.prompt,
                "generate": test.generate,
                "batch": test.batch,
                "samples_ts": samples_ts,
                "samples_s": samples_s,
                "avg_ts": statistics.fmean(samples_ts),
                "stddev_ts": statistics.stdev(samples_ts) if len(samples_ts) > 1 else 0.0,
            }
        )
    return results


def profile_tests(engine: Engine, settings: Settings, trace: Path | None = None) -> dict[str, Any]:
    """The profile of one tg run (its decode steps), one pp run (its prefill) and, for each -b
    size B, one batch run's decode steps (phase "decode-bB": B rows a step), all warm; with
    `trace`, a trace of the runs is written there."""
    session = ProfileSession(engine, trace=trace)
    runs = [
        (Test("tg", 1, settings.generate[0], 1), "decode", "decode"),
        (Test("pp", settings.prompt[0], 0, 1), "prefill", "prefill"),
    ]
    for b in settings.batch:
        runs.append(
            (
                Test("batch", settings.batch_prompt, settings.generate[0], b),
                "decode",
                f"decode-b{b}",
            )
        )
    phases = {}
    try:
        for test, phase, name in runs:
            session.reset()
            run_once(engine, test, settings.seed + 999_999)
            phases[name] = session.phases()[phase]
    finally:
        session.stop()
    return profile_report(engine, phases)


def model_info(engine: Engine, name: str | None) -> dict[str, Any]:
    gguf = engine.gguf
    params = sum(t.n_elements for t in gguf)
    file_type = gguf.metadata.get("general.file_type")
    try:
        type_name = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_")  # type: ignore[arg-type]
        type_name = type_name.removeprefix("ALL_")
    except (TypeError, ValueError):
        type_name = "unknown"
    arch = gguf.architecture
    return {
        "name": name or f"{arch} {_count(params)} {type_name}",
        "path": str(engine.path),
        "architecture": arch,
        "file_type": type_name,
        "parameters": params,
        "size_bytes": gguf.tensor_bytes,
    }


def bench_document(
    engine: Engine, settings: Settings, results: list[dict[str, Any]], name: str | None = None
) -> dict[str, Any]:
    device = device_info(engine.device)
    return {
        "schema": SCHEMA_ID,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "versions": versions(),
        "device": {
            "type": device["type"],
            "name": device["name"],
            "capability": device["capability"],
            "dtype": str(engine.model.act_dtype).removeprefix("torch."),
            "kernels": use_kernels(engine.device),
        },
        "model": model_info(engine, name),
        "settings": {
            "prompt": settings.prompt,
            "generate": settings.generate,
            "batch": settings.batch,
            "batch_prompt": settings.batch_prompt,
            "repetitions": settings.repetitions,
            "context": engine.context_size,
            "seed": settings.seed,
            "clock": timer_for(engine.device).name,
        },
        "results": results,
    }


def format_table(doc: dict[str, Any]) -> str:
    """A markdown table with llama-bench's columns."""
    model, device = doc["model"], doc["device"]
    backend = f"{'CUDA' if device['type'] == 'cuda' else 'CPU'} {device['dtype']}"
    if device["type"] == "cpu" and device["kernels"]:
        backend += " (Triton interpreter)"
    size = model["size_bytes"]
    size_text = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.2f} MiB"
    lines = [
        "| model | size | params | backend | test | t/s |",
        "| --- | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in doc["results"]:
        lines.append(
            f"| {model['name']} | {size_text} | {_count(model['parameters'])} | {backend} | "
            f"{r['test']} | {r['avg_ts']:.2f} ± {r['stddev_ts']:.2f} |"
        )
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def source_commit() -> str:
    """$METALLIC_COMMIT when set (a copy of the tree on another machine may carry an older
    .git), else the git commit metallic runs from, else "unknown"."""
    if os.environ.get("METALLIC_COMMIT"):
        return os.environ["METALLIC_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def bench_record(doc: dict[str, Any], model: str, command: str) -> dict[str, Any]:
    """The run as a record (benchmarks/common.py): one row per test, engine `metallic`."""
    return {
        "device": doc["device"]["name"],
        "date": doc["date"][:10],
        "commit": source_commit(),
        "command": command,
        "rows": [
            {
                "model": model,
                "test": r["test"],
                "engine": "metallic",
                "value": round(r["avg_ts"], 3),
                "unit": "tok/s",
            }
            for r in doc["results"]
        ],
    }
