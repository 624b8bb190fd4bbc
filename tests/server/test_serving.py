"""Serving behaviour where the model does not matter, on a tiny synthetic model: determinism
under concurrency, clients that leave, the context limit, health and metrics, the API key, bad
input, engine faults, and a graceful shutdown of `metallic serve` on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from metallic.cli import main
from metallic.engine.sequence import RequestOutput, TokenLogprob
from metallic.server.app import _event
from metallic.server.async_engine import EngineUnavailable, _merge
from metallic.server.launch import bind
from metallic.server.protocol import Choice

SAMPLED = {
    "model": "tiny",
    "max_tokens": 12,
    "temperature": 0.8,
    "extra_body": {"ignore_eos": True},
}


def prompt(i: int) -> str:
    return f"request {i}: " + " ".join(str(i * j) for j in range(i % 5 + 3))


async def _texts(server, requests: list[dict]) -> list[str]:
    """Run the completion requests concurrently; their texts."""
    client = server.async_client()
    try:
        replies = await asyncio.gather(*(client.completions.create(**r) for r in requests))
    finally:
        await client.close()
    return [r.choices[0].text for r in replies]


def test_greedy_text_is_the_same_alone_and_among_16(tiny) -> None:
    requests = [{**SAMPLED, "prompt": prompt(i), "temperature": 0} for i in range(16)]
    alone = [tiny.client().completions.create(**r).choices[0].text for r in requests[:3]]
    together = asyncio.run(_texts(tiny, requests))
    assert together[:3] == alone


def test_seeded_text_is_the_same_alone_and_concurrently(tiny) -> None:
    requests = [{**SAMPLED, "prompt": prompt(i), "seed": 100 + i} for i in range(16)]
    alone = [tiny.client().completions.create(**r).choices[0].text for r in requests[:3]]
    together = asyncio.run(_texts(tiny, requests))
    assert together[:3] == alone
    assert len(set(together)) == 16  # different prompts and seeds: different texts
    unseeded = asyncio.run(_texts(tiny, [{**SAMPLED, "prompt": prompt(0)}] * 2))
    assert unseeded[0] != unseeded[1]


def metrics(server) -> dict[str, float]:
    """Every sample of /metrics by its name and labels, e.g. 'metallic_kv_blocks_used{pool=0}'."""
    text = httpx2.get(server.url + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def engine_state(server) -> dict[str, float]:
    sample = metrics(server)
    return {k: v for k, v in sample.items() if "running" in k or "waiting" in k or "_used" in k}


def wait_idle(server, idle: dict[str, float], seconds: float = 20) -> dict[str, float]:
    deadline = time.monotonic() + seconds
    while (state := engine_state(server)) != idle and time.monotonic() < deadline:
        time.sleep(0.1)
    return state


async def _leave(server, n: int, seconds: float) -> int:
    """Send `n` long requests (half streamed); once every one is in the engine (64 running, the
    rest waiting) and at least `seconds` have passed, their clients disconnect. Returns how many
    were still going when their client left."""
    client = server.async_client()
    args = {"model": "tiny", "max_tokens": 400, "extra_body": {"ignore_eos": True}}

    async def one(i: int) -> None:
        if i % 2:
            stream = await client.completions.create(**args, prompt=prompt(i), stream=True)
            async for _ in stream:
                pass
        else:
            await client.completions.create(**args, prompt=prompt(i))

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    try:
        await asyncio.sleep(seconds)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(t.done() for t in tasks):
            state = await asyncio.to_thread(engine_state, server)
            running = state["metallic_requests_running"]
            if running == 64 and running + state["metallic_requests_waiting"] == n:
                break
            await asyncio.sleep(0.05)
        going = sum(not t.done() for t in tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return going
    finally:
        await client.close()


def test_clients_that_leave_free_everything(tiny) -> None:
    idle = engine_state(tiny)
    assert idle["metallic_requests_running"] == idle["metallic_requests_waiting"] == 0
    before = metrics(tiny)
    assert asyncio.run(_leave(tiny, 200, 0.5)) == 200
    assert wait_idle(tiny, idle) == idle
    left = "metallic_requests_total{route=/v1/completions,status=499}"
    assert metrics(tiny)[left] - before.get(left, 0) == 200
    began = time.monotonic()
    reply = tiny.client().completions.create(model="tiny", prompt="after", max_tokens=4)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert time.monotonic() - began < 5


def test_continuous_usage_counts_every_token_as_it_streams(tiny) -> None:
    """vLLM's `continuous_usage_stats`: each chunk carries the usage so far, so a client knows
    how many tokens a chunk holds even when a lagging stream gets several at once."""
    body = {"model": "tiny", "prompt": "count", "max_tokens": 40, "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    with httpx2.stream("POST", tiny.url + "/v1/completions", json=body) as reply:
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 40
    assert {e["usage"]["prompt_tokens"] for e in events} == {events[-1]["usage"]["prompt_tokens"]}
    assert events[-1]["choices"] == [] and events[-2]["choices"][0]["finish_reason"] == "length"


def test_events_escape_what_line_splitters_take_for_line_ends() -> None:
    """JSON may hold U+2028, U+2029 and NEL raw, but clients that split lines with Python's
    str.splitlines would cut the event there: a generated text with them stays one line."""
    text = "a\u2028b\u2029c\x85d\re\nf"
    event = _event({"text": text})
    assert len(event.removesuffix("\n\n").splitlines()) == 1
    assert json.loads(event.removeprefix("data: "))["text"] == text


def test_merged_outputs_keep_each_tokens_text_offset() -> None:
    """A lagging stream gets several steps as one output; each token keeps where its text starts
    (a token whose text is held back, as an incomplete character is, starts where the next does)."""
    steps = [("Pa", 11), ("", 12), ("ris.", 13)]
    outs = [RequestOutput("r", [t], text, [TokenLogprob(t, -0.5)]) for text, t in steps]
    merged = _merge(_merge(outs[0], outs[1]), outs[2])
    assert [e.text_offset for e in merged.logprobs or []] == [0, 2, 2]
    choice = Choice(0)
    choice.add(RequestOutput("r", [10], "The", [TokenLogprob(10, -0.1)]))
    choice.add(merged)
    assert choice.offsets == [0, 3, 5, 5]
    assert "".join(choice.text) == "TheParis."


def test_context_limits(start_tiny) -> None:
    server = start_tiny(context_size=64)
    client = server.client()
    fits = client.completions.create(model="tiny", prompt=[5] * 63, max_tokens=1)
    assert fits.usage.prompt_tokens == 63 and fits.usage.completion_tokens == 1
    before = metrics(server)["metallic_prompt_tokens_total"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=[5] * 64, max_tokens=1)
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=[5] * 60, max_tokens=5)
    assert err.value.body["param"] == "max_tokens"
    assert metrics(server)["metallic_prompt_tokens_total"] == before  # nothing was generated
    rest = client.completions.create(model="tiny", prompt=[5] * 60, extra_body={"ignore_eos": True})
    assert rest.usage.completion_tokens == 4 and rest.choices[0].finish_reason == "length"


def test_health_and_metrics_move_with_traffic(tiny) -> None:
    assert httpx2.get(tiny.url + "/health").json() == {"status": "ok"}
    before = metrics(tiny)
    tiny.client().completions.create(**SAMPLED, prompt="count me")
    with pytest.raises(openai.BadRequestError):
        tiny.client().completions.create(model="tiny", prompt="x", max_tokens=0)
    assert httpx2.get(tiny.url + "/made/up/path").status_code == 404
    after = metrics(tiny)

    def moved(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert moved("metallic_requests_total{route=/v1/completions,status=200}") == 1
    assert moved("metallic_requests_total{route=/v1/completions,status=400}") == 1
    assert moved("metallic_requests_total{route=other,status=404}") == 1  # no label per path
    assert moved("metallic_generation_tokens_total") == 12
    assert moved("metallic_prompt_tokens_total") > 0
    assert moved("metallic_time_to_first_token_seconds_count") == 1
    assert moved("metallic_inter_token_latency_seconds_count") == 11
    assert moved("metallic_generations_finished_total{reason=length}") == 1
    assert after["metallic_kv_blocks{pool=0}"] >= after["metallic_kv_blocks_used{pool=0}"] > 0
    assert moved("metallic_prefix_cache_queries_tokens_total") > 0
    assert 0 <= after["metallic_prefix_cache_hit_rate"] <= 1


def test_api_key_guards_every_route_but_health(start_tiny) -> None:
    server = start_tiny(api_key="sesame")
    routes = [
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/tiny", None),
        ("GET", "/metrics", None),
        ("GET", "/nowhere", None),
        ("POST", "/v1/completions", {"prompt": "a", "max_tokens": 1}),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}),
    ]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            reply = httpx2.request(method, server.url + path, json=body, headers=headers)
            assert reply.status_code == 401, (path, headers)
            assert reply.json()["error"]["code"] == "invalid_api_key"
    assert httpx2.get(server.url + "/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    reply = server.client(api_key="sesame").completions.create(
        model="tiny", prompt="a", max_tokens=2
    )
    assert reply.usage.completion_tokens <= 2


BAD_REQUESTS = [
    # (what, route, body, status, param)
    ("wrong type", "completions", {"prompt": "a", "max_tokens": "3"}, 400, "max_tokens"),
    ("wrong type", "completions", {"prompt": 3}, 400, "prompt"),
    ("wrong type", "chat/completions", {"messages": "hi"}, 400, "messages"),
    ("unknown model", "completions", {"model": "gpt-5", "prompt": "a"}, 404, "model"),
    ("empty prompt", "completions", {"prompt": ""}, 400, "prompt"),
    ("empty prompt", "completions", {"prompt": []}, 400, "prompt"),
    ("empty messages", "chat/completions", {"messages": []}, 400, "messages"),
    ("max_tokens <= 0", "completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens <= 0", "chat/completions",
     {"messages": [{"role": "user", "content": "a"}], "max_completion_tokens": -1},
     400, "max_completion_tokens"),
    ("temperature < 0", "completions", {"prompt": "a", "temperature": -0.1}, 400, "temperature"),
    ("top_p = 0", "completions", {"prompt": "a", "top_p": 0}, 400, "top_p"),
    ("top_p > 1", "completions", {"prompt": "a", "top_p": 1.5}, 400, "top_p"),
    ("unknown role", "chat/completions", {"messages": [{"role": "robot", "content": "a"}]},
     400, "messages"),
    ("token id out of range", "completions", {"prompt": [1, 2, 100000]}, 400, "prompt"),
    ("negative token id", "completions", {"prompt": [-1]}, 400, "prompt"),
    ("n out of range", "completions", {"prompt": "a", "n": 0}, 400, "n"),
    ("empty stop string", "completions", {"prompt": "a", "stop": [""]}, 400, "stop"),
    ("unsupported", "completions", {"prompt": "a", "echo": True}, 400, "echo"),
]  # fmt: skip


def check_error(reply: httpx2.Response, status: int, param: str | None = None) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize(("what", "route", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors(tiny, what, route, body, status, param) -> None:
    reply = httpx2.post(f"{tiny.url}/v1/{route}", json=body)
    check_error(reply, status, param)


def test_malformed_and_oversized_bodies_and_the_server_goes_on(tiny) -> None:
    url = tiny.url + "/v1/completions"
    headers = {"Content-Type": "application/json"}
    check_error(httpx2.post(url, content=b'{"prompt": "a",', headers=headers), 400)
    check_error(httpx2.post(url, content=b"[1, 2]", headers=headers), 400)
    huge = json.dumps({"prompt": "a" * (10 * 2**20)}).encode()
    check_error(httpx2.post(url, content=huge, headers=headers), 413)

    def chunked() -> object:
        for _ in range(11):
            yield b" " * 2**20

    check_error(httpx2.post(url, content=chunked(), headers=headers), 413)
    check_error(httpx2.get(tiny.url + "/v1/nothing"), 404)
    reply = tiny.client().completions.create(model="tiny", prompt="still here", max_tokens=2)
    assert reply.usage.completion_tokens <= 2


def test_an_engine_fault_is_a_500_and_health_reports_it(start_tiny) -> None:
    server = start_tiny()
    client = server.client()
    client.completions.create(model="tiny", prompt="warm", max_tokens=2)
    server.engine.call(_inject_fault)
    with pytest.raises(openai.InternalServerError) as err:
        client.completions.create(model="tiny", prompt="boom", max_tokens=4)
    assert err.value.status_code == 500 and "injected fault" in err.value.body["message"]
    assert_dead(server, "injected fault")


def assert_dead(server, reason: str) -> None:
    """/health says the engine stopped and why; a new request is refused at once."""
    health = httpx2.get(server.url + "/health")
    assert health.status_code == 503 and reason in health.json()["error"]
    with pytest.raises(openai.APIStatusError) as err:
        server.client().completions.create(model="tiny", prompt="again", max_tokens=4)
    assert err.value.status_code == 503


def test_an_engine_fault_ends_a_stream_with_an_error_event(start_tiny) -> None:
    server = start_tiny()
    client = server.client()
    stream = client.completions.create(
        model="tiny", prompt="boom", max_tokens=200, stream=True, extra_body={"ignore_eos": True}
    )
    received = 0
    with pytest.raises(openai.APIError, match="injected fault"):
        for _ in stream:
            received += 1
            if received == 3:
                server.engine.call(_inject_fault)
    assert received >= 3


def _inject_fault(engine) -> None:
    """Make the engine's next step fail (run in the engine process)."""
    engine.runner.launch = _raise_fault


def _raise_fault(*args: object, **kwargs: object) -> None:
    raise RuntimeError("injected fault")


def test_an_engine_process_that_dies_fails_its_requests_and_health(start_tiny) -> None:
    """The engine runs in its own process; if that process is killed (out of memory, a crash
    in a driver), streams in flight end with an error, /health says why and new requests get a
    503 at once instead of waiting forever."""
    server = start_tiny()
    stream = server.client().completions.create(
        model="tiny", prompt="go", max_tokens=400, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    with pytest.raises(EngineUnavailable, match="exited"):
        server.engine.call(_die)
    with pytest.raises(openai.APIError, match="exited"):
        list(stream)
    assert_dead(server, "exited")


def _die(engine) -> None:
    """Kill the engine process (run in it)."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_model_that_cannot_load_is_a_one_line_error(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    assert main(["serve", str(bad), "--port", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.gguf" in err[0], err


def test_serve_refuses_a_taken_port(tiny_model, capsys) -> None:
    taken = bind("127.0.0.1", 0)
    port = taken.getsockname()[1]
    assert main(["serve", str(tiny_model), "--port", str(port), "--device", "cpu"]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    taken.close()


def test_sigterm_finishes_requests_in_flight_then_exits_0(tiny_model) -> None:
    # A loaded CI machine may run the tiny model at a few tokens a second: give the request
    # in flight time enough to finish whatever the speed (30 s by default).
    command = [sys.executable, "-m", "metallic", "serve", str(tiny_model), "--port", "0",
               "--device", "cpu", "-c", "512", "--served-model-name", "tiny",
               "--shutdown-timeout", "300"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        line = process.stdout.readline().decode()
        assert line.startswith("metallic: serving tiny at http://127.0.0.1:"), line
        base = line.split(" at ")[1].split()[0]
        client = openai.OpenAI(base_url=base, api_key="-", max_retries=0, timeout=60)
        stream = client.completions.create(
            model="tiny", prompt="go", max_tokens=300, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = [next(iter(stream))]
        process.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert process.wait(timeout=300) == 0
        log = process.stderr.read().decode()
        assert "SIGTERM: shutting down" in log and "300 generated" in log
    finally:
        process.kill()
        process.wait()
    with pytest.raises(openai.APIConnectionError):
        client.models.list()
