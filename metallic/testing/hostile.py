"""Hostile variants of tiny valid models, run through the whole load: the fuzz behind
tests/engine/test_load_fuzz.py and benchmarks/fuzz_load.py.

A user's model file is untrusted down to its last byte. Each case starts from a tiny valid model of
one supported family (Q8_0, written once by `synthetic`) and changes what its well-formed header
says: one to three scalar values overwritten by hostile numbers (0, 1, -1 as unsigned, 2**31-1,
2**32-1, 100000, NaN, +-inf, 1e30, ...) or removed, a per-layer array of the wrong length or with
one hostile entry, a tokenizer array truncated or swapped with another, or a few header bytes
flipped. Variants are assembled from the base file's own bytes (only the changed entries are
encoded again), so thousands are written in seconds. `run_case` loads one on the CPU and generates
two tokens: a clean run or a one-line `MetallicError` are the only acceptable outcomes, never
another exception, a hang or a jump in memory.
"""

from __future__ import annotations

import logging
import math
import random
import resource
import signal
import struct
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType

from metallic.engine.engine import Engine
from metallic.engine.sampling import SamplingParams
from metallic.errors import MetallicError
from metallic.testing.synthetic import ModelShape, write_synthetic_model

V = GGUFValueType

# Tiny shapes of each family (Q8_0 needs rows of whole 32-blocks): qwen3's heads are wider than
# hidden / n_heads, and gemma3's six layers hold five sliding ones and a global one.
FAMILIES: dict[str, ModelShape] = {
    s.arch: s
    for s in (
        ModelShape("llama", 2, 64, 128, 2, 1, 32, 320, 2048, 10000.0, 1e-5, False,
                   name="fuzz-llama"),
        ModelShape("qwen2", 2, 64, 128, 2, 1, 32, 320, 2048, 1e6, 1e-6, True, qkv_bias=True,
                   name="fuzz-qwen2"),
        ModelShape("qwen3", 2, 64, 128, 2, 1, 64, 320, 2048, 1e6, 1e-6, True, name="fuzz-qwen3"),
        ModelShape("gemma3", 6, 64, 128, 2, 1, 64, 320, 2048, 1e6, 1e-6, True, sliding_window=4,
                   name="fuzz-gemma3"),
    )
}  # fmt: skip

HOSTILE_INTS = (0, 1, 2, 3, 2**31 - 1, 2**32 - 1, 2**32, 100_000, 2**63 - 1, 2**64 - 1, -1)
HOSTILE_FLOATS = (math.nan, math.inf, -math.inf, 1e30, 0.0, -1.0, 1e-45)
PER_LAYER_KEYS = (
    "attention.head_count",
    "attention.head_count_kv",
    "feed_forward_length",
    "attention.key_length",
    "attention.sliding_window",
)
TOKENIZER_ARRAYS = (
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.merges",
)
OUTCOMES = ("ran", "error", "other", "hang", "memory")
HANG_SECONDS = 10  # a case still running after this much CPU time is a hang
MEMORY_BOUND_BYTES = 256 << 20  # peak RSS one case may add
ADDRESS_SPACE_HEADROOM = 4 << 30  # past this, allocations fail instead of exhausting the machine
PROMPT = "hello world"

_SCALAR_FORMATS = {
    V.UINT8: "<B",
    V.INT8: "<b",
    V.UINT16: "<H",
    V.INT16: "<h",
    V.UINT32: "<I",
    V.INT32: "<i",
    V.FLOAT32: "<f",
    V.BOOL: "<?",
    V.UINT64: "<Q",
    V.INT64: "<q",
    V.FLOAT64: "<d",
}


def _encode_value(value: Any, vtype: GGUFValueType, subtype: GGUFValueType | None) -> bytes:
    if vtype == V.STRING:
        text = value.encode("utf-8")
        return struct.pack("<Q", len(text)) + text
    if vtype == V.ARRAY:
        assert subtype is not None
        items = b"".join(_encode_value(item, subtype, None) for item in value)
        return struct.pack("<IQ", subtype, len(value)) + items
    return struct.pack(_SCALAR_FORMATS[vtype], value)


@dataclass(frozen=True)
class Entry:
    """One metadata key/value pair and its encoding in the file."""

    key: str
    value: Any
    vtype: GGUFValueType
    subtype: GGUFValueType | None = None
    raw: bytes = b""

    @classmethod
    def encoded(
        cls, key: str, value: Any, vtype: GGUFValueType, subtype: GGUFValueType | None = None
    ) -> Entry:
        name = key.encode("utf-8")
        head = struct.pack("<Q", len(name)) + name + struct.pack("<I", vtype)
        return cls(key, value, vtype, subtype, head + _encode_value(value, vtype, subtype))


class BaseModel:
    """A valid model split into its metadata entries, its tensor-info bytes and its tensor data,
    so that variants with other entries are put together without encoding the rest again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        reader = GGUFReader(path)
        self.entries: list[Entry] = []
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            size = sum(int(p.nbytes) for p in field.parts)
            subtype = field.types[1] if field.types[0] == V.ARRAY else None
            raw = self.data[field.offset : field.offset + size]
            self.entries.append(Entry(key, field.contents(), field.types[0], subtype, raw))
        infos = [t.field for t in reader.tensors]
        start = infos[0].offset
        end = infos[-1].offset + sum(int(p.nbytes) for p in infos[-1].parts)
        self.tensor_infos = self.data[start:end]
        self.n_tensors = len(infos)
        self.alignment = int(reader.alignment)
        self.data_offset = int(reader.data_offset)
        self.arch = str(reader.fields["general.architecture"].contents())
        self.n_layers = int(reader.fields[f"{self.arch}.block_count"].contents())

    def entry(self, key: str) -> Entry | None:
        return next((e for e in self.entries if e.key == key), None)

    def assemble(self, entries: list[Entry], tensor_infos: bytes | None = None) -> bytes:
        """A GGUF file with these metadata entries and the base model's tensors (described by
        `tensor_infos` instead of the base's own, where given)."""
        head = struct.pack("<4sIQQ", b"GGUF", 3, self.n_tensors, len(entries))
        head += b"".join(e.raw for e in entries)
        head += self.tensor_infos if tensor_infos is None else tensor_infos
        padding = b"\0" * (-len(head) % self.alignment)
        return head + padding + self.data[self.data_offset :]


def replaced(entries: list[Entry], new: Entry) -> list[Entry]:
    """`entries` with `new` in place of the entry of its key (appended when there is none)."""
    if not any(e.key == new.key for e in entries):
        return [*entries, new]
    return [new if e.key == new.key else e for e in entries]


def _hostile_scalar(key: str, rng: random.Random) -> Entry:
    """`key` set to a hostile number, in a GGUF type that holds it (sometimes a wider one)."""
    if rng.random() < 0.3:
        value: Any = rng.choice(HOSTILE_FLOATS)
        return Entry.encoded(key, value, rng.choice((V.FLOAT32, V.FLOAT64)))
    value = rng.choice(HOSTILE_INTS)
    if value < 0:
        return Entry.encoded(key, value, rng.choice((V.INT32, V.INT64)))
    if value < 2**32:
        return Entry.encoded(key, value, rng.choice((V.UINT32, V.UINT32, V.UINT64)))
    return Entry.encoded(key, value, V.UINT64)


def _numeric_keys(base: BaseModel) -> list[str]:
    numeric = set(_SCALAR_FORMATS) - {V.BOOL}
    return [e.key for e in base.entries if e.vtype in numeric]


def _scalar_case(base: BaseModel, rng: random.Random) -> tuple[str, list[Entry]]:
    entries = list(base.entries)
    changes = []
    for key in rng.sample(_numeric_keys(base), rng.randint(1, 3)):
        if rng.random() < 0.1:
            entries = [e for e in entries if e.key != key]
            changes.append(f"{key} removed")
            continue
        new = _hostile_scalar(key, rng)
        entries = replaced(entries, new)
        changes.append(f"{key} = {new.value!r} ({new.vtype.name})")
    return "; ".join(changes), entries


def _per_layer_case(base: BaseModel, rng: random.Random) -> tuple[str, list[Entry]]:
    """A per-layer array: the right length and uniform (valid), or wrong length, or one entry
    hostile, or of another element type."""
    key = f"{base.arch}.{rng.choice(PER_LAYER_KEYS)}"
    current = base.entry(key)
    value = current.value if current is not None else rng.choice((1, 2, 32, 64))
    n = base.n_layers
    variant = rng.choice(("uniform", "short", "long", "hostile entry", "float"))
    subtype = V.UINT32
    if variant == "uniform":
        values = [value] * n
    elif variant == "short":
        values = [value] * rng.randint(1, max(1, n - 1))
    elif variant == "long":
        values = [value] * (n + rng.choice((1, n, 1000)))
    elif variant == "hostile entry":
        values = [value] * n
        values[rng.randrange(n)] = rng.choice([v for v in HOSTILE_INTS if 0 <= v < 2**32])
    else:
        values, subtype = [float(value)] * n, V.FLOAT32
    new = Entry.encoded(key, values, V.ARRAY, subtype)
    return f"{key} = per-layer array, {variant}", replaced(list(base.entries), new)


def _tokenizer_case(base: BaseModel, rng: random.Random) -> tuple[str, list[Entry]]:
    """A tokenizer array truncated, swapped with another array, or with two items swapped."""
    present = [key for key in TOKENIZER_ARRAYS if base.entry(key) is not None]
    key = rng.choice(present)
    old = base.entry(key)
    assert old is not None
    variant = rng.choice(("truncated", "swapped arrays", "swapped items"))
    if variant == "truncated":
        kept = rng.choice((1, 2, len(old.value) // 2, len(old.value) - 1))
        new = Entry.encoded(key, old.value[: max(1, kept)], V.ARRAY, old.subtype)
        return f"{key} truncated to {max(1, kept)} items", replaced(list(base.entries), new)
    if variant == "swapped arrays":
        other_key = rng.choice([k for k in present if k != key])
        other = base.entry(other_key)
        assert other is not None
        entries = replaced(list(base.entries), Entry.encoded(key, *_array(other)))
        entries = replaced(entries, Entry.encoded(other_key, *_array(old)))
        return f"{key} and {other_key} swapped", entries
    values = list(old.value)
    i, j = rng.randrange(len(values)), rng.randrange(len(values))
    values[i], values[j] = values[j], values[i]
    new = Entry.encoded(key, values, V.ARRAY, old.subtype)
    return f"{key} items {i} and {j} swapped", replaced(list(base.entries), new)


def _array(entry: Entry) -> tuple[Any, GGUFValueType, GGUFValueType | None]:
    return entry.value, entry.vtype, entry.subtype


def _flipped_bytes(base: BaseModel, rng: random.Random) -> tuple[str, bytes]:
    data = bytearray(base.data)
    positions = sorted(rng.randrange(base.data_offset) for _ in range(rng.randint(1, 8)))
    for position in positions:
        data[position] = rng.randrange(256)
    return f"header bytes changed at {positions}", bytes(data)


CASE_KINDS = ("scalar", "per-layer", "tokenizer", "flip")


@dataclass(frozen=True)
class Case:
    seed: int
    family: str  # the architecture of its base model
    kind: str  # one of CASE_KINDS
    description: str
    data: bytes


class HostileModels:
    """Writes one tiny valid model per family into `workdir`, then makes cases from them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.bases = {
            arch: BaseModel(write_synthetic_model(workdir / f"{shape.name}.gguf", shape, "Q8_0"))
            for arch, shape in FAMILIES.items()
        }

    def case(self, seed: int) -> Case:
        """Case `seed`: the same file on every run."""
        rng = random.Random(seed)
        arch = list(self.bases)[seed % len(self.bases)]
        base = self.bases[arch]
        kind = rng.choices(CASE_KINDS, weights=(5, 2, 2, 2))[0]
        if kind == "flip":
            description, data = _flipped_bytes(base, rng)
            return Case(seed, arch, kind, description, data)
        make = {"scalar": _scalar_case, "per-layer": _per_layer_case, "tokenizer": _tokenizer_case}
        description, entries = make[kind](base, rng)
        return Case(seed, arch, kind, description, base.assemble(entries))


class Hang(BaseException):
    """Raised from the timer's signal; a BaseException so no `except Exception` on the way can
    eat it."""


@contextmanager
def time_limit(seconds: float, *, cpu: bool = False) -> Iterator[None]:
    """Raise `Hang` in the main thread once `seconds` have passed: of wall-clock time, or (`cpu`)
    of the process's CPU time, which a machine busy with other work does not stretch (a loop
    sized by a hostile count burns CPU; a starved process does not)."""

    def on_timer(signum: int, frame: object) -> None:
        raise Hang

    timer, signum = (
        (signal.ITIMER_PROF, signal.SIGPROF) if cpu else (signal.ITIMER_REAL, signal.SIGALRM)
    )
    previous = signal.signal(signum, on_timer)
    signal.setitimer(timer, seconds)
    try:
        yield
    finally:
        signal.setitimer(timer, 0)
        signal.signal(signum, previous)


@contextmanager
def _address_space_limit(headroom: int) -> Iterator[None]:
    """Cap the address space at its current size plus `headroom`: an allocation sized by a
    hostile count then fails at once instead of exhausting the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as statm:
        current = int(statm.read().split()[0]) * resource.getpagesize()
    limit = current + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@dataclass(frozen=True)
class Outcome:
    kind: str  # one of OUTCOMES
    detail: str = ""


def run_case(path: Path, timeout_s: int = HANG_SECONDS) -> Outcome:
    """Load `path` on the CPU and generate two greedy tokens; how did it end?"""
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    try:
        with time_limit(timeout_s, cpu=True):
            engine = Engine(path, device="cpu")
            list(engine.generate_tokens(PROMPT, params))
    except MetallicError as err:
        message = str(err)
        if not message or "\n" in message:
            return Outcome("other", f"{type(err).__name__} not on one line: {message!r}")
        return Outcome("error", message)
    except Hang:
        return Outcome("hang", f"still running after {timeout_s} s of CPU time")
    except MemoryError:
        return Outcome("memory", "MemoryError")
    except Exception as err:
        if isinstance(err, RuntimeError) and "allocate memory" in str(err):
            return Outcome("memory", str(err).splitlines()[0])
        return Outcome("other", f"{type(err).__name__}: {err}")
    return Outcome("ran")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_cases(
    models: HostileModels,
    seeds: Iterable[int],
    *,
    timeout_s: int = HANG_SECONDS,
    memory_bound: int = MEMORY_BOUND_BYTES,
) -> Iterator[tuple[Case, Outcome]]:
    """Each case written to a fresh file and run; a case that raises the process's peak RSS by
    more than `memory_bound` is a "memory" outcome whatever else it did. Warnings (e.g. ignored
    special-token ids) are silenced while the cases run."""
    for base in models.bases.values():  # warm up: first loads import and allocate for good
        outcome = run_case(base.path, timeout_s)
        if outcome.kind != "ran":
            raise RuntimeError(f"the valid base model {base.path} does not run: {outcome}")
    path = models.workdir / "case.gguf"
    logger = logging.getLogger("metallic")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with _address_space_limit(ADDRESS_SPACE_HEADROOM):
            for seed in seeds:
                case = models.case(seed)
                path.unlink(missing_ok=True)  # a fresh inode: maps of the last case stay valid
                path.write_bytes(case.data)
                before = _peak_rss()
                outcome = run_case(path, timeout_s)
                grown = _peak_rss() - before
                if grown > memory_bound:
                    outcome = Outcome("memory", f"peak RSS grew by {grown >> 20} MiB")
                yield case, outcome
    finally:
        logger.setLevel(level)
