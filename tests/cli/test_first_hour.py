"""What a new user meets in the first hour (issue 15): one-line errors for every bad flag,
checked before loading; --version; defaults in --help; prompts from files and stdin; the known
models; chat that outlives its context and survives Ctrl-C; concurrent first runs.

Most tests call `metallic.cli.main` in this process on a tiny synthetic model (fast); those about
processes (signals, races) run the command in a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

from metallic import __version__
from metallic.cli import main
from metallic.gguf.registry import KNOWN_MODELS
from metallic.testing.synthetic import write_synthetic_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("m") / "tiny.gguf"
    return str(write_synthetic_model(path, "tiny-llama", "Q8_0"))


def one_line_error(capsys, *words: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def exits(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return int(exit_info.value.code or 0)


def set_stdin(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


# -- flags -----------------------------------------------------------------------------------------


def test_version(capsys) -> None:
    assert exits(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"metallic {__version__}"


def test_help_shows_defaults(capsys) -> None:
    assert exits(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default: 256)", "(default: 0.8)", "(default: 40)", "default: gemma-3-270m"):
        assert shown in text
    assert exits(["chat", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.0)" in text and "default: smollm2-135m-instruct" in text


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["run"], ["one of the arguments -p/--prompt -f/--file is required"]),
        (["run", "-p"], ["expected one argument"]),
        (["run", "-p", "x", "-n", "many"], ["-n/--max-tokens", "invalid int value"]),
        (["run", "-p", "x", "--bogus"], ["unrecognized arguments: --bogus"]),
        (["frob"], ["invalid choice: 'frob'"]),
        ([], ["the following arguments are required: COMMAND"]),
        (["chat", "--temp"], ["expected one argument"]),
    ],
)
def test_argparse_errors_are_one_line_with_a_pointer_to_help(capsys, argv, words) -> None:
    assert exits(argv) == 2
    line = one_line_error(capsys, *words)
    assert line.endswith("--help)") and "(see metallic" in line


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--gpu-memory", "nan"], ["--gpu-memory", "positive finite", "'nan'"]),
        (["--gpu-memory", "inf"], ["--gpu-memory", "positive finite", "'inf'"]),
        (["--gpu-memory", "-5"], ["--gpu-memory", "positive finite"]),
        (["--gpu-memory", "lots"], ["--gpu-memory", "cannot read 'lots'"]),
        (["--device", "meta"], ["--device", "unknown device 'meta'"]),
        (["--device", "mps"], ["--device", "unknown device 'mps'"]),
        (["--dtype", "int8"], ["--dtype", "unknown dtype 'int8'"]),
        (["-c", "1"], ["--ctx-size", "at least 2"]),
        (["-c", "big"], ["--ctx-size", "not a whole number"]),
        (["--gpu-layers", "-1"], ["--gpu-layers", "at least 0"]),
    ],
)
def test_bad_flag_values_are_one_line_before_any_loading(capsys, monkeypatch, flags, words):
    from metallic.engine import engine

    monkeypatch.setattr(engine, "Engine", lambda *a, **k: pytest.fail("loading started"))
    assert exits(["run", "-p", "hi", *flags]) == 2
    one_line_error(capsys, *words)


def test_cuda_without_a_gpu_is_one_line(capsys) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["run", "-p", "hi", "--device", "cuda"]) == 2
    one_line_error(capsys, "CUDA was requested but no CUDA device is available")


def test_ctx_size_past_training_needs_the_override(capsys) -> None:
    """-c 100000000 on the default model: one line, not a 100 GB allocation."""
    assert main(["run", "-p", "hi", "-c", "100000000"]) == 2
    one_line_error(capsys, "100,000,000 tokens", "trained on (32,768)", "--ctx-size-override")
    override = ["-c", "100000000", "--ctx-size-override", "--device", "cpu"]
    assert main(["run", "-p", "hi", *override]) == 2
    one_line_error(capsys, "needs 572.2 GiB of KV cache", "of host memory is available")


def test_gpu_flags_on_the_cpu_warn_once_and_are_ignored(capsys, tiny) -> None:
    argv = ["run", tiny, "-p", "abc", "-n", "3", "--temp", "0", "--stats"]
    assert main([*argv, "--gpu-layers", "1", "--gpu-memory", "1G"]) == 0
    warned = capsys.readouterr()
    warnings = [line for line in warned.err.splitlines() if "warning" in line]
    assert warnings == [
        "metallic: warning: --gpu-layers and --gpu-memory ignored: GPU-only, and this run is on"
        " the CPU"
    ]
    assert "streamed" not in warned.err  # no placement plan: the plain CPU path ran
    assert main(argv) == 0
    assert capsys.readouterr().out == warned.out


# -- prompts from files and stdin ----------------------------------------------------------------


def _json_run(capsys, argv: list[str]) -> dict:
    assert main([*argv, "--json", "-n", "2", "--temp", "0"]) == 0
    return json.loads(capsys.readouterr().out)


def test_prompt_from_a_file_and_from_stdin(capsys, monkeypatch, tiny, tmp_path) -> None:
    from metallic.gguf.reader import open_gguf
    from metallic.gguf.tokenizer import Tokenizer

    text = "a prompt\nover two lines"
    expected = Tokenizer.from_metadata(open_gguf(tiny).metadata).encode(text)
    file = tmp_path / "prompt.txt"
    file.write_text(text, encoding="utf-8")
    assert _json_run(capsys, ["run", tiny, "-f", str(file)])["prompt_ids"] == expected
    set_stdin(monkeypatch, text.encode())
    assert _json_run(capsys, ["run", tiny, "-p", "-"])["prompt_ids"] == expected
    set_stdin(monkeypatch, text.encode())
    assert _json_run(capsys, ["run", tiny, "-f", "-"])["prompt_ids"] == expected


def test_a_megabyte_prompt_file_with_truncate_keeps_bos(capsys, tiny, tmp_path) -> None:
    """The shell cannot pass a 1 MB -p; -f can, and --truncate keeps BOS and room for -n."""
    file = tmp_path / "long.txt"
    file.write_text("word " * 200_000, encoding="utf-8")
    result = _json_run(capsys, ["run", tiny, "-f", str(file), "-c", "128", "--truncate"])
    assert len(result["prompt_ids"]) == 128 - 2
    assert result["prompt_ids"][0] == 509  # tiny-llama's BOS
    assert len(result["generated_ids"]) == 2


@pytest.mark.parametrize(
    ("content", "words"), [(None, ["cannot read", "No such file"]), (b"\xff\xfe", ["not UTF-8"])]
)
def test_unreadable_prompt_files_are_one_line(capsys, tiny, tmp_path, content, words) -> None:
    file = tmp_path / "prompt.txt"
    if content is not None:
        file.write_bytes(content)
    assert main(["run", tiny, "-f", str(file)]) == 2
    one_line_error(capsys, *words)


def test_tokenize_does_not_tokenize_a_model_path(capsys, monkeypatch, tiny) -> None:
    for model in (tiny, "smollm2-135m-instruct"):
        assert main(["tokenize", model]) == 2
        one_line_error(capsys, "no TEXT to tokenize after the model")
    assert main(["tokenize", tiny, "abc"]) == 0
    ids = capsys.readouterr().out
    set_stdin(monkeypatch, b"abc")
    assert main(["tokenize", tiny, "-"]) == 0
    assert capsys.readouterr().out == ids
    assert main(["tokenize", "abc"]) == 0  # one word that names no model: text, default model
    assert json.loads(capsys.readouterr().out)[0] == 2  # Gemma's BOS


# -- known models ------------------------------------------------------------------------------


def test_models_lists_the_registry(capsys) -> None:
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == list(KNOWN_MODELS)
    for row in rows:
        model = KNOWN_MODELS[row["name"]]
        assert row["cached"] == model.is_cached() and row["size"] == model.size
        assert row["architecture"] in ("gemma3", "llama") and row["purpose"] and row["source"]
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "smollm2-135m-instruct" in table and "gemma-3-270m" in table and "CACHED" in table


def test_pull_and_model_names(capsys, chat_model_path) -> None:
    assert main(["pull", "smollm2-135m-instruct"]) == 0
    assert capsys.readouterr().out.strip() == str(chat_model_path)
    assert main(["pull", "no-such-model"]) == 2
    one_line_error(capsys, "unknown model 'no-such-model'", "smollm2-135m-instruct")
    assert main(["inspect", "smollm2-135m-instruct", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == "llama" and info["pre_tokenizer"] == "smollm"


# -- chat -----------------------------------------------------------------------------------------


def test_chat_drops_oldest_turns_once_told(capsys, monkeypatch, tiny) -> None:
    turns = "".join(f"question {i}\n" for i in range(12))
    set_stdin(monkeypatch, turns.encode())
    argv = ["chat", tiny, "-c", "256", "-n", "8", "--temp", "0", "--system", "be brief"]
    argv += ["--stop", "\n"]  # one line per reply
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 12  # every turn answered
    assert err.count("dropping its oldest turns (the system prompt stays)") == 1
    assert "Traceback" not in err


def test_chat_message_too_long_for_the_context_is_skipped(capsys, monkeypatch, tiny) -> None:
    turns = "short\n" + "very long " * 200 + "\nshort again\n"
    set_stdin(monkeypatch, turns.encode())
    assert main(["chat", tiny, "-c", "128", "-n", "4", "--temp", "0", "--stop", "\n"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 2  # the two short ones
    assert "that message needs" in err and "more than the" in err


def test_a_hostile_chat_template_is_one_line(capsys, monkeypatch, tiny) -> None:
    """A model file whose template loops a billion times: one line, exit 2, at once."""
    from metallic.engine.chat import ChatTemplate

    hostile = ChatTemplate("{% for i in range(10**9) %}x{% endfor %}")
    monkeypatch.setattr(ChatTemplate, "for_model", classmethod(lambda cls, metadata: hostile))
    set_stdin(monkeypatch, b"hello\n")
    assert main(["chat", tiny, "-n", "2"]) == 2
    one_line_error(capsys, "chat template failed to render", "Range too big")


class Terminal:
    """`metallic chat` with a terminal as its stdin (so it is interactive) and pipes out."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "metallic", "chat", *args],
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        os.close(slave)
        self.seen = {"out": b"", "err": b""}

    def _read(self, stream: str, until, what: str, deadline_s: float = 300) -> None:
        pipe = self.proc.stdout if stream == "out" else self.proc.stderr
        assert pipe is not None
        end = time.monotonic() + deadline_s  # a safety net against a hang, not a timing
        while not until(self.seen[stream]):
            assert time.monotonic() < end, f"no {what} in {self.seen[stream][-300:]!r}"
            if select.select([pipe], [], [], 0.2)[0]:
                chunk = os.read(pipe.fileno(), 65536)
                assert chunk, f"{stream} closed before {what}: {self.seen}"
                self.seen[stream] += chunk

    def wait_for(self, stream: str, text: str) -> None:
        """Read `stream` until `text` arrives; consume it and what came before."""
        self._read(stream, lambda seen: text.encode() in seen, repr(text))
        self.seen[stream] = self.seen[stream].partition(text.encode())[2]

    def wait_for_output(self) -> None:
        """Read stdout until something comes (a reply is streaming); consume it."""
        self._read("out", bool, "output")
        self.seen["out"] = b""

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def interrupt_at_prompt(self) -> int:
        """Ctrl-C at the prompt; the exit code. Sent again while the process lives: a signal
        that lands between Python's last signal check and its blocking read of the terminal
        only takes effect once the read returns (a person would press Ctrl-C again too)."""
        for _ in range(12):
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.close(timeout=5)
            except subprocess.TimeoutExpired:
                continue
        raise AssertionError("Ctrl-C at the prompt did not end the chat")

    def close(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout=timeout)
        os.close(self.master)
        return code


def test_ctrl_c_stops_only_the_reply(tiny) -> None:
    """Ctrl-C during a reply ends that reply; the chat goes on with its history. Ctrl-C at the
    prompt quits (130), as does Ctrl-D (0)."""
    # greedy: this model's replies then hold no "> " that could pass for the prompt
    chat = Terminal(tiny, "-n", "100000", "--ignore-eos", "--temp", "0", "-c", "2048")
    chat.wait_for("err", "quits")
    chat.wait_for("out", "> ")
    for turn in ("a first question", "a second one"):
        chat.type(turn + "\n")
        chat.wait_for_output()  # the reply is streaming
        chat.proc.send_signal(signal.SIGINT)
        chat.wait_for("err", "metallic: reply stopped")
        chat.wait_for("out", "\n> ")  # the chat goes on
    assert chat.interrupt_at_prompt() == 130
    assert b"Traceback" not in chat.seen["err"] + chat.proc.stderr.read()

    chat = Terminal(tiny, "-n", "4")
    chat.wait_for("out", "> ")
    chat.type("\x04")  # Ctrl-D
    assert chat.close() == 0


# -- first runs at once ---------------------------------------------------------------------------


def test_two_first_runs_at_once_share_one_cache_file(tmp_path) -> None:
    """Under a fresh cache two `metallic inspect` at once both succeed: the second waits for the
    first to assemble the default model instead of reading a partial file."""
    env = {**os.environ, "METALLIC_CACHE": str(tmp_path)}
    command = [sys.executable, "-m", "metallic", "inspect", "--json"]
    procs = [
        subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], results
    for out, _ in results:
        assert json.loads(out)["architecture"] == "gemma3"
    files = sorted(p.name for p in (tmp_path / "models").iterdir() if not p.name.startswith("."))
    assert files == ["gemma-3-270m-q4_k_m.gguf"]
