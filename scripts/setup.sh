#!/usr/bin/env bash
# Create .venv (if missing) and install specx with its export, dev and serve extras.
# torch is pinned to the CPU build first: an unpinned torch would pull a multi-GB CUDA build. Export runs fine on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==${SPECX_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e ".[export,dev,serve]"
# matplotlib (specx bench --plot) is optional: its tests skip where it cannot be installed
.venv/bin/python -m pip install -q -e ".[plot]" 2>/dev/null || echo "matplotlib unavailable: the --plot tests will skip"
