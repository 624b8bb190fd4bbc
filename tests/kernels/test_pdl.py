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

from metallic.kernels.pdl import pdl_enabled, pdl_launch

ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's wheel ships no ptxas here")
def test_every_decode_kernel_waits_for_its_inputs_on_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("sm90_pdl.py"))],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    waits = json.loads(done.stdout.splitlines()[-1])
    assert len(waits) >= 15
    for name, by_pdl in waits.items():
        assert by_pdl == {"True": True, "False": False}, name


def test_cpu_and_the_interpreter_launch_without_pdl(monkeypatch) -> None:
    assert pdl_launch(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not pdl_enabled(torch.device("cuda", 0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("METALLIC_PDL", "0")
    assert not pdl_enabled(torch.device("cuda", 0))
