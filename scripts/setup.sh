#!/usr/bin/env bash
# Creates .venv with edgevit and its test tools, from constraints.txt (CPU-friendly torch, known-good
# versions). Idempotent: a second run only checks. Sourced by demo.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import edgevit, torch, timm, onnxruntime, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ] || [ constraints.txt -nt .venv/.installed ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev,quant]"
  touch .venv/.installed
fi
