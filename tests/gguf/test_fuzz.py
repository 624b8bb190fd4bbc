"""Random damage to a small valid GGUF must end in GGUFError or a usable file, and fast.

Each of a fixed list of seeds makes one mutation (a truncation, a few flipped bytes, or integer
fields overwritten with huge or off-by-one values). Anything but a clean `GGUFError` or a file whose
every tensor and metadata value can be read is a failure, and so is a slow open (a loop driven by a
claimed count) or a jump in peak memory (an allocation sized by a claimed count).
"""

from __future__ import annotations

import math
import random
import resource
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from test_bad_input import write_small_gguf

from metallic.errors import GGUFError
from metallic.gguf.reader import open_gguf
from metallic.testing.hostile import Hang, time_limit

N_CASES = 2000
MAX_SECONDS_PER_CASE = 1.0
HANG_ALARM_SECONDS = 10  # a hung case is stopped here instead of stalling the whole test run
MAX_PEAK_RSS_GROWTH_BYTES = 64 * 2**20
INTERESTING_U64 = [0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**63 + 1, 2**64 - 32, 2**64 - 1]
INTERESTING_U32 = [0, 1, 5, 13, 2**16, 2**31, 2**32 - 1]


def _integer_fields(path: Path) -> list[tuple[int, int]]:
    """(offset, size) of every count, length, type, dimension and offset field of the file."""
    reader = GGUFReader(path)
    fields = [*reader.fields.values(), *(t.field for t in reader.tensors)]
    found = []
    for field in fields:
        offset = field.offset
        for part in field.parts:
            if part.dtype in (np.uint32, np.uint64):
                found += [(offset + i * part.itemsize, part.itemsize) for i in range(part.size)]
            offset += int(part.nbytes)
    return found


def _mutate(data: bytes, header_end: int, fields: list[tuple[int, int]], seed: int) -> bytes:
    """One seeded mutation; most land in the header, where parsing decisions are made."""
    rng = random.Random(seed)
    out = bytearray(data)

    def position(header_share: float = 0.8) -> int:
        return rng.randrange(header_end if rng.random() < header_share else len(out))

    kind = seed % 4
    if kind == 0:
        return bytes(out[: position()])
    if kind == 1:
        for _ in range(rng.randint(1, 8)):
            out[position(header_share=0.5)] = rng.randrange(256)
        return bytes(out)
    for _ in range(rng.randint(1, 2)):
        offset, size = rng.choice(fields)
        current = int.from_bytes(out[offset : offset + size], "little")
        choices = INTERESTING_U64 if size == 8 else INTERESTING_U32
        value = rng.choice([*choices, len(out), current + 1, current - 1, rng.getrandbits(64)])
        out[offset : offset + size] = (value % 2 ** (8 * size)).to_bytes(size, "little")
    if kind == 3:
        return bytes(out[: position()])
    return bytes(out)


def _use_everything(path: Path) -> None:
    """Touch what a model load would: every metadata value and every byte of every tensor."""
    gguf_file = open_gguf(path)
    for key, value in gguf_file.metadata.items():
        assert isinstance(key, str)
        assert isinstance(value, (str, int, float, bool, list)), (key, value)
        repr(value)
    for tensor in gguf_file:
        raw = tensor.raw_bytes()
        assert raw.numel() == tensor.n_bytes
        assert tensor.n_elements == math.prod(tensor.shape)
        assert gguf_file.data_offset <= tensor.file_offset
        assert tensor.file_offset + tensor.n_bytes <= gguf_file.file_size
        int(raw.sum())


def test_random_damage_never_escapes_gguf_error(tmp_path: Path) -> None:
    valid = write_small_gguf(tmp_path / "valid.gguf")
    data = valid.read_bytes()
    fields = _integer_fields(valid)
    header_end = open_gguf(valid).data_offset
    _use_everything(valid)  # warm up, so peak memory below measures the mutations only

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    outcomes = {"opened": 0, "rejected": 0}
    failures: list[str] = []
    slowest = 0.0
    started = time.perf_counter()
    for seed in range(N_CASES):
        path = tmp_path / "case.gguf"
        path.unlink(missing_ok=True)  # a fresh inode: views of the last case stay valid
        path.write_bytes(_mutate(data, header_end, fields, seed))
        case_started = time.perf_counter()
        try:
            with time_limit(HANG_ALARM_SECONDS):
                _use_everything(path)
            outcomes["opened"] += 1
        except GGUFError as err:
            outcomes["rejected"] += 1
            if "\n" in str(err) or not str(err).startswith(f"{path}: "):
                failures.append(f"seed {seed}: malformed message {str(err)!r}")
        except (Exception, Hang) as err:
            failures.append(f"seed {seed}: {type(err).__name__}: {err}")
        elapsed = time.perf_counter() - case_started
        slowest = max(slowest, elapsed)
        if elapsed > MAX_SECONDS_PER_CASE:
            failures.append(f"seed {seed}: took {elapsed:.2f} s")
    total = time.perf_counter() - started
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before

    assert not failures, "\n".join(failures[:20])
    assert peak_growth < MAX_PEAK_RSS_GROWTH_BYTES, f"peak RSS grew by {peak_growth} bytes"
    # both outcomes must be common, or the mutations test nothing (or only the header check)
    assert outcomes["opened"] > N_CASES // 50 and outcomes["rejected"] > N_CASES // 2, outcomes
    print(f"{N_CASES} mutations in {total:.1f} s (slowest {slowest * 1000:.0f} ms): {outcomes}")
