#!/usr/bin/env bash
# Installs Gigatron and everything its tests and quickstart need, on a fresh CPU machine.
# torch is pinned to the CPU build so that no multi-GB CUDA wheel is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  $PY -m pip install -q torch==2.13.0
fi
$PY -m pip install -q -r requirements-dev.txt
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || $PY -m pip install -q --no-deps -e .
