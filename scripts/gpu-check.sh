#!/usr/bin/env bash
# The one-command GPU check (issue 23, section 4): on a machine with an NVIDIA GPU, Python 3.12, numpy, torch,
# transformers and onnx, but no package registry. Run from anywhere; every argument goes to scripts/gpu_check.py:
#
#   bash scripts/gpu-check.sh                       # --provider cuda, report in ./gpu-check-out/gpu-check.json
#   bash scripts/gpu-check.sh --out /tmp/gc --dtypes fp16
#   PYTHON=.venv/bin/python bash scripts/gpu-check.sh --provider cpu --smoke   # CPU smoke run (tests do this)
#
# 1. onnxruntime-gpu (skipped with --provider cpu): ../shared/gpu/README.md brings its wheel in parts (.ortgpu1 ..
#    .ortgpu4 in this checkout, carried one per run). Parts found here are copied to $ORT_PARTS (/tmp/ortparts);
#    once they form the whole wheel, its device-env.sh installs it into /tmp/site and sets PYTHONPATH and
#    LD_LIBRARY_PATH (CUDA and cuDNN from torch's nvidia-* wheels). Pure-Python wheels in $ORT_PARTS/wheels (e.g.
#    onnx_ir for the int4 quantizer) are installed into /tmp/site too.
# 2. specx itself runs from this checkout (PYTHONPATH), not pip-installed.
# 3. scripts/gpu_check.py checks what Python can import (exit 2 naming what is missing) and that sessions really
#    run on CUDA (exit 3 when onnxruntime falls back to the CPU), then runs the checks (exit 1 when one fails).
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root" || exit 2
PYTHON=${PYTHON:-python3}
ORT_PARTS=${ORT_PARTS:-/tmp/ortparts}
SITE=/tmp/site

wants_cpu() {
  local previous=""
  for arg in "$@"; do
    [ "$arg" = "--provider=cpu" ] && return 0
    [ "$previous" = "--provider" ] && [ "$arg" = "cpu" ] && return 0
    previous=$arg
  done
  return 1
}

collect_parts() {  # the parts carried into this checkout, gathered where device-env.sh expects them
  local dir
  for dir in .ortgpu*/; do
    [ -d "$dir" ] || continue
    mkdir -p "$ORT_PARTS"
    cp -r "$dir". "$ORT_PARTS"/
  done
}

wheel_complete() {  # the parts, concatenated, are a whole zip file (a missing part leaves no central directory)
  ls "$ORT_PARTS"/part-* >/dev/null 2>&1 || return 1
  local tmp
  tmp=$(mktemp)
  cat "$ORT_PARTS"/part-* > "$tmp"
  "$PYTHON" -c "import sys, zipfile; sys.exit(0 if zipfile.is_zipfile(sys.argv[1]) else 1)" "$tmp"
  local ok=$?
  rm -f "$tmp"
  return $ok
}

install_ort_gpu() {
  if [ ! -d "$SITE/onnxruntime" ]; then
    collect_parts
    if [ ! -f "$ORT_PARTS/device-env.sh" ] || ! wheel_complete; then
      local have
      have=$(ls "$ORT_PARTS"/part-* 2>/dev/null | wc -l)
      echo "gpu-check: onnxruntime-gpu is not installed and its parts in $ORT_PARTS are incomplete ($have part(s)," \
           "device-env.sh $([ -f "$ORT_PARTS/device-env.sh" ] && echo present || echo missing))." >&2
      echo "gpu-check: bring the rest as ../shared/gpu/README.md says (.ortgpu1 .. .ortgpu4, one per run), then rerun." >&2
      exit 2
    fi
  fi
  # shellcheck disable=SC1091
  source "$ORT_PARTS/device-env.sh" || { echo "gpu-check: $ORT_PARTS/device-env.sh failed" >&2; exit 2; }
  if ls "$ORT_PARTS"/wheels/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$ORT_PARTS"/wheels/*.whl \
      || echo "gpu-check: could not install $ORT_PARTS/wheels/*.whl (continuing without them)" >&2
  fi
}

if ! wants_cpu "$@"; then
  install_ort_gpu
  command -v nvidia-smi >/dev/null && nvidia-smi -L
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
exec "$PYTHON" scripts/gpu_check.py "$@"
