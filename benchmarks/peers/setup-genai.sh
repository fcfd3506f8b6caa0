#!/usr/bin/env bash
# Make onnxruntime-genai 0.18.0 a runnable benchmark peer, in its own venv (never a specx dependency):
#   1. venv at $SPECX_PEERS/genai-venv with onnxruntime-genai and its builder's needs (python -m specx.peers_genai setup)
#   2. a Hugging Face directory from the SmolLM2 GGUF ($SPECX_PEERS/smollm2-hf)
#   3. onnxruntime-genai's own fp32 and int4 CPU models ($SPECX_PEERS/genai-fp32, $SPECX_PEERS/genai-int4)
# Idempotent: each step is skipped when its output exists. Prints the paths at the end.
# Then: "$SPECX_PEERS/genai-venv/bin/python" benchmarks/peers/genai_decode.py --model "$SPECX_PEERS/genai-int4" ...
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
peers="${SPECX_PEERS:-$HOME/.cache/specx-peers}"
venv="$peers/genai-venv"
hf_dir="$peers/smollm2-hf"
cache="$peers/genai-cache"
py="$venv/bin/python"
logs="$peers/logs"
mkdir -p "$peers" "$logs"

# Run a step with its (long, progress-bar) output in a log; show the log's tail if it fails.
quiet() {
  local log="$logs/$1.log"; shift
  if ! "$@" >"$log" 2>&1; then
    echo "FAILED: $* (log: $log)" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}

# 1. venv: specx's own setup of the peer (specx/peers_genai.py, the one `specx bench --against onnxruntime-genai`
# names), run with specx's python so that torch is pinned to the version installed there (an unpinned torch would
# pull a multi-GB CUDA build). Skipped when the venv already has everything.
specx_python="${SPECX_PYTHON:-$here/../../.venv/bin/python}"
SPECX_PEERS="$peers" "$specx_python" -m specx.peers_genai setup

# 2. Hugging Face directory from the GGUF.
if ! [ -s "$hf_dir/config.json" ] || ! [ -s "$hf_dir/tokenizer.json" ]; then
  # The repo's copy of shared/bench/get-smollm2.sh (same cache path); SMOLLM2_GGUF overrides.
  gguf="${SMOLLM2_GGUF:-$(bash "$here/../../scripts/get-smollm2.sh" | tail -n1)}"
  echo "== HF dir from $gguf"
  quiet hf-from-gguf "$py" -I "$here/../../specx/peer_workers/hf_from_gguf.py" "$gguf" "$hf_dir"
else
  echo "== HF dir exists: $hf_dir"
fi

# 3. onnxruntime-genai models (its builder; `--help` crashes in 0.18.0, flags are in builder.py's get_args()).
for precision in fp32 int4; do
  out="$peers/genai-$precision"
  if [ -s "$out/genai_config.json" ] && [ -s "$out/model.onnx" ]; then
    echo "== genai $precision exists: $out"
    continue
  fi
  echo "== genai $precision -> $out"
  rm -rf "$out.part"
  quiet "build-$precision" "$py" -m onnxruntime_genai.models.builder -i "$hf_dir" -o "$out.part" -p "$precision" -e cpu -c "$cache"
  rm -rf "$out"
  mv "$out.part" "$out"
done

echo "venv:       $venv"
echo "python:     $py"
echo "hf_dir:     $hf_dir"
echo "genai_fp32: $peers/genai-fp32"
echo "genai_int4: $peers/genai-int4"
