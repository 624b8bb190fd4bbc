"""Device limits: measured, cached per device under the user's cache folder, read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from metallic.errors import MetallicError
from metallic.runtime import calibration

CPU = torch.device("cpu")


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("METALLIC_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert calibration.cache_dir() == tmp_path / "xdg" / "metallic"
    monkeypatch.setenv("METALLIC_CACHE", str(tmp_path / "mine"))
    assert calibration.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("METALLIC_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert calibration.cache_dir() == Path.home() / ".cache" / "metallic"


def test_measure_save_load(tmp_path: Path) -> None:
    assert calibration.load(CPU, tmp_path) is None
    found = calibration.measure(CPU, torch.float32, copy_bytes=4 << 20, matmul_size=128, repeats=3)
    assert found.copy_bandwidth > 0 and found.matmul_flops > 0
    assert found.matmul_dtype == "float32"
    assert found.device == calibration.device_key(CPU)
    assert f"({torch.get_num_threads()} threads)" in found.device
    path = calibration.save(found, tmp_path)
    assert calibration.load(CPU, tmp_path) == found
    other = calibration.Calibration("another device", 1.0, 2.0, "bfloat16", "2026-01-01", "x")
    calibration.save(other, tmp_path)
    assert set(json.loads(path.read_text())) == {found.device, "another device"}
    assert calibration.load(CPU, tmp_path) == found


def test_a_damaged_cache_is_one_line(tmp_path: Path) -> None:
    (tmp_path / calibration.FILE_NAME).write_text("{not json")
    with pytest.raises(MetallicError, match="cannot read the calibration cache") as info:
        calibration.load(CPU, tmp_path)
    assert "\n" not in str(info.value)
