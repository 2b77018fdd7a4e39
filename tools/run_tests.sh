#!/usr/bin/env bash
# The test command: set up ./.venv if needed, then run the default (CPU, < 30 min) test suite.
# Extra arguments go to pytest (e.g. `-m slow` for the long paper-reproduction runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -ra "$@"
