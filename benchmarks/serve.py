"""Serving through HTTP: `metallic serve` under Poisson load, and 64 streams against the engine.

For each model (--model, the real Gemma 3 270M; --synthetic llama3-8b):

1. In-process references: the engine alone in this process greedily completes 4 prompts one at
   a time (the server must give the same text), then runs the stream burst: --streams requests
   of 128 random prompt tokens, 256 generated each (EOS ignored), submitted together.
2. `metallic serve` starts as a subprocess on a free port (its log goes to serve-LABEL.log).
   Correctness first: the 4 prompts, one at a time, must give the in-process texts (else the run
   stops). Then the same stream burst through HTTP, streamed. Burst figures on both sides:
   generated tokens / seconds from the first request to the last token, and llama-batched-bench's
   S_TG: tokens per second over the steps where every stream decodes (from the moment the last
   has its first token to the moment the first ends); the target is HTTP >= 90% of in-process.
3. The rate sweep: a fixed-seed workload (prompts of 128-1,024 random tokens, 64-256 generated)
   arriving as a Poisson process at each --rates (requests/s) for --duration seconds. Per rate:
   requests/s and generated tokens/s completed, time to first token and inter-token latency
   (a chunk of n tokens counts as n gaps of a nth of its wait; chunks carry the usage so far),
   p50 and p99.
4. --llama-bin DIR: llama-batched-bench on the same file (128 prompt tokens, 256 generated, the
   same batch sizes up to --streams) beside it.

Clients run in --clients processes (asyncio + httpx2, which the openai package brings), so the
client is not what is measured. Prints a table, writes serve.json and a record (common.py).
`--smoke` checks the script on the CPU in a minute: a tiny synthetic model, one low rate.

    python benchmarks/serve.py --model gemma.gguf --synthetic llama3-8b [--llama-bin DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import httpx2
import torch
from batched import burst as burst_in_process
from common import (
    device_name,
    llama_batched_bench,
    out_dir,
    row,
    synthetic_model,
    write_record,
)

from metallic.engine.engine import Engine
from metallic.gguf.reader import open_gguf

STREAM_PROMPT, STREAM_GENERATED = 128, 256
CHECK_PROMPTS, CHECK_TOKENS = 4, 32


@dataclass
class Job:
    """One request of a workload: when it is sent (seconds after the start), what it asks."""

    index: int
    arrival: float
    prompt: list[int]
    max_tokens: int


@dataclass
class Sizes:
    """The run's shape; --smoke shrinks it to seconds on a CPU."""

    prompt: tuple[int, int] = (128, 1024)
    generated: tuple[int, int] = (64, 256)
    stream_prompt: int = STREAM_PROMPT
    stream_generated: int = STREAM_GENERATED


def random_prompt(rng: random.Random, vocab: int, length: int) -> list[int]:
    return [rng.randrange(100, vocab) for _ in range(length)]


def poisson_workload(rate: float, n: int, vocab: int, sizes: Sizes, seed: int) -> list[Job]:
    rng = random.Random(seed)
    jobs, now = [], 0.0
    for i in range(n):
        now += rng.expovariate(rate)
        prompt = random_prompt(rng, vocab, rng.randint(*sizes.prompt))
        jobs.append(Job(i, now, prompt, rng.randint(*sizes.generated)))
    return jobs


def burst_workload(n: int, vocab: int, sizes: Sizes, seed: int) -> list[Job]:
    rng = random.Random(seed)
    prompts = [random_prompt(rng, vocab, sizes.stream_prompt) for _ in range(n)]
    return [Job(i, 0.0, p, sizes.stream_generated) for i, p in enumerate(prompts)]


# Clients (in worker processes).


def run_clients(base: str, jobs: list[Job], start_at: float) -> list[dict]:
    """Send `jobs` at their arrival times after `start_at` (time.monotonic, the same clock in
    every process); each one's send time, chunk arrival times, token count and text."""
    return asyncio.run(_clients(base, jobs, start_at))


async def _clients(base: str, jobs: list[Job], start_at: float) -> list[dict]:
    limits = httpx2.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx2.AsyncClient(base_url=base, timeout=None, limits=limits) as client:
        return await asyncio.gather(*(_request(client, job, start_at) for job in jobs))


async def _request(client: httpx2.AsyncClient, job: Job, start_at: float) -> dict:
    await asyncio.sleep(max(0.0, start_at + job.arrival - time.monotonic()))
    body = {
        "prompt": job.prompt,
        "max_tokens": job.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    sent = time.monotonic()
    stamps, counts, text, tokens = [], [], [], 0
    async with client.stream("POST", "/v1/completions", json=body) as reply:
        if reply.status_code != 200:
            return {"index": job.index, "error": (await reply.aread()).decode()}
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"index": job.index, "error": chunk["error"]["message"]}
            so_far = chunk["usage"]["completion_tokens"]
            if chunk["choices"]:
                stamps.append(time.monotonic())
                counts.append(so_far - tokens)
                text.append(chunk["choices"][0]["text"])
            tokens = so_far
    return {"index": job.index, "sent": sent, "stamps": stamps, "counts": counts,
            "tokens": tokens, "text": "".join(text), "expected": job.max_tokens}  # fmt: skip


def drive(pool: ProcessPoolExecutor, base: str, jobs: list[Job], clients: int) -> list[dict]:
    """Spread `jobs` over the client processes, start them together, gather every result."""
    start_at = time.monotonic() + 1.0  # time for the workers to receive their share
    shares = [jobs[i::clients] for i in range(clients)]
    futures = [pool.submit(run_clients, base, share, start_at) for share in shares if share]
    results = sorted((r for f in futures for r in f.result()), key=lambda r: r["index"])
    failed = [r for r in results if "error" in r or r["tokens"] != r["expected"]]
    if failed:
        raise SystemExit(f"{len(failed)} of {len(jobs)} requests failed, e.g. {failed[0]}")
    return results


# Figures.


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def http_burst(results: list[dict]) -> dict:
    """Aggregate generated tokens/s of a burst through HTTP as batched.burst measures it in
    process: over all of it, and over the steps where every stream decodes (from the moment the
    last stream has its first token to the moment the first one ends). A streamed chunk may
    carry several tokens (the server merges what a lagging client has not taken yet): each
    chunk's count comes from the usage so far that it carries."""
    stamps = [t for r in results for t in r["stamps"]]
    began = min(r["sent"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    end = max(stamps)
    all_decoding = max(r["stamps"][0] for r in results)
    first_end = min(r["stamps"][-1] for r in results)
    decoded = 0.0
    for r in results:
        stamped = zip(r["stamps"], r["counts"], strict=True)
        decoded += sum(n for t, n in stamped if all_decoding < t <= first_end)
    return {
        "tokens_per_s": tokens / (end - began),
        "s_tg": decoded / (first_end - all_decoding) if decoded else 0.0,
        "seconds": end - began,
    }


def rate_figures(results: list[dict]) -> dict:
    began = min(r["sent"] for r in results)
    end = max(r["stamps"][-1] for r in results)
    gaps = [  # a chunk of n tokens: n gaps of a nth of the time since the previous chunk
        (b - a) / n
        for r in results
        for a, b, n in zip(r["stamps"], r["stamps"][1:], r["counts"][1:], strict=False)
        for _ in range(n)
    ]
    ttft = [r["stamps"][0] - r["sent"] for r in results]
    return {
        "requests": len(results),
        "seconds": end - began,
        "req_s": len(results) / (end - began),
        "tok_s": sum(r["tokens"] for r in results) / (end - began),
        "ttft_p50_ms": 1e3 * percentile(ttft, 0.5),
        "ttft_p99_ms": 1e3 * percentile(ttft, 0.99),
        "itl_p50_ms": 1e3 * percentile(gaps, 0.5),
        "itl_p99_ms": 1e3 * percentile(gaps, 0.99),
    }


# The engine in this process.


def in_process(path: Path, args: argparse.Namespace, check: list[Job], burst: list[Job]) -> dict:
    """Reference texts (each prompt alone) and the stream burst, in this process."""
    engine = Engine(path, device=args.device, context_size=args.ctx, max_num_seqs=args.streams)
    greedy = {"temperature": 0, "ignore_eos": True}
    texts = [engine.generate(job.prompt, job.max_tokens, **greedy) for job in check]
    prompts = [job.prompt for job in burst]
    burst_in_process(engine, prompts, burst[0].max_tokens)  # warm-up: compiles, captures, KV
    figures = burst_in_process(engine, prompts, burst[0].max_tokens)
    del engine
    if args.device == "cuda":
        torch.cuda.empty_cache()
    return {"texts": texts, "burst": figures}


# The server.


class ServerProcess:
    def __init__(self, path: Path, label: str, args: argparse.Namespace) -> None:
        self.log = out_dir() / f"serve-{label}.log"
        command = [
            sys.executable, "-m", "metallic", "serve", str(path), "--port", "0",
            "--device", args.device, "-c", str(args.ctx), "--max-num-seqs", str(args.streams),
        ]  # fmt: skip
        with self.log.open("w") as log:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log)
        line = self.process.stdout.readline().decode()  # type: ignore[union-attr]
        if " at http" not in line:
            self.process.kill()
            raise SystemExit(f"metallic serve did not start (see {self.log}): {line!r}")
        self.base = line.split(" at ")[1].split()[0]  # http://127.0.0.1:PORT/v1
        self.base = self.base.removesuffix("/v1")

    def stop(self) -> int:
        """SIGTERM, as an operator stops it; the exit status (0 when graceful)."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


def serve_model(
    path: Path, label: str, args: argparse.Namespace, pool: ProcessPoolExecutor
) -> dict:
    vocab = len(open_gguf(path).metadata["tokenizer.ggml.tokens"])
    sizes = args.sizes
    rng = random.Random(1)
    check = [Job(i, 0.0, random_prompt(rng, vocab, sizes.prompt[0]), CHECK_TOKENS)
             for i in range(CHECK_PROMPTS)]  # fmt: skip
    burst = burst_workload(args.streams, vocab, sizes, seed=2)
    print(f"{label}: in-process references and {args.streams}-stream burst", flush=True)
    local = in_process(path, args, check, burst)
    server = ServerProcess(path, label, args)
    entry: dict[str, object] = {"in_process": local["burst"]}
    try:
        for job, expected in zip(check, local["texts"], strict=True):
            got = drive(pool, server.base, [job], 1)[0]["text"]
            if got != expected:
                raise SystemExit(f"{label}: the server's text differs from the engine's for "
                                 f"prompt {job.index}: {got!r} != {expected!r}")  # fmt: skip
        print(f"{label}: server texts equal in-process texts ({CHECK_PROMPTS} prompts)")
        drive(pool, server.base, burst, args.clients)  # warm-up, as in-process
        entry["http"] = http_burst(drive(pool, server.base, burst, args.clients))
        entry["ratio"] = entry["http"]["s_tg"] / local["burst"]["s_tg"]  # type: ignore[index]
        print(f"  {args.streams} streams: HTTP {entry['http']}, in-process {local['burst']}")
        rates = {}
        for rate in args.rates:
            n = max(args.min_requests, math.ceil(rate * args.duration))
            jobs = poisson_workload(rate, n, vocab, sizes, seed=int(rate * 1000))
            rates[rate] = rate_figures(drive(pool, server.base, jobs, args.clients))
            print(f"  rate {rate:g}/s: {rates[rate]}", flush=True)
        entry["rates"] = rates
    finally:
        entry["exit_status"] = server.stop()
    if entry["exit_status"] != 0:
        raise SystemExit(f"{label}: metallic serve exited with {entry['exit_status']} on SIGTERM")
    if args.llama_bin:
        wait_for(args.llama_ready)
        batches = sorted({1, 8, 32, args.streams} & set(range(1, args.streams + 1)))
        lc = llama_batched_bench(args.llama_bin / "llama-batched-bench", path,
                                 sizes.stream_prompt, sizes.stream_generated, batches)  # fmt: skip
        entry["llama.cpp"] = {b: r["S_TG t/s"] for b, r in lc.items()}
    return entry


def wait_for(ready: Path | None, seconds: float = 900) -> None:
    """Wait until `ready` exists: llama.cpp may still be building (at low priority, so that it
    does not disturb the measurements) when the first model's turn comes."""
    deadline = time.monotonic() + seconds
    while ready is not None and not ready.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{ready} did not appear within {seconds:.0f} s")
        time.sleep(2)


def records(label: str, entry: dict, streams: int) -> list[dict[str, object]]:
    rows = [
        row(label, f"stream-{streams}-http", "metallic", entry["http"]["s_tg"], "tok/s"),
        row(label, f"stream-{streams}-in-process", "metallic", entry["in_process"]["s_tg"],
            "tok/s"),
    ]  # fmt: skip
    for rate, r in entry["rates"].items():
        rows.append(row(label, f"serve-{rate:g}rps-tokens", "metallic", r["tok_s"], "tok/s"))
        for name in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99"):
            test = f"serve-{rate:g}rps-{name.replace('_', '-')}"
            rows.append(row(label, test, "metallic", r[f"{name}_ms"], "ms"))
    for b, value in entry.get("llama.cpp", {}).items():
        rows.append(row(label, f"batch-{b}-tg{STREAM_GENERATED}", "llama.cpp", value, "tok/s"))
    return rows


def print_table(name: str, results: dict[str, dict], streams: int) -> None:
    print(f"\n{name}")
    print(f"{'model':<10} {'rate/s':>7} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} "
          f"{'p99':>8} {'ITL p50':>8} {'p99':>7}  (ms)")  # fmt: skip
    for label, entry in results.items():
        for rate, r in entry["rates"].items():
            print(f"{label:<10} {rate:>7g} {r['req_s']:>7.2f} {r['tok_s']:>8.0f} "
                  f"{r['ttft_p50_ms']:>9.1f} {r['ttft_p99_ms']:>8.1f} {r['itl_p50_ms']:>8.1f} "
                  f"{r['itl_p99_ms']:>7.1f}")  # fmt: skip
    print(f"\n{streams} streams, S_TG tok/s: HTTP / in-process (target >= 0.90) / llama.cpp")
    for label, entry in results.items():
        lc = entry.get("llama.cpp", {}).get(streams, "-")
        print(f"{label:<10} {entry['http']['s_tg']:>8.0f} {entry['in_process']['s_tg']:>8.0f} "
              f"{entry['ratio']:>6.2f}  {lc}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="the real Gemma 3 270M GGUF")
    parser.add_argument("--synthetic", action="append", default=[], help="preset: llama3-8b")
    parser.add_argument("--vocab", type=Path, help="vocab GGUF for synthetic files (llama.cpp)")
    parser.add_argument("--rates", default="2,8,32", help="request rates (per second) to sweep")
    parser.add_argument("--duration", type=float, default=20, help="seconds of arrivals per rate")
    parser.add_argument("--min-requests", type=int, default=32, help="requests per rate at least")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams of the burst")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--llama-bin", type=Path, help="llama.cpp's build/bin for baselines")
    parser.add_argument("--llama-ready", type=Path, help="wait for this file before llama.cpp")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--ctx", type=int, default=2048)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/metallic-bench"))
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU, seconds")
    args = parser.parse_args()
    args.rates = [float(r) for r in args.rates.split(",")]
    args.sizes = Sizes()
    args.workdir.mkdir(parents=True, exist_ok=True)
    models = [("gemma", args.model)] if args.model else []
    if args.smoke:
        args.device, args.rates, args.duration, args.min_requests = "cpu", [2.0], 3, 6
        args.streams, args.clients, args.ctx = 8, 2, 512
        args.sizes = Sizes((16, 64), (8, 24), 32, 16)
        args.synthetic = ["tiny-llama"]
    for preset in args.synthetic:
        models.append((preset, synthetic_model(args.workdir, preset, args.vocab)))
    if not models:
        parser.error("give --model, --synthetic or --smoke")
    name = device_name(torch.device(args.device))
    results = {}
    with ProcessPoolExecutor(args.clients, mp_context=get_context("spawn")) as pool:
        for label, path in models:
            results[label] = serve_model(path, label, args, pool)
    print_table(name, results, args.streams)
    summary = {"device": name, "args": {k: str(v) for k, v in vars(args).items()}, **results}
    (out_dir() / "serve.json").write_text(json.dumps(summary, indent=1, default=str))
    rows = [r for label, entry in results.items() for r in records(label, entry, args.streams)]
    if not args.smoke:
        print("record:", write_record("serve", name, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
