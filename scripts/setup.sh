#!/usr/bin/env bash
# Create .venv (once) and install metallic with its test tools into it.
# PyTorch is pinned to torch==2.13.0 when no torch is installed yet: on the project's machines that
# is a CPU build lying on disk; a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install "torch==2.13.0"
fi
pip install -e ".[test]"
