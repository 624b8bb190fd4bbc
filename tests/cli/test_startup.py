"""What start-up loads and says: no server, plot or template modules for `metallic run`, no
Triton and no compile notice on the CPU, and the notice's end at the first decode step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metallic.engine.engine import Engine
from metallic.testing.synthetic import write_synthetic_model

# Modules only `serve`, `bench --plot` or `chat` need.
NOT_FOR_RUN = ("fastapi", "uvicorn", "starlette", "prometheus_client", "matplotlib", "jinja2")


def loaded_after(code: str) -> tuple[list[str], subprocess.CompletedProcess]:
    """Which of the heavy modules a fresh interpreter holds after running `code` (on the CPU
    path: without METALLIC_FORCE_KERNELS), and the process."""
    heavy = [*NOT_FOR_RUN, "torch", "triton"]
    script = (
        f"{code}\nimport sys, json\nprint(json.dumps([m for m in {heavy!r} if m in sys.modules]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "METALLIC_FORCE_KERNELS"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_model(tmp_path_factory.mktemp("m") / "tiny.gguf", "tiny-gemma3")


def test_importing_the_cli_loads_no_heavy_module():
    loaded, _ = loaded_after("import metallic.cli")
    assert loaded == []  # `metallic --help` and flag errors need neither torch nor triton


def test_a_cpu_run_loads_neither_server_nor_plot_nor_triton(tiny: Path):
    code = (
        "from metallic.cli import main\n"
        f"assert main(['run', {str(tiny)!r}, '-p', 'hi', '-n', '3', '--temp', '0']) == 0"
    )
    loaded, proc = loaded_after(code)
    assert loaded == ["torch"]
    assert "compiling" not in proc.stderr


class Notice:
    """Stands in for CompileNotice: records when the runner ends the warm-up."""

    def __init__(self, first_run: bool = False) -> None:
        self.first_run = first_run
        self.finished_after_steps: int | None = None
        self.runner = None

    def finish(self) -> None:
        self.finished_after_steps = self.runner.steps


def test_the_compile_notice_ends_at_the_first_decode_step(tiny: Path):
    engine = Engine(tiny, device="cpu")
    assert engine.runner.compile_notice is None  # the CPU compiles nothing
    notice = Notice()
    notice.runner = engine.runner
    engine.runner.compile_notice = notice
    engine.generate([1, 5, 6, 7], max_tokens=4, temperature=0, ignore_eos=True)
    assert notice.finished_after_steps == 1  # the prompt step, then the first decode step
    assert engine.runner.compile_notice is None


@pytest.mark.parametrize("first_run", [True, False])
def test_a_first_run_compiles_each_warm_up_step_ahead(
    tiny: Path, monkeypatch: pytest.MonkeyPatch, first_run: bool
):
    from metallic.engine import model_runner

    engine = Engine(tiny, device="cpu")
    ahead: list[int] = []

    def compile_ahead(forward) -> None:
        ahead.append(engine.runner.steps)
        forward()  # what a pass without Triton launches does here: runs the torch ops

    monkeypatch.setattr(model_runner, "compile_ahead", compile_ahead)
    notice = Notice(first_run)
    notice.runner = engine.runner
    engine.runner.compile_notice = notice
    expected = engine.generate([1, 5, 6, 7], max_tokens=4, temperature=0, ignore_eos=True)
    assert ahead == ([0, 1] if first_run else [])  # the prompt step, the first decode step
    engine.runner.compile_notice = None
    assert engine.generate([1, 5, 6, 7], max_tokens=4, temperature=0, ignore_eos=True) == expected


def test_the_command_exits_at_once_with_its_output_and_code(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "METALLIC_FORCE_KERNELS"}
    env["METALLIC_CACHE"] = str(tmp_path / "cache")
    command = [sys.executable, "-m", "metallic", "models", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert {m["name"] for m in json.loads(done.stdout)} >= {"gemma-3-270m"}
    failed = subprocess.run(
        [sys.executable, "-m", "metallic", "pull", "no-such-model"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert failed.returncode == 2 and failed.stderr.startswith("metallic: error:")


def test_a_profiler_still_gets_its_results(tmp_path: Path):
    """Profilers write their results as the interpreter exits: no early exit under one."""
    env = {k: v for k, v in os.environ.items() if k != "METALLIC_FORCE_KERNELS"}
    env["METALLIC_CACHE"] = str(tmp_path / "cache")
    stats = tmp_path / "run.prof"
    command = [sys.executable, "-m", "cProfile", "-o", str(stats), "-m", "metallic", "models"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert stats.stat().st_size > 0
