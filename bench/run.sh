#!/usr/bin/env bash
# Stock QLoRA recipe vs qtune's training path, side by side. See bench/bench.py for the modes.
#   bench/run.sh             CUDA present: the LLaMA-2-7B-shape rows; no CUDA: the tiny CPU check (seconds)
#   bench/run.sh --cpu-real  SmolLM2-135M on real CodeAlpaca rows, on CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
mode=auto
args=()
for a in "$@"; do
  case "$a" in
    --cpu-real) mode=cpu-real ;;
    --tiny) mode=tiny ;;
    *) args+=("$a") ;;
  esac
done
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
exec "$PY" bench/bench.py --mode "$mode" "${args[@]}"
