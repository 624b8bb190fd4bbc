"""Programmatic dependent launch: every decode-path kernel compiles for sm_90 with the grid
dependency wait (and without it when PDL is off); the interpreter and CPUs never launch with it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton

from metallic.kernels.pdl import pdl_enabled, pdl_launch, prefetch_enabled

ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


def _sm90(*args: str) -> dict:
    """sm90_pdl.py's JSON, run in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("sm90_pdl.py")), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's wheel ships no ptxas here")
def test_every_decode_kernel_waits_for_its_inputs_on_sm90() -> None:
    waits = _sm90()
    assert len(waits) >= 15
    for name, by_pdl in waits.items():
        assert by_pdl == {"True": True, "False": False}, name


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's wheel ships no ptxas here")
def test_decode_products_prefetch_every_plane_before_the_wait_on_sm90() -> None:
    """With PREFETCH the FMA mode asks the L2 for each of its format's planes (twice, gated:
    gate rows and up rows), the dp4a kernels for theirs, and ptxas keeps every prefetch ahead
    of the grid dependency wait, so they overlap the previous kernel."""
    order = _sm90("--prefetch")
    planes = {"Q4_0": 2, "Q5_0": 3, "Q8_0": 2, "Q4_K": 1, "Q5_K": 1, "Q6_K": 4, "F16": 1, "BF16": 1}
    for qtype, count in planes.items():
        for gated, factor in ((0, 1), (2, 2)):
            assert order[f"{qtype} gated={gated}"] == {
                "prefetches": count * factor,
                "before_wait": True,
            }, qtype
    # The dp4a owner kernels (16 rows a program): a plane's whole rows in one range, or with
    # K split a range a row.
    for name, count in (("Q4_K owner", 1), ("Q4_K staged", 1), ("Q6_K owner", 4)):
        assert order[name] == {"prefetches": count * (1 + 16), "before_wait": True}, name


def test_prefetch_is_asked_for_and_needs_pdl(monkeypatch) -> None:
    monkeypatch.delenv("METALLIC_PREFETCH", raising=False)
    assert not prefetch_enabled(torch.device("cpu"))
    monkeypatch.setenv("METALLIC_PREFETCH", "1")
    assert not prefetch_enabled(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not prefetch_enabled(torch.device("cuda", 0))


def test_cpu_and_the_interpreter_launch_without_pdl(monkeypatch) -> None:
    assert pdl_launch(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl_enabled(torch.device("cuda", 0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("METALLIC_PDL", "0")
    assert not pdl_enabled(torch.device("cuda", 0))
