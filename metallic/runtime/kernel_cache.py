"""Triton's cache of compiled kernels, as metallic's start-up sees it.

Triton compiles a kernel the first time a process launches it with new argument types or
specializations, and keeps the binary in its cache folder (`TRITON_CACHE_DIR`, by default
~/.triton/cache), so later runs only load it. metallic's kernels take a few tens of seconds to
compile, which a user would otherwise take for a hang: `CompileNotice` says so on stderr, with a
count of the kernels compiled so far, when a run is about to compile them for the first time.

"For the first time" is known from a marker in metallic's cache folder, one per metallic
version, kernel sources, Triton version, GPU and Triton cache folder: it lists the cache files of
the kernels a run's warm-up compiled or loaded, and is written when that warm-up ends. A run
whose marker is missing, or names a cache file that is gone (the Triton cache was cleared), is a
first run and says so before its first kernel. Any other run that compiles all the same (a model
with other shapes) says so at its first compiled kernel; a run that compiles nothing says
nothing. Only CUDA compiles: the CPU path and the Triton interpreter never do, and stay silent.

A first run compiles some 27 kernels, one after another as a forward meets them if nothing is
done about it (15.6 s on an H200 host). `compile_ahead` runs the forward once more beforehand
with every Triton launch turned into a compile on a thread pool (Triton's `AsyncCompileMode`:
LLVM and MLIR release the GIL, ptxas is a process of its own), so the compiles overlap; the real
forward then finds each kernel in the kernels' own caches under the same specialization key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TextIO

import torch

from metallic import __version__
from metallic.gguf.cache import cache_dir

KERNEL_SOURCES = Path(__file__).resolve().parent.parent / "kernels"
MARKER_FOLDER = "kernels"  # under metallic's cache folder
MAX_COMPILE_THREADS = 32  # a compile holds a few hundred MB at its peak

log = logging.getLogger("metallic")


def compiles_kernels(device: torch.device) -> bool:
    """Whether running on `device` compiles Triton kernels (CUDA, not the interpreter)."""
    return device.type == "cuda" and os.environ.get("TRITON_INTERPRET") != "1"


def triton_cache_dir() -> Path:
    """Where Triton keeps compiled kernels (its knobs, else its documented defaults)."""
    try:
        import triton.knobs

        return Path(triton.knobs.cache.dir)
    except (ImportError, AttributeError):  # a Triton from before its knobs module
        home = os.environ.get("TRITON_HOME") or Path.home()
        return Path(os.environ.get("TRITON_CACHE_DIR") or Path(home) / ".triton" / "cache")


def cache_identity(device: torch.device) -> dict[str, str]:
    """What a compiled kernel depends on: metallic's kernel sources, Triton, the GPU, and the
    folder the binaries are kept in."""
    import triton

    sources = hashlib.sha256()
    for path in sorted(KERNEL_SOURCES.glob("*.py")):
        sources.update(path.name.encode() + b"\0" + path.read_bytes())
    major, minor = torch.cuda.get_device_capability(device)
    return {
        "metallic": __version__,
        "kernel_sources": sources.hexdigest()[:16],
        "triton": triton.__version__,
        "device": f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})",
        "triton_cache": str(triton_cache_dir()),
    }


def marker_path(identity: dict[str, str], folder: Path | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return (folder or cache_dir()) / MARKER_FOLDER / f"compiled-{digest}.json"


def _marker_files(marker: Path) -> list[str] | None:
    """The cache files a marker lists, or None where there is no readable marker."""
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = isinstance(files, list) and all(isinstance(f, str) for f in files)
    return files if ok else None


Listener = Callable[..., None]


class CompileNotice:
    """Tells a user on stderr that this run compiles GPU kernels, and how far it is.

    `for_device` starts one for every run that can compile: it hooks Triton's compilation
    listener until `finish` (the end of the warm-up). Where the marker says the kernels were
    never compiled here, it speaks at once ("first run"); otherwise only if Triton compiles
    something after all (another model's shapes, say), at the first kernel compiled. `finish`
    prints the total where it spoke, and records the kernels' cache files in the marker.
    """

    def __init__(
        self,
        marker: Path,
        identity: dict[str, str],
        stream: TextIO,
        known_files: list[str] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`known_files`: the marker's list, if the kernels it names are all still cached;
        None makes this a first run."""
        self.marker = marker
        self.identity = identity
        self.stream = stream
        self.clock = clock
        self.first_run = known_files is None
        self.live = stream.isatty()  # a line rewritten in place; logs get a start and an end
        self.compiled = 0
        self.files: set[str] = set(known_files or ())
        self.started = clock()
        self.spoke = False
        self.done = False
        self._previous: Listener | None = None
        self._knobs: Any = None

    @classmethod
    def for_device(
        cls, device: torch.device, stream: TextIO | None = None, folder: Path | None = None
    ) -> CompileNotice | None:
        """A started notice where running on `device` compiles kernels; None on the CPU, in
        the interpreter, or without Triton."""
        if not compiles_kernels(device):
            return None
        try:
            identity = cache_identity(device)
        except ImportError:  # no triton: loading the kernels says so
            return None
        marker = marker_path(identity, folder)
        files = _marker_files(marker)
        if files is not None and not all(Path(f).exists() for f in files):
            files = None  # the Triton cache was cleared since
        notice = cls(marker, identity, stream or sys.stderr, files)
        notice.start()
        return notice

    @property
    def headline(self) -> str:
        what = "GPU kernels (first run; " if self.first_run else "more GPU kernels ("
        return f"metallic: compiling {what}cached in {self.identity['triton_cache']})..."

    def start(self) -> None:
        """Count what Triton compiles from now on; on a first run, say so at once."""
        with contextlib.suppress(ImportError, AttributeError):  # no listener: the line alone
            import triton.knobs

            self._knobs = triton.knobs.compilation
            self._previous = self._knobs.listener
            self._knobs.listener = self._listen
        if self.first_run:
            self._speak()

    def _speak(self) -> None:
        self.spoke = True
        print(self.headline, end="" if self.live else "\n", file=self.stream, flush=True)

    def _listen(self, **event: Any) -> None:
        """Triton's compilation listener: one call per kernel compiled or found in its cache
        (after `finish`, only passed on: a later notice may have chained this one)."""
        if not self.done:
            group = event.get("metadata_group") or {}
            self.files.update(path for name, path in group.items() if name.endswith(".json"))
            if not event.get("cache_hit"):
                self.compiled += 1
                if not self.spoke:
                    self._speak()
                if self.live:
                    seconds = self.clock() - self.started
                    print(
                        f"\r{self.headline} {self.compiled} kernels, {seconds:.0f} s",
                        end="",
                        file=self.stream,
                        flush=True,
                    )
        if self._previous is not None:
            self._previous(**event)

    def finish(self) -> None:
        """The warm-up is over: stop counting, print the total where the notice spoke, and
        record the kernels in the marker where it changed."""
        if self.done:
            return
        self.done = True
        if self._knobs is not None and self._knobs.listener == self._listen:
            self._knobs.listener = self._previous
        if self.spoke:
            seconds = self.clock() - self.started
            end = f"metallic: compiled {self.compiled} GPU kernels in {seconds:.1f} s"
            print(f"\r\033[K{end}" if self.live else end, file=self.stream, flush=True)
        if not (self.first_run or self.compiled):
            return
        record = {**self.identity, "files": sorted(self.files), "compiled": self.compiled}
        with contextlib.suppress(OSError):  # an unwritable cache: the notice shows again
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            partial = self.marker.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(record, indent=1) + "\n")
            partial.replace(self.marker)


def compile_ahead(forward: Callable[[], object]) -> None:
    """Compile every Triton kernel `forward` launches, in parallel, launching none of them.

    `forward` runs with each launch turned into a warm-up (a compile, or a look-up in Triton's
    cache) submitted to a thread pool; its other work (torch ops) runs on the inputs as they
    are, on activations no kernel wrote, so it must not depend on their values (a forward fit
    for graph capture does not). At the end every compile is waited for and its kernel put in
    its function's cache, where the same launch finds it. A compile that fails here is left to
    the real launch, which fails the same way with Triton's own error; anything else that
    fails only costs the head start. Without Triton's `AsyncCompileMode` this does nothing.
    """
    try:
        from triton import AsyncCompileMode
        from triton.runtime.jit import JITFunction
    except ImportError:
        return
    workers = min(MAX_COMPILE_THREADS, os.cpu_count() or 1)
    began = time.perf_counter()
    try:
        with (
            ThreadPoolExecutor(workers, thread_name_prefix="metallic-compile") as pool,
            AsyncCompileMode(pool, ignore_errors=True),
            _launches_only_compile(JITFunction),
        ):
            forward()
    except Exception as err:  # a head start only: the real forward reports any problem
        log.debug("compiling ahead stopped: %s", err)
    log.debug("compiled ahead on %d threads in %.1f s", workers, time.perf_counter() - began)


@contextlib.contextmanager
def _launches_only_compile(jit_function: Any) -> Iterator[None]:
    """Within: `kernel[grid](...)` compiles (or finds) the kernel as `kernel.warmup` would."""
    original = jit_function.run

    def compile_only(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        return original(self, *args, grid=grid, warmup=True, **kwargs)

    jit_function.run = compile_only
    try:
        yield
    finally:
        jit_function.run = original
