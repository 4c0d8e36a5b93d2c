#!/usr/bin/env bash
# Set up .venv for opd on a machine with only Python >= 3.11 and pip.
# torch==2.13.0 goes first: a looser pin, asked for by another package, would pull CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,lora]"
