#!/usr/bin/env bash
# GPU smoke test of the trainer: a few bf16 and FP8 training steps of a small CoE-2 model on ONE
# Hopper-class GPU, through the real entry point (torchrun -> megatron_coe.train), with the
# Transformer Engine layers. Prints step times, tokens/s and peak GPU memory of both runs.
#
#   bash tools/gpu_smoke.sh                      # bf16, then FP8 (--fp8-format hybrid)
#   STEPS=50 FP8_RECIPE=tensorwise bash tools/gpu_smoke.sh --coe-iterations 1 --moe-router-topk 4
#
# Environment: PYTHON (default .venv/bin/python, else python), STEPS (default 20; the first
# WARMUP=5 are left out of the averages), FP8_FORMAT (hybrid), FP8_RECIPE (delayed),
# OUT (default runs/gpu_smoke): logs and metrics.jsonl of each run. Arguments are appended to
# both trainer command lines (they override the model below).
#
# Exit status: 0 both runs trained; 2 no usable GPU / Transformer Engine (checked before any
# run, with the reason); otherwise the failing run's status. FP8 is skipped with a note (exit 0
# after bf16) on a GPU older than compute capability 8.9.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "gpu_smoke.sh: $*" >&2; exit 2; }

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
TORCHRUN="$PYTHON -m torch.distributed.run"
STEPS=${STEPS:-20}
WARMUP=${WARMUP:-5}
FP8_FORMAT=${FP8_FORMAT:-hybrid}
FP8_RECIPE=${FP8_RECIPE:-delayed}
OUT=${OUT:-runs/gpu_smoke}
(( STEPS > WARMUP )) || die "STEPS=$STEPS must be larger than WARMUP=$WARMUP"

# ----------------------------------------------------------------------------- checks, fast
# One line "<cuda 0|1> <major.minor> <gpu name, _ for spaces> <TE version|none>", no training.
probe=$("$PYTHON" - <<'EOF'
import torch
cuda = torch.cuda.is_available()
cap = "%d.%d" % torch.cuda.get_device_capability(0) if cuda else "-"
name = torch.cuda.get_device_name(0).replace(" ", "_") if cuda else "-"
try:
    import transformer_engine.pytorch  # noqa: F401
    from importlib.metadata import version
    te = version("transformer-engine")
except Exception:
    te = "none"
print(int(cuda), cap, name, te)
EOF
) || die "cannot run $PYTHON with torch (set PYTHON=/path/to/python)"
read -r cuda cap name te <<<"$probe"
[ "$cuda" = 1 ] || die "no CUDA GPU visible (torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES-unset}'): this smoke test needs one Hopper-class GPU. CPU training: python -m megatron_coe.train --transformer-impl local ..."
[ "$te" != none ] || die "Transformer Engine is not importable with $PYTHON: install requirements-gpu.txt or use an NVIDIA PyTorch container"
echo "GPU: ${name//_/ } (compute capability $cap), Transformer Engine $te, torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
RUN_FP8=1
if [ "$(printf '%s\n8.9\n' "$cap" | sort -V | head -n1)" != 8.9 ]; then
  echo "note: compute capability $cap < 8.9 (Ada/Hopper): the FP8 run is skipped"
  RUN_FP8=0
fi

# ----------------------------------------------------------------------------- the model
# Small CoE-2: 4 layers, hidden 1024, 16 routed experts (FFN 512, top-2 per pass, 2 passes) + a
# shared expert, seq 1024 x micro-batch 4 = 4096 tokens (every GEMM dimension a multiple of 16,
# as FP8 needs), synthetic data so nothing has to be prepared.
MODEL=(
  --num-layers 4 --hidden-size 1024 --num-attention-heads 8 --seq-length 1024
  --normalization RMSNorm --swiglu
  --num-experts 16 --moe-ffn-hidden-size 512 --moe-shared-expert-intermediate-size 512
  --moe-router-topk 2 --coe-iterations 2 --coe-inner-residual --no-coe-outer-residual
  --moe-router-pre-softmax --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-3
  --moe-token-dispatcher-type alltoall
  --mock-data --vocab-size 32000
  --micro-batch-size 4 --global-batch-size 8 --train-iters "$STEPS" --lr 3e-4 --lr-warmup-iters 2
  --eval-iters 0 --log-interval 5
  --hidden-dropout 0 --attention-dropout 0 --lr-decay-style cosine --num-workers 0
  --transformer-impl transformer_engine --bf16
)

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

run() {  # $1: name, rest: extra trainer flags
  local name=$1; shift
  local dir=$OUT/$name
  rm -rf "$dir" && mkdir -p "$dir"
  echo
  echo "=== $name: $STEPS steps ($*) -> $dir/train.log"
  local rc=0
  $TORCHRUN --nproc-per-node 1 --master-addr 127.0.0.1 --master-port "$(free_port)" \
    -m megatron_coe.train "${MODEL[@]}" "$@" --metrics-file "$dir/metrics.jsonl" \
    ${EXTRA[@]+"${EXTRA[@]}"} 2>&1 | tee "$dir/train.log" || rc=$?
  if (( rc != 0 )); then
    echo "gpu_smoke.sh: the $name run failed (exit $rc); see $dir/train.log" >&2
    exit "$rc"
  fi
}

summary() {  # one line per run from its metrics.jsonl
  "$PYTHON" - "$WARMUP" "$@" <<'EOF'
import json, statistics, sys
warmup, runs = int(sys.argv[1]), sys.argv[2:]
print()
print(f"{'run':<8} {'steps':>5} {'step ms (median)':>17} {'step ms (min)':>14} {'tokens/s':>10} "
      f"{'peak alloc GiB':>15} {'peak reserved GiB':>18} {'final loss':>10}")
for path in runs:
    recs = [json.loads(l) for l in open(f"{path}/metrics.jsonl") if l.strip()]
    recs = [r for r in recs if r.get("type") == "train"]
    timed = [r for r in recs if r["iteration"] > warmup] or recs
    ms = [1e3 * r["step_time_s"] for r in timed]
    tok = statistics.median(r["tokens_per_s"] for r in timed)
    last = recs[-1]
    print(f"{path.rsplit('/', 1)[-1]:<8} {len(recs):>5} {statistics.median(ms):>17.1f} "
          f"{min(ms):>14.1f} {tok:>10,.0f} {last.get('max_memory_allocated_gib', float('nan')):>15.2f} "
          f"{last.get('max_memory_reserved_gib', float('nan')):>18.2f} {last['lm_loss']:>10.4f}")
EOF
}

EXTRA=("$@")
run bf16
RUNS=("$OUT/bf16")
if (( RUN_FP8 )); then
  run fp8 --fp8-format "$FP8_FORMAT" --fp8-recipe "$FP8_RECIPE"
  RUNS+=("$OUT/fp8")
fi
summary "${RUNS[@]}"
