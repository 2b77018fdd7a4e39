#!/usr/bin/env bash
# Quickstart: a tiny Chain-of-Experts model (CoE-2, MLA, 16 experts) pretrained on GSM8K on two
# CPU processes with expert parallelism 2. A few minutes on 2 cores; prints a falling loss and
# leaves a checkpoint and TensorBoard events under runs/quickstart/.
#
#   bash examples/quickstart.sh                  # defaults below
#   ITERS=100 bash examples/quickstart.sh        # shorter
#   bash examples/quickstart.sh --lr 1e-3        # extra arguments go to the trainer
#
# Then: tensorboard --logdir runs/quickstart/tensorboard
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh    # creates ./.venv with the pinned versions if it is missing

PY=${PY:-.venv/bin/python}
TORCHRUN=${TORCHRUN:-.venv/bin/torchrun}
ITERS=${ITERS:-300}
OUT=${OUT:-runs/quickstart}
PREFIX=data/processed/gsm8k_train_v1k    # the data_path of examples/tiny/*.yaml
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=1

# 1. Tokenize GSM8K once (byte-level BPE with a 1024-token vocabulary; ~15-30 s). A re-run keeps
#    the complete data set; an incomplete one (a file missing) is made again (--overwrite: the
#    preprocessor refuses to replace an existing prefix without it).
if [[ ! -f $PREFIX.bin || ! -f $PREFIX.idx || ! -f $PREFIX.meta.json || ! -f $PREFIX.tokenizer.json ]]; then
    echo "== preprocessing data/gsm8k/train.jsonl.gz -> $PREFIX"
    "$PY" tools/preprocess_data.py --input data/gsm8k/train.jsonl.gz \
        --json-keys question answer --vocab-size 1024 --output-prefix "$PREFIX" --overwrite
fi

# 2. Train: 2 processes, expert parallelism 2, checkpoint at the end (and every 100 steps);
#    SIGTERM saves at the next step boundary (--exit-signal-handler; off by default as in Megatron-LM).
#    Rerunning resumes from the last checkpoint in $OUT (delete it to start over).
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== training ($ITERS steps) -> $OUT"
"$TORCHRUN" --nproc-per-node 2 --master-addr 127.0.0.1 --master-port "$PORT" \
    -m megatron_coe.train --config examples/tiny/coe2_cpu.yaml \
    --expert-model-parallel-size 2 --exit-signal-handler --num-workers 0 \
    --train-iters "$ITERS" --eval-interval 100 --log-interval 10 \
    --save "$OUT/checkpoints" --load "$OUT/checkpoints" --save-interval 100 \
    --tensorboard-dir "$OUT/tensorboard" "$@"

echo "== done: checkpoint $(cat "$OUT/checkpoints/latest_checkpointed_iteration.txt" 2>/dev/null \
    | sed 's/^/iteration /') in $OUT/checkpoints, metrics in $OUT/tensorboard/metrics.jsonl"
