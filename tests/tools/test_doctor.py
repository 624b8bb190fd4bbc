"""`metallic doctor` on a machine without a GPU: it runs, says so and why, and calibrates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metallic.runtime import calibration


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("METALLIC_CACHE", str(tmp_path))
    return tmp_path


def test_doctor_says_there_is_no_gpu(cli) -> None:
    code, out, err = cli("doctor", "--device", "cpu")
    assert code == 0, err
    lines = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith("no "))
    assert {"metallic", "device", "kernels", "triton", "limits", "cache"} <= set(lines)
    assert f"torch {torch.__version__}" in lines["metallic"]
    no_gpu = [line for line in out.splitlines() if line.startswith("no GPU")]
    assert len(no_gpu) == 1
    assert lines["kernels"].startswith("torch: ")
    assert "not measured (metallic doctor --calibrate)" in lines["limits"]


def test_doctor_json_explains_the_device_and_kernel_path(cli) -> None:
    code, out, _ = cli("doctor", "--json", "--device", "cpu")
    assert code == 0
    found = json.loads(out)
    assert found["device"]["type"] == "cpu" and found["device"]["no_gpu_because"]
    assert found["kernels"]["path"] == "torch"
    assert found["dtype"] == {"weights": "float16", "activations": "float32"}
    assert set(found["versions"]) == {"metallic", "python", "torch", "triton", "gguf"}
    assert found["triton_cache"]["files"] >= 0 and found["triton_cache"]["dir"]
    if not torch.cuda.is_available():  # the default device is the CPU too, and says why
        code, out, _ = cli("doctor", "--json")
        reason = json.loads(out)["device"]["no_gpu_because"]
        assert "CUDA" in reason and "asked for" not in reason


def test_calibrate_caches_the_limits(cli, cache: Path) -> None:
    code, out, err = cli("doctor", "--calibrate", "--device", "cpu")
    assert code == 0, err
    found = calibration.load(torch.device("cpu"))
    assert found is not None and found.copy_bandwidth > 0 and found.matmul_flops > 0
    assert found.matmul_dtype == "float32"
    assert (cache / calibration.FILE_NAME).exists()
    assert f"saved in {cache / calibration.FILE_NAME}" in err
    assert "GB/s" in out.split("limits", 1)[1].splitlines()[0]
