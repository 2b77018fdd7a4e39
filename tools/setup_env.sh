#!/usr/bin/env bash
# Create ./.venv with the verified pins if it is missing (idempotent). Python 3.11, CPU torch.
# torch is installed first so that pip keeps the CPU build for megatron-core's dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
stamp=.venv/.megatron-coe-installed
if [ -f "$stamp" ] && cmp -s "$stamp" requirements.txt; then
  exit 0
fi
echo "[setup] creating .venv with $($PY --version)" >&2
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --no-deps -e . 2>&1 | grep -v -e "^WARNING: Location" -e "^  " || true
.venv/bin/python -c "import torch, megatron.core, megatron_coe; print('[setup] torch', torch.__version__, 'megatron-core', megatron.core.__version__)" >&2
cp requirements.txt "$stamp"
