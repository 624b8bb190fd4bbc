#!/usr/bin/env bash
# The test command (README and CI): lint, format check, then the whole suite on the CPU.
# Triton kernels run under the interpreter here (TRITON_INTERPRET=1), on small shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest "$@"
