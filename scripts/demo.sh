#!/usr/bin/env bash
# Set up (first run only) and run the end-to-end demo on the embedded digits data. Extra arguments go to
# `edgevit demo` (default output directory: demo/).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
exec .venv/bin/edgevit demo "$@"
