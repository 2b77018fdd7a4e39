#!/usr/bin/env bash
# Create a test environment with the verified pins if it is missing (idempotent).
#
#   bash tools/setup_env.sh          # (a) default: ./.venv, Python 3.11, torch 2.13.0 CPU, megatron-core 0.16.1
#   bash tools/setup_env.sh 019      # (b) ./.venv-mcore019, Python 3.12, torch 2.13.0, megatron-core 0.19.2
#
# The name may also come from MCORE_ENV (016 or 019). torch is installed first so that pip keeps the
# build it chose for megatron-core's dependency: the CPU build (torch==2.13.0+cpu) when the configured
# pip indexes / find-links have one, else from PyTorch's CPU index ($TORCH_CPU_INDEX, default
# https://download.pytorch.org/whl/cpu) when it is reachable, else stock PyPI's torch==2.13.0, which
# on Linux x86_64 is the CUDA build (a ~530 MB wheel plus ~2.7 GB of nvidia-* packages; it runs on
# CPU too). The last line says which build was installed, the time taken and the disk used.
# Python 3.12 is searched as $PYTHON312, python3.12 on PATH, then pyenv's versions; when none is
# found the script fails and says so. COE_VENV overrides the directory (for trying the script out).
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:-${MCORE_ENV:-016}}
case "$name" in
  016|0.16|0.16.1|default)
    venv=${COE_VENV:-.venv} req=requirements.txt
    PY=${PYTHON:-python3.11}
    command -v "$PY" >/dev/null 2>&1 || PY=python3
    ;;
  019|0.19|0.19.2)
    venv=${COE_VENV:-.venv-mcore019} req=requirements-mcore019.txt
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
start=$(date +%s)
[ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
pipq() {  # quiet pip; its exit status is kept
  "$venv/bin/python" -m pip install -q "$@" 2>&1 | { grep -v -e "^WARNING: Location" -e "^  " >&2 || true; }
  return "${PIPESTATUS[0]}"
}
pipq --upgrade pip || true
# torch: the CPU build where one is on offer, else stock PyPI's (see the header)
TORCH=2.13.0
cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
if "$venv/bin/python" -m pip install -q --only-binary :all: "torch==$TORCH+cpu" >/dev/null 2>&1; then
  :
elif "$venv/bin/python" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
       "$cpu_index/torch/" >/dev/null 2>&1; then
  echo "[setup] installing torch $TORCH (CPU build) from $cpu_index" >&2
  pipq --index-url "$cpu_index" "torch==$TORCH+cpu"
else
  echo "[setup] no CPU build of torch $TORCH on the configured indexes and $cpu_index is not" \
       "reachable: installing PyPI's torch==$TORCH (the CUDA build; it runs on CPU)" >&2
  pipq "torch==$TORCH"
fi
pipq -r "$req"
pipq --no-deps -e .
# versions as installed (package metadata; megatron.core.__version__ appends the git hash of the
# work tree it sits in)
"$venv/bin/python" - "$venv" "$(( $(date +%s) - start ))" "$(du -sh "$venv" | cut -f1)" >&2 <<'PY'
import importlib.metadata as m, sys
import megatron_coe, torch, megatron.core  # noqa: F401,E401  (megatron_coe first: it quiets import notices)
build = "CPU build" if torch.version.cuda is None else f"CUDA {torch.version.cuda} build"
print(f"[setup] {sys.argv[1]}: torch {m.version('torch')} ({build}), megatron-core "
      f"{m.version('megatron-core')}; {sys.argv[2]} s, {sys.argv[3]} on disk")
PY
cp "$req" "$stamp"
