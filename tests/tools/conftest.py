"""The command line run in-process (its exit code, stdout and stderr), for the tools' tests."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable

import pytest

from metallic.cli import main

Cli = Callable[..., tuple[int, str, str]]


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def cli() -> Cli:
    return run_cli
