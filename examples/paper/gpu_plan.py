#!/usr/bin/env python
"""The paper's own setup on one GPU: per-run FLOPs, time and memory estimates, before any GPU run.

    .venv/bin/python examples/paper/gpu_plan.py            # the table (runs anywhere, no GPU)
    bash examples/paper/run.sh --scale gpu --models moe_8_64 coe2_4_64 coe2_4_48   # the runs (GPU)

The experiment: the paper's model (hidden 1024, 4 layers, 63 routed + 1 shared expert of FFN
704, MLA, YaRN, seq 512, batch 64, 1000 steps, 10% warmup then constant LR 3e-4, bf16) for
CoE-2(4/64), the paper's MoE(8/64) and CoE-2(4/48), with the configs in ``examples/*.yaml``.
It is the next experiment to run when a GPU is lent (after ``tools/gpu_smoke.sh``); nothing of
it has run on a GPU yet, so every number this prints is an estimate:

* FLOPs per run: ``megatron_coe.arch.flops_per_token`` (the trainer's own count: C x top-k
  routed experts, the shared expert and the router in every pass, causal attention) x 1000 x
  64 x 512 tokens; time at an assumed model-FLOPs utilisation (MFU) of an H100's dense bf16
  peak (989 TFLOP/s): MoE layers with 63 small experts reach low MFU on one GPU, so a range;
* memory: weights, gradients and optimizer state exactly from the parameter count (bf16
  weights 2 B, fp32 gradients 4 B, fp32 main weights and two Adam moments 12 B = 18 B per
  parameter, one GPU, no distributed-optimizer sharding); activations as a rough estimate
  (bf16 tensors a layer keeps for backward, per token: attention ~34 h bytes (Korthikanti et
  al.'s count without the s^2 term: flash attention), each CoE pass its k routed experts'
  inputs and SwiGLU intermediates, the shared expert's, and the router's fp32 scores).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from megatron_coe.arch import ModelArch, flops_per_token  # noqa: E402
from megatron_coe.training.options import parse_args  # noqa: E402

ARMS = {"moe_8_64": "paper MoE(8/64)", "coe2_4_64": "CoE-2(4/64)", "coe2_4_48": "CoE-2(4/48)"}
H100_PEAK = 989e12
MFU = (0.03, 0.10)  # small experts, one GPU: low utilisation expected
VOCAB = 4096  # the 4096-token BPE of data/gsm8k/README.md (MetaMathQA: the same tokenizer size)
GIB = 2 ** 30


def activation_bytes_per_token(a: ModelArch) -> float:
    """Rough bf16 activation bytes per token per layer kept for backward (see the docstring)."""
    h = a.hidden_size
    routed, shared = a.moe_ffn_hidden_size or a.ffn_hidden_size, \
        a.moe_shared_expert_intermediate_size or 0
    attn = 34 * h
    per_expert = 2 * (h + 3 * routed)  # input, fc1 output (gate+up), activation output (bf16)
    per_pass = (a.moe_router_topk * per_expert + (2 * (h + 3 * shared) if shared else 0)
                + 4 * a.num_moe_experts + 2 * h)  # + router fp32 scores + the pass output
    return attn + a.coe_iterations * per_pass


def plan(arm: str) -> dict:
    args = parse_args(["--config", str(ROOT / "examples" / f"{arm}.yaml")])
    a = ModelArch.from_args(args)
    tokens = args.train_iters * args.global_batch_size * args.seq_length
    flops = flops_per_token(a, args.seq_length, VOCAB) * tokens
    params = a.num_parameters(VOCAB)["total"]
    state = 18 * params
    act = activation_bytes_per_token(a) * a.num_layers * args.micro_batch_size * args.seq_length
    return {"arm": arm, "label": ARMS[arm], "params": params, "tokens": tokens, "flops": flops,
            "hours": [flops / (H100_PEAK * m) / 3600 for m in MFU],
            "state_gib": state / GIB, "act_gib": act / GIB,
            "micro_batch": args.micro_batch_size}


def main() -> int:
    rows = [plan(arm) for arm in ARMS]
    print(f"The paper's setup on one H100 (estimates; no GPU has run it): "
          f"{rows[0]['tokens'] / 1e6:.1f} M tokens per run, vocabulary {VOCAB}.")
    print(f"| arm | parameters | training FLOPs | time at {MFU[0]:.0%} / {MFU[1]:.0%} MFU | "
          "weights+grads+Adam | activations (micro-batch, rough) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['params'] / 1e6:.1f} M | {r['flops']:.2e} | "
              f"{r['hours'][0] * 60:.0f} / {r['hours'][1] * 60:.0f} min | "
              f"{r['state_gib']:.1f} GiB | {r['act_gib']:.1f} GiB (mbs {r['micro_batch']}) |")
    coe, moe = rows[1], rows[0]
    print(f"CoE-2(4/64) / MoE(8/64) FLOPs: {coe['flops'] / moe['flops']:.3f} (one more router "
          "and one more shared-expert pass per layer).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
