#!/usr/bin/env bash
# The test command: set up the test environment(s) if needed, then run the default (CPU) test
# suite in each, one after the other. Extra arguments go to pytest (e.g. `-m slow`).
#   (a) 016: ./.venv           Python 3.11, torch 2.13.0, megatron-core 0.16.1
#   (b) 019: ./.venv-mcore019  Python 3.12, torch 2.13.0, megatron-core 0.19.2
# MCORE_ENV=016 or MCORE_ENV=019 sets up and runs that environment alone (the cross-version test
# then runs only if the other environment already exists; otherwise it is skipped saying so).
# Exits non-zero if any environment cannot be set up (e.g. no Python 3.12) or any test fails.
# Prints each environment's 15 slowest tests and wall time; the last line totals both runs.
set -uo pipefail
cd "$(dirname "$0")/.."
envs=${MCORE_ENV:-016 019}
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
logdir=$(mktemp -d)
trap 'rm -rf "$logdir"' EXIT
status=0
summaries=()
for env in $envs; do
  case "$env" in 016|019) ;; *) echo "[tests] error: MCORE_ENV='$env': use 016, 019 or '016 019'" >&2; exit 2 ;; esac
done
# Every requested environment is set up before any suite runs: tests/test_cross_version.py runs
# the other release's interpreter (with both requested and CI=true it fails when one is missing).
declare -A ready
for env in $envs; do
  if bash tools/setup_env.sh "$env"; then ready[$env]=1; else ready[$env]=0; fi
done
export COE_TEST_ENVS="$envs"  # read by tests/test_cross_version.py
for env in $envs; do
  case "$env" in
    016) venv=.venv ;;
    019) venv=.venv-mcore019 ;;
  esac
  if [ "${ready[$env]}" != 1 ]; then
    echo "[tests] error: environment $env could not be set up (see above); its tests did not run" >&2
    summaries+=("$env: NOT RUN (set-up failed)")
    status=1
    continue
  fi
  desc=$("$venv/bin/python" -c 'import sys, importlib.metadata as m; print("Python %d.%d.%d," % sys.version_info[:3], "torch", m.version("torch") + ",", "megatron-core", m.version("megatron-core"))')
  echo "[tests] environment $env ($venv): $desc"
  start=$(date +%s)
  "$venv/bin/python" -m pytest -q -ra --durations=15 "$@" 2>&1 | tee "$logdir/$env.log"
  rc=${PIPESTATUS[0]}
  echo "[tests] environment $env: $(( $(date +%s) - start )) s wall"
  line=$(grep -E "^=* ?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran" "$logdir/$env.log" | tail -1 | tr -d '=' | sed 's/^ *//;s/ *$//')
  summaries+=("$env: ${line:-no pytest summary} (exit $rc, $(( $(date +%s) - start )) s wall, $desc)")
  [ "$rc" -eq 0 ] || status=$rc
done
echo
for s in "${summaries[@]}"; do echo "[tests] $s"; done
# One plain closing line over all environments: N passed, N failed (errors count as failed).
cat "$logdir"/*.log 2>/dev/null | grep -E "^=* ?[0-9]+ (passed|failed|error|skipped|deselected)" | awk '
  { for (i = 1; i <= NF; i++) { n = $i + 0; w = $(i + 1); gsub(/[,=]/, "", w)
      if (w == "passed") p += n; else if (w == "failed" || w ~ /^error/) f += n; else if (w == "skipped") s += n } }
  END { printf "total: %d passed, %d failed, %d skipped\n", p, f, s }'
exit $status
