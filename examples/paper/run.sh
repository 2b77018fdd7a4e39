#!/usr/bin/env bash
# The paper benchmark in one command (see examples/paper/run_benchmark.py and RESULTS.md):
#   bash examples/paper/run.sh                   # auto: paper-size configs on a GPU, CPU scale otherwise
#   bash examples/paper/run.sh --scale cpu --seeds 1 2 3 --train-iters 300   # protocol 1
#   bash examples/paper/run.sh --protocol 2                 # protocol 2 (resumes; see protocol2.py)
#   bash examples/paper/run.sh --protocol 2 --report-only   # its (partial) report, no training
# Creates ./.venv if missing and installs matplotlib (plots) if it is not there.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tools/setup_env.sh
PY=${PY:-.venv/bin/python}
"$PY" -c "import matplotlib" 2>/dev/null || "$PY" -m pip install -q -r examples/paper/requirements.txt
export TORCHDYNAMO_DISABLE=1
exec "$PY" examples/paper/run_benchmark.py "$@"
