#!/usr/bin/env python
"""Training throughput of CoE-2(4/64) vs MoE(8/64) at equal routed FLOPs, through the real trainer.

Both models are trained by ``megatron_coe.train`` (torchrun, gloo, ``--nproc`` processes with
expert parallelism ``--nproc``; default 2) on the same synthetic data (``--mock-data``, same seed),
and the step times are read from each run's ``metrics.jsonl``:

* CoE-2(4/64): ``--coe-iterations 2 --moe-router-topk 4``, inner residual on, outer off;
* MoE(8/64):   ``--coe-iterations 1 --moe-router-topk 8``, inner residual off, outer on
  (Megatron's standard MoE layer).

Routed-expert FLOPs are equal (2 passes x 4 = 8 experts per token of 64). CoE also runs a second
router per layer (and, with ``--shared-expert-size``, the shared expert once per pass); the table
shows each model's FLOPs per step as the trainer counts them. Default model (CPU-sized): 2 layers,
hidden 128, 4 heads, 64 routed experts of FFN 64 (SwiGLU), seq 256, global batch 8.

Noise (the machine may be shared): the two configs run alternately, ``--rounds`` times each, in
ABBA order, so slow phases of the machine hit both; the first ``--warmup`` steps of every run and
its last step (which also gathers routing statistics) are not timed; the table gives medians and
the 10th percentiles (the fast tail is the least disturbed estimate), and the CoE/MoE ratio both
of the medians and of the per-round medians.

Usage (repository root)::

    .venv/bin/python tools/bench_train.py                  # ~3 min on 2 CPU cores
    .venv/bin/python tools/bench_train.py --nproc 1 --steps 40 --rounds 3
    .venv/bin/python tools/bench_train.py --shared-expert-size 64 --mla
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_coe.envcheck import require_environment  # noqa: E402  (one line, no traceback,
require_environment()  # noqa: E402                    outside the project's environment)

import argparse
import json
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "CoE-2(4/64)": ["--coe-iterations", "2", "--moe-router-topk", "4", "--coe-inner-residual",
                    "--no-coe-outer-residual"],
    "MoE(8/64)": ["--coe-iterations", "1", "--moe-router-topk", "8", "--no-coe-inner-residual",
                  "--coe-outer-residual"],
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2, help="processes (= expert-parallel size)")
    p.add_argument("--steps", type=int, default=25, help="training steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each run")
    p.add_argument("--rounds", type=int, default=2, help="runs per config (ABBA order)")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-experts", type=int, default=64)
    p.add_argument("--expert-ffn", type=int, default=64)
    p.add_argument("--shared-expert-size", type=int, default=0,
                   help="shared-expert FFN size (0: none; CoE runs it once per pass)")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, default=8)
    p.add_argument("--mla", action="store_true", help="multi-latent attention (paper setup)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    p.add_argument("--keep", metavar="DIR", help="keep the runs' logs and metrics in DIR")
    args = p.parse_args()
    if args.steps < args.warmup + 3:
        p.error("--steps must leave at least 2 timed steps after --warmup (the last is untimed)")
    return args


def trainer_args(a: argparse.Namespace, config: str, metrics: Path) -> list:
    common = [
        "--num-layers", a.num_layers, "--hidden-size", a.hidden_size,
        "--num-attention-heads", 4, "--normalization", "RMSNorm", "--swiglu",
        "--num-experts", a.num_experts, "--moe-ffn-hidden-size", a.expert_ffn,
        "--moe-router-pre-softmax", "--moe-router-load-balancing-type", "seq_aux_loss",
        "--moe-aux-loss-coeff", "1e-3", "--moe-token-dispatcher-type", "alltoall",
        "--seq-length", a.seq_length, "--micro-batch-size", a.micro_batch_size,
        "--global-batch-size", a.global_batch_size, "--train-iters", a.steps,
        "--lr", "3e-3", "--lr-warmup-iters", "2", "--eval-iters", "0",
        "--log-interval", a.steps, "--mock-data", "--vocab-size", "1024", "--seed", "1234",
        "--transformer-impl", "local", "--expert-model-parallel-size", a.nproc,
        "--no-exit-signal-handler", "--metrics-file", metrics,
        # the values this benchmark was written with (the trainer's defaults are Megatron-LM's)
        "--hidden-dropout", "0", "--attention-dropout", "0", "--lr-decay-style", "cosine",
        "--num-workers", "0",
    ]
    if a.shared_expert_size:
        common += ["--moe-shared-expert-intermediate-size", a.shared_expert_size]
    if a.mla:
        common += ["--multi-latent-attention", "--kv-lora-rank", "32", "--qk-head-dim", "32",
                   "--qk-pos-emb-head-dim", "16", "--v-head-dim", "32"]
    return [str(x) for x in common + CONFIGS[config]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(a: argparse.Namespace, config: str, run_dir: Path) -> list:
    """Train ``config`` once; returns its per-step records (type train)."""
    run_dir.mkdir(parents=True)
    metrics = run_dir / "metrics.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "megatron_coe.train", *trainer_args(a, config, metrics)]
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS=str(a.threads),
               CUDA_VISIBLE_DEVICES="")
    for name in ("COE_JOB_END_TIME", "COE_EXIT_REASON_FILE"):
        env.pop(name, None)
    with open(run_dir / "train.log", "w") as log:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = (run_dir / "train.log").read_text()[-3000:]
        sys.exit(f"bench_train.py: the {config} run failed (exit {rc}):\n{tail}")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("type") == "train"]


def pct(values: list, q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main() -> None:
    a = parse()
    order = [c for r in range(a.rounds) for c in (list(CONFIGS) if r % 2 == 0
                                                  else list(CONFIGS)[::-1])]
    timed = {c: [] for c in CONFIGS}       # step seconds, all rounds
    per_round = {c: [] for c in CONFIGS}   # median step seconds of each run
    flops = {}
    tokens = a.global_batch_size * a.seq_length
    load0, t_start = os.getloadavg()[0], time.time()
    print(f"{len(order)} runs of {a.steps} steps ({a.warmup} warm-up + the last untimed), "
          f"{a.nproc} process(es), EP={a.nproc}, {tokens} tokens/step; CPU cores: {os.cpu_count()}, "
          f"load average {load0:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(a.keep) if a.keep else Path(tmp)
        for i, config in enumerate(order):
            t0 = time.time()
            records = launch(a, config, root / f"{i:02d}_{config.split('(')[0]}")
            steps = [r["step_time_s"] for r in records
                     if a.warmup < r["iteration"] < a.steps]
            timed[config] += steps
            per_round[config].append(statistics.median(steps))
            flops[config] = records[-1]["model_tflops_per_step"] * 1e12
            print(f"  run {i + 1}/{len(order)} {config:<12} median step "
                  f"{1e3 * statistics.median(steps):7.1f} ms  ({time.time() - t0:.0f} s wall)",
                  flush=True)

    print()
    head = (f"{'config':<12} {'C':>2} {'top-k':>5} {'routed/token':>12} {'GFLOP/step':>11} "
            f"{'steps':>6} {'step ms med':>12} {'step ms p10':>12} {'tokens/s med':>13} "
            f"{'tokens/s p90':>13}")
    print(head)
    print("-" * len(head))
    tok_med, tok_fast = {}, {}
    for config, steps in timed.items():
        c, k = (2, 4) if config.startswith("CoE") else (1, 8)
        med, fast = statistics.median(steps), pct(steps, 0.1)
        tok_med[config], tok_fast[config] = tokens / med, tokens / fast
        print(f"{config:<12} {c:>2} {k:>5} {c * k:>12} {flops[config] / 1e9:>11.2f} "
              f"{len(steps):>6} {1e3 * med:>12.1f} {1e3 * fast:>12.1f} {tok_med[config]:>13,.0f} "
              f"{tok_fast[config]:>13,.0f}")
    coe, moe = list(CONFIGS)
    paired = [m / c for c, m in zip(per_round[coe], per_round[moe])]
    print()
    print(f"tokens/s CoE/MoE: {tok_med[coe] / tok_med[moe]:.3f} (medians), "
          f"{tok_fast[coe] / tok_fast[moe]:.3f} (fast tail, p10 step times), "
          f"per round {', '.join(f'{r:.3f}' for r in paired)}")
    print(f"model FLOPs/step CoE/MoE: {flops[coe] / flops[moe]:.3f} (routed experts equal: "
          f"2 x 4 = 1 x 8 of {a.num_experts}; CoE adds a router per pass"
          f"{' and the shared expert per pass' if a.shared_expert_size else ''})")
    print(f"wall {time.time() - t_start:.0f} s; load average {load0:.2f} -> "
          f"{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
