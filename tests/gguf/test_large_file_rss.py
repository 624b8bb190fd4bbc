"""Opening a multi-GB model must map it, not read it: anonymous memory stays flat.

A sparse Llama-3-8B Q4_K_M (4.9 GB apparent, only its header on disk) is written in seconds; a
reader that copied tensor data into process memory would show up in ``RssAnon`` at once, while
pages of a file mapping count as ``RssFile`` and can be dropped by the kernel at will.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metallic.gguf.reader import open_gguf

MiB = 1 << 20
OPEN_LIMIT = 64 * MiB
TOUCH_LIMIT = 16 * MiB


def _rss_anon() -> int:
    """This process's anonymous resident memory in bytes (Linux only)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        pytest.skip("no /proc/self/status on this system")
    for line in status.splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    pytest.skip("/proc/self/status has no RssAnon line")


def test_opening_an_8b_model_maps_instead_of_reading(tmp_path: Path) -> None:
    # Written by a child process, so this one's heap holds no freed memory to hide the cost in.
    path = tmp_path / "llama3-8b.gguf"
    start = time.perf_counter()
    args = ["--shape", "llama3-8b", "--mix", "Q4_K_M", "--fill", "sparse"]
    command = [sys.executable, "-m", "metallic.testing.synthetic", str(path), *args]
    subprocess.run(command, check=True, capture_output=True)
    write_seconds = time.perf_counter() - start
    assert path.stat().st_size > 4.5e9

    gc.collect()
    before = _rss_anon()
    gguf = open_gguf(path)
    opened = _rss_anon()
    assert len(gguf.tensors) == 291

    output = gguf.tensor("output.weight")
    view = output.raw_bytes()
    assert view.numel() == output.n_bytes > 400 * MiB
    assert not view.any()  # reads every byte of the 431 MB tensor (a hole: zeros)
    touched = _rss_anon()

    print(
        f"\nsparse llama3-8b Q4_K_M: {path.stat().st_size / 1e9:.2f} GB written in "
        f"{write_seconds:.1f} s; RssAnon +{(opened - before) / MiB:.1f} MiB on open_gguf, "
        f"+{(touched - opened) / MiB:.1f} MiB reading output.weight"
    )
    assert opened - before < OPEN_LIMIT
    assert touched - opened < TOUCH_LIMIT
