#!/usr/bin/env bash
# Create a test environment with the verified pins if it is missing (idempotent).
#
#   bash tools/setup_env.sh          # (a) default: ./.venv, Python 3.11, torch 2.13.0 CPU, megatron-core 0.16.1
#   bash tools/setup_env.sh 019      # (b) ./.venv-mcore019, Python 3.12, torch 2.13.0, megatron-core 0.19.2
#
# The name may also come from MCORE_ENV (016 or 019). torch is installed first so that pip keeps the
# build it chose for megatron-core's dependency. Python 3.12 is searched as $PYTHON312, python3.12 on
# PATH, then pyenv's versions; when none is found the script fails and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-${MCORE_ENV:-016}}
case "$name" in
  016|0.16|0.16.1|default)
    venv=.venv req=requirements.txt
    PY=${PYTHON:-python3.11}
    command -v "$PY" >/dev/null 2>&1 || PY=python3
    ;;
  019|0.19|0.19.2)
    venv=.venv-mcore019 req=requirements-mcore019.txt
    # The first candidate that really is a Python 3.12 (a pyenv shim on PATH may not be).
    PY=
    for cand in ${PYTHON312:+"$PYTHON312"} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do
      if "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
        PY=$(command -v "$cand") && break
      fi
    done
    if [ -z "$PY" ]; then
      echo "[setup] error: Python 3.12 not found (needed for the megatron-core 0.19.2 environment $venv):" \
           "install it (e.g. 'pyenv install 3.12.1') or set PYTHON312=/path/to/python3.12" >&2
      exit 2
    fi
    ;;
  *)
    echo "[setup] error: unknown environment '$name': use 016 (Python 3.11, megatron-core 0.16.1) or 019 (Python 3.12, megatron-core 0.19.2)" >&2
    exit 2
    ;;
esac
stamp=$venv/.megatron-coe-installed
if [ -f "$stamp" ] && cmp -s "$stamp" "$req"; then
  exit 0
fi
echo "[setup] creating $venv with $($PY --version)" >&2
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -m pip install -q -r "$req" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -m pip install -q --no-deps -e . 2>&1 | grep -v -e "^WARNING: Location" -e "^  " || true
"$venv/bin/python" -c "import torch, megatron.core, megatron_coe; print('[setup] $venv: torch', torch.__version__, 'megatron-core', megatron.core.__version__)" >&2
cp "$req" "$stamp"
