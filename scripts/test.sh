#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite. Offline: tests build tiny random models and never download.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
