#!/usr/bin/env bash
# Installs Gigatron and everything its tests and quickstart need, on a fresh CPU machine.
# torch is pinned to the CPU build so that no multi-GB CUDA wheel is pulled.
# One line per step says what is being installed; pip itself stays quiet (-q) unless it fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { echo "[install] $*"; }

if $PY -c "import torch" 2>/dev/null; then
  say "torch $($PY -c 'import torch; print(torch.__version__)') is already installed"
else
  say "torch 2.13.0 (CPU build; the largest download, some minutes on a slow connection) ..."
  $PY -m pip install -q torch==2.13.0
fi
packages=$(grep -v '^[[:space:]]*\(#\|$\)' requirements-dev.txt | sed 's/[=<>!~;[:space:]].*//')
say "$(echo "$packages" | wc -l | tr -d ' ') packages of requirements-dev.txt: $(echo $packages | sed 's/ /, /g') ..."
$PY -m pip install -q -r requirements-dev.txt
say "gigatron itself (pip install -e .) ..."
$PY -m pip install -q --no-deps --no-build-isolation -e . 2>/dev/null || $PY -m pip install -q --no-deps -e .
say "done"
