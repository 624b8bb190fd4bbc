"""The compile notice: at once when the marker is missing or stale, at the first compiled
kernel on a later run that compiles after all, silent otherwise, and never on the CPU. No
kernel compiles here, so Triton's listener is called as Triton calls it (keyword arguments, one
call per kernel compiled or found in its cache)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
import triton.knobs

from metallic.runtime import kernel_cache
from metallic.runtime.kernel_cache import CompileNotice

IDENTITY = {
    "metallic": "0.1.0",
    "kernel_sources": "0123456789abcdef",
    "triton": "3.6.0",
    "device": "NVIDIA H200 (sm_90)",
    "triton_cache": "/tmp/triton-cache",
}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """A device `CompileNotice` treats as a GPU that compiles (there is none here)."""
    monkeypatch.setattr(kernel_cache, "compiles_kernels", lambda device: True)
    monkeypatch.setattr(kernel_cache, "cache_identity", lambda device: dict(IDENTITY))
    previous = triton.knobs.compilation.listener
    yield torch.device("cuda")
    triton.knobs.compilation.listener = previous


def compile_event(kernel: Path, cache_hit: bool) -> None:
    """What Triton tells its listener once it compiled (or loaded) `kernel`."""
    kernel.write_text("{}")
    group = {kernel.name: str(kernel), kernel.with_suffix(".cubin").name: "unused"}
    triton.knobs.compilation.listener(
        src=None, metadata={}, metadata_group=group, times=None, cache_hit=cache_hit
    )


def test_cpu_and_interpreter_compile_nothing_and_say_nothing(monkeypatch: pytest.MonkeyPatch):
    assert not kernel_cache.compiles_kernels(torch.device("cpu"))
    stream = io.StringIO()
    assert CompileNotice.for_device(torch.device("cpu"), stream) is None
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kernel_cache.compiles_kernels(torch.device("cuda"))
    assert stream.getvalue() == ""


def test_first_run_announces_counts_and_writes_the_marker(gpu, tmp_path: Path):
    stream = io.StringIO()
    notice = CompileNotice.for_device(gpu, stream, folder=tmp_path)
    assert notice is not None
    assert stream.getvalue() == (
        "metallic: compiling GPU kernels (first run; cached in /tmp/triton-cache)...\n"
    )
    compile_event(tmp_path / "rms_norm.json", cache_hit=False)
    compile_event(tmp_path / "gemv.json", cache_hit=False)
    compile_event(tmp_path / "rope.json", cache_hit=True)  # compiled by an earlier, cut run
    notice.finish()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("metallic: compiled 2 GPU kernels in ")
    assert triton.knobs.compilation.listener is None  # handed back
    marker = json.loads(notice.marker.read_text())
    assert marker["compiled"] == 2
    assert sorted(Path(f).name for f in marker["files"]) == [
        "gemv.json",
        "rms_norm.json",
        "rope.json",
    ]
    assert notice.marker.parent == tmp_path / kernel_cache.MARKER_FOLDER

    written = notice.marker.read_text()
    again = io.StringIO()
    quiet = CompileNotice.for_device(gpu, again, folder=tmp_path)
    assert quiet is not None and not quiet.first_run
    compile_event(tmp_path / "gemv.json", cache_hit=True)  # loaded from Triton's cache
    quiet.finish()
    assert again.getvalue() == ""  # nothing compiled, nothing said
    assert notice.marker.read_text() == written


def test_a_later_run_that_compiles_after_all_says_so_then(gpu, tmp_path: Path):
    notice = CompileNotice.for_device(gpu, io.StringIO(), folder=tmp_path)
    assert notice is not None
    compile_event(tmp_path / "gemv.json", cache_hit=False)
    notice.finish()
    stream = io.StringIO()
    later = CompileNotice.for_device(gpu, stream, folder=tmp_path)
    assert later is not None and stream.getvalue() == ""
    compile_event(tmp_path / "gemv.json", cache_hit=True)
    compile_event(tmp_path / "other_shape.json", cache_hit=False)  # another model's kernel
    later.finish()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "metallic: compiling more GPU kernels (cached in /tmp/triton-cache)..."
    assert lines[1].startswith("metallic: compiled 1 GPU kernels in ")
    files = json.loads(later.marker.read_text())["files"]
    assert sorted(Path(f).name for f in files) == ["gemv.json", "other_shape.json"]


def test_a_cleared_triton_cache_is_a_first_run_again(gpu, tmp_path: Path):
    notice = CompileNotice.for_device(gpu, io.StringIO(), folder=tmp_path)
    assert notice is not None
    compile_event(tmp_path / "gemv.json", cache_hit=False)
    notice.finish()
    warm = CompileNotice.for_device(gpu, io.StringIO(), folder=tmp_path)
    assert warm is not None and not warm.first_run
    warm.finish()
    (tmp_path / "gemv.json").unlink()
    stream = io.StringIO()
    cleared = CompileNotice.for_device(gpu, stream, folder=tmp_path)
    assert cleared is not None and cleared.first_run
    assert "compiling GPU kernels (first run;" in stream.getvalue()
    cleared.finish()


def test_another_identity_has_its_own_marker(gpu, tmp_path: Path, monkeypatch):
    notice = CompileNotice.for_device(gpu, io.StringIO(), folder=tmp_path)
    assert notice is not None
    notice.finish()
    upgraded = {**IDENTITY, "triton": "3.7.0"}
    monkeypatch.setattr(kernel_cache, "cache_identity", lambda device: dict(upgraded))
    upgrade = CompileNotice.for_device(gpu, io.StringIO(), folder=tmp_path)
    assert upgrade is not None and upgrade.first_run
    upgrade.finish()


def test_a_damaged_marker_means_compiling(gpu, tmp_path: Path):
    marker = kernel_cache.marker_path(IDENTITY, tmp_path)
    marker.parent.mkdir(parents=True)
    marker.write_text("not json")
    notice = CompileNotice.for_device(gpu, io.StringIO(), folder=tmp_path)
    assert notice is not None and notice.first_run
    notice.finish()


def test_progress_redraws_one_line_on_a_terminal(gpu, tmp_path: Path):
    ticks = iter([0.0, 4.2, 9.0])
    terminal = Terminal()
    notice = CompileNotice(
        kernel_cache.marker_path(IDENTITY, tmp_path), IDENTITY, terminal, None, lambda: next(ticks)
    )
    notice.start()
    compile_event(tmp_path / "gemv.json", cache_hit=False)
    notice.finish()
    text = terminal.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, redrawn
    assert "\r" + notice.headline + " 1 kernels, 4 s" in text
    assert text.endswith("metallic: compiled 1 GPU kernels in 9.0 s\n")


def test_the_listener_before_ours_still_hears_every_kernel(gpu, tmp_path: Path):
    heard = []
    triton.knobs.compilation.listener = lambda **event: heard.append(event["cache_hit"])
    before = triton.knobs.compilation.listener
    notice = CompileNotice.for_device(gpu, io.StringIO(), folder=tmp_path)
    assert notice is not None
    compile_event(tmp_path / "gemv.json", cache_hit=False)
    compile_event(tmp_path / "rope.json", cache_hit=True)
    notice.finish()
    notice.finish()  # idempotent
    assert heard == [False, True]
    assert triton.knobs.compilation.listener is before


def test_an_unwritable_cache_only_means_the_notice_shows_again(gpu, tmp_path: Path):
    blocked = tmp_path / "file"
    blocked.write_text("")  # the cache folder is a file: the marker cannot be made
    notice = CompileNotice.for_device(gpu, io.StringIO(), folder=blocked)
    assert notice is not None
    notice.finish()
    again = CompileNotice.for_device(gpu, io.StringIO(), folder=blocked)
    assert again is not None and again.first_run
    again.finish()


def test_two_engines_chain_their_notices(gpu, tmp_path: Path):
    first = CompileNotice.for_device(gpu, io.StringIO(), folder=tmp_path / "a")
    second = CompileNotice.for_device(gpu, io.StringIO(), folder=tmp_path / "b")
    assert first is not None and second is not None
    compile_event(tmp_path / "gemv.json", cache_hit=False)
    first.finish()  # not the listener installed last: it stays in the chain, silent
    compile_event(tmp_path / "rope.json", cache_hit=False)
    second.finish()
    assert (first.compiled, second.compiled) == (1, 2)
    assert triton.knobs.compilation.listener == first._listen  # second handed back its previous


class RecordingRun:
    """Stands in for `JITFunction.run`: records each call's warm-up flag and, like Triton's in
    AsyncCompileMode, submits a warm-up's compile to the mode's pool."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.compiled_on: list[str] = []

    def __call__(self, kernel: str, *args: object, grid: object, warmup: bool, **kw: object):
        import threading

        from triton.runtime import _async_compile

        self.calls.append((kernel, warmup))
        mode = _async_compile.active_mode.get()
        if warmup and mode is not None:

            def compile_kernel() -> str:
                self.compiled_on.append(threading.current_thread().name)
                return kernel

            return mode.submit(kernel, compile_kernel, lambda _: None, lambda _: None)
        return None


@pytest.fixture
def recording_run(monkeypatch: pytest.MonkeyPatch) -> RecordingRun:
    from triton.runtime.jit import JITFunction

    recorder = RecordingRun()
    monkeypatch.setattr(JITFunction, "run", recorder)
    return recorder


def test_compiling_ahead_turns_launches_into_pooled_compiles(recording_run: RecordingRun):
    from triton.runtime.jit import JITFunction

    def forward() -> None:
        for kernel in ("norm", "gemv", "norm"):
            JITFunction.run(kernel, grid=(1,), warmup=False)  # what kernel[grid](...) calls

    kernel_cache.compile_ahead(forward)
    assert recording_run.calls == [("norm", True), ("gemv", True), ("norm", True)]
    assert len(recording_run.compiled_on) == 2  # one compile per kernel, however often launched
    assert all(name.startswith("metallic-compile") for name in recording_run.compiled_on)
    JITFunction.run("norm", grid=(1,), warmup=False)  # afterwards launches launch again
    assert recording_run.calls[-1] == ("norm", False)


def test_a_forward_that_fails_while_compiling_ahead_costs_only_the_head_start(
    recording_run: RecordingRun,
):
    from triton.runtime import _async_compile
    from triton.runtime.jit import JITFunction

    def forward() -> None:
        JITFunction.run("gemv", grid=(1,), warmup=False)
        raise RuntimeError("a value no kernel wrote")

    kernel_cache.compile_ahead(forward)  # no error
    assert recording_run.compiled_on and _async_compile.active_mode.get() is None
    JITFunction.run("gemv", grid=(1,), warmup=False)
    assert recording_run.calls[-1] == ("gemv", False)
