#!/usr/bin/env python
"""Benchmark a Chain-of-Experts layer on CPU (or wherever torch runs): CoE vs MoE, EP=2 vs EP=1.

Two measurements, taken in one run and printed as one table:

1. **CoE-2(k/E) over MoE(2k/E) at equal FLOPs.** By default one layer of the paper's models
   (hidden 1024, 64 experts x FFN 704, a shared expert of 704, sequence 512): CoE-2(4/64) vs
   MoE(8/64). Both layers are built from the production spec (``get_coe_layer_spec`` -> ``CoETransformerLayer``) with the same hidden size, number of
   routed experts and expert FFN size:

   * MoE(2k/E): ``coe_iterations=1``, top-2k, inner residual off, outer residual on (Megatron's
     standard MoE layer);
   * CoE-2(k/E): ``coe_iterations=2``, top-k per pass, inner residual on, outer residual off.

   Routed-expert FLOPs are equal (2 passes x k = 2k experts per token). Every CoE pass also runs
   the shared expert, so by default (``--shared-expert-baseline matched``) the MoE layer's shared
   expert is C times as wide as CoE's per-pass one: equal shared-expert FLOPs. What remains
   unequal is CoE's extra router GEMM per pass (+0.5% at the defaults); the script prints the
   FLOPs of both. ``--shared-expert-baseline same`` gives MoE the same shared expert as one CoE
   pass (the paper's models; CoE then does more FLOPs), ``--shared-expert-size 0`` none.

2. **EP=2 over EP=1 for the CoE-2 layer (weak scaling).** Same global experts; EP=1 runs in one
   process, EP=2 across two forked gloo processes (``run_distributed``) with the given dispatcher.
   Every rank processes its own micro-batch of ``seq_length x micro_batch_size`` tokens, so the
   ideal ratio is 1.0 (each rank's experts see the same number of tokens in both cases); the
   excess is dispatch/combine communication and per-rank overhead.

What is timed: one forward + backward (``output.backward(grad)`` with a fixed random gradient) of
``layer.mlp`` -- the ``ChainOfExpertsLayer`` -- on the pre-MLP-layernormed input (``--scope mlp``,
default), or of the whole ``CoETransformerLayer`` with attention (``--scope layer``). Gradients
are cleared outside the timed region.

Noise robustness (other jobs may share the cores): warmup iterations, many repeats, medians with
p10/p90, and variants interleaved A/B/B/A/... inside one loop so that slow phases of the machine
hit both variants alike. Ratios are printed both as ratio-of-medians and as the median of the
per-iteration paired ratios, and as the ratio of the p10s (other load only ever adds time, so
the fast tail is the least disturbed estimate). In the EP comparison both variants live in the
same two processes: EP=1 steps run on rank 0 while rank 1 waits in a (non-spinning) gloo barrier,
EP=2 steps on both ranks (step time = slower rank), alternating.

Usage (from the repository root)::

    .venv/bin/python tools/bench_coe_layer.py                 # paper layer shape: ~4 min on 2 cores
    .venv/bin/python tools/bench_coe_layer.py --hidden-size 256 --moe-ffn-hidden-size 128 \
        --shared-expert-size 128 --seq-length 1024 --iters 60  # small layer: per-pass fixed costs show
    .venv/bin/python tools/bench_coe_layer.py --profile       # + where CoE's extra time goes
    .venv/bin/python tools/bench_coe_layer.py --experts sequential  # Megatron's SequentialMLP loop
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megatron_coe.envcheck import require_environment  # noqa: E402  (one line, no traceback,
require_environment()  # noqa: E402                    outside the project's environment)

# Before anything imports Megatron: its jit_fuser is torch.compile (very slow to warm up on CPU).
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message=".*Apex (is|are) not installed.*")
warnings.filterwarnings("ignore", message=".*without fp32 routing.*")
warnings.filterwarnings("ignore", message="full scope is deprecated.*")
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

TARGET_COE_OVER_MOE = 1.05


# ----------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time one CoE-2 layer vs one MoE layer (equal routed-expert FLOPs) and "
        "EP=2 vs EP=1 for the CoE-2 layer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # Defaults: one layer of the paper's models (hidden 1024, 8 heads, 64 experts x FFN 704,
    # one shared expert of 704, sequence length 512).
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--num-attention-heads", type=int, default=8, help="only used by --scope layer")
    p.add_argument("--num-experts", type=int, default=64, help="routed experts (global)")
    p.add_argument("--moe-ffn-hidden-size", type=int, default=704, help="FFN size of one expert")
    p.add_argument("--shared-expert-size", type=int, default=704,
                   help="CoE's moe_shared_expert_intermediate_size (run every pass); 0 = none")
    p.add_argument("--shared-expert-baseline", choices=("matched", "same"), default="matched",
                   help="MoE's shared expert: 'matched' = coe_iterations x as wide (equal FLOPs), "
                   "'same' = as wide as CoE's (the paper's models)")
    p.add_argument("--experts", choices=("grouped", "sequential"), default="grouped",
                   help="routed experts of the local spec: GroupedSequentialMLP (production) or "
                   "Megatron's SequentialMLP (one Python-level MLP call per local expert)")
    p.add_argument("--coe-topk", type=int, default=4,
                   help="top-k per CoE pass; the MoE baseline uses coe_iterations * coe_topk")
    p.add_argument("--coe-iterations", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=512, help="tokens per sequence (per rank)")
    p.add_argument("--micro-batch-size", type=int, default=2, help="sequences per rank")
    p.add_argument("--iters", type=int, default=30, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations per variant")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads in every process (EP=2 uses 2 processes)")
    p.add_argument("--dispatcher", choices=("alltoall", "allgather"), default="alltoall",
                   help="moe_token_dispatcher_type")
    p.add_argument("--scope", choices=("mlp", "layer"), default="mlp",
                   help="time layer.mlp (the ChainOfExpertsLayer) or the whole transformer layer")
    p.add_argument("--swiglu", action="store_true", help="gated SiLU experts (default: GELU MLP)")
    p.add_argument("--aux-loss-coeff", type=float, default=0.0,
                   help="moe_aux_loss_coeff (load-balancing loss computed per pass when > 0)")
    p.add_argument("--skip-ep", action="store_true", help="skip the EP=2 vs EP=1 measurement")
    p.add_argument("--skip-coe-moe", action="store_true", help="skip the CoE vs MoE measurement")
    p.add_argument("--profile", action="store_true",
                   help="also profile CoE vs MoE (forward stage timings + torch.profiler op table)")
    p.add_argument("--profile-iters", type=int, default=10,
                   help="interleaved profiling rounds per variant (medians over rounds)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=900.0, help="per distributed run, seconds")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    if args.num_experts % 2 and not args.skip_ep:
        p.error("--num-experts must be even for EP=2 (or pass --skip-ep)")
    return args


# ----------------------------------------------------------------------------- model pieces
def make_config(args, *, coe: bool, ep: int = 1):
    """Production-spec config of the CoE (``coe=True``) or the MoE baseline layer."""
    import torch.nn.functional as F

    from megatron_coe.testing.configs import tiny_config

    c = args.coe_iterations
    shared = args.shared_expert_size
    if not coe and args.shared_expert_baseline == "matched":
        shared *= c
    extra = {}
    if args.swiglu:
        extra.update(gated_linear_unit=True, activation_func=F.silu)
    return tiny_config(
        num_layers=1,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        ffn_hidden_size=args.moe_ffn_hidden_size,  # unused by MoE layers; must be set
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=shared or None,
        moe_router_topk=args.coe_topk if coe else c * args.coe_topk,
        moe_token_dispatcher_type=args.dispatcher,
        moe_aux_loss_coeff=args.aux_loss_coeff,
        coe_iterations=c if coe else 1,
        coe_inner_residual=coe,
        coe_outer_residual=not coe,
        expert_model_parallel_size=ep,
        **extra,
    )


def build_layer(config, pg_collection, experts: str = "grouped"):
    import dataclasses

    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.spec_utils import build_module

    from megatron_coe.models.specs import get_coe_layer_spec

    spec = get_coe_layer_spec(config)
    if experts == "sequential":  # Megatron's own local-spec experts, for comparison
        mlp = spec.submodules.mlp
        moe_sub = dataclasses.replace(mlp.submodules, experts=dataclasses.replace(
            mlp.submodules.experts, module=SequentialMLP))
        spec = dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules, mlp=dataclasses.replace(mlp, submodules=moe_sub)))
    layer = build_module(spec, config=config, layer_number=1, pg_collection=pg_collection)
    assert type(layer.mlp.experts).__name__ == {"grouped": "GroupedSequentialMLP",
                                                "sequential": "SequentialMLP"}[experts]
    layer.train()
    return layer


def flops_per_step(config, tokens: int) -> dict:
    """Analytic matmul FLOPs of one forward of ``layer.mlp`` (x3 for forward + backward).

    Per token and pass: router ``2*h*E``; routed experts ``topk * (2*h*f*g + 2*f*h)``; shared
    expert ``2*h*s*g + 2*s*h`` (``g`` = 2 for gated linear units). No token dropping, so every
    token reaches exactly ``topk`` experts per pass. Elementwise work (activations, residual adds,
    permutes, softmax/top-k) is not counted.
    """
    h, e, f = config.hidden_size, config.num_moe_experts, config.moe_ffn_hidden_size
    g = 2 if config.gated_linear_unit else 1
    s = config.moe_shared_expert_intermediate_size or 0
    c = config.coe_iterations
    router = c * 2 * h * e * tokens
    routed = c * config.moe_router_topk * (2 * h * f * g + 2 * f * h) * tokens
    shared = c * (2 * h * s * g + 2 * s * h) * tokens
    fwd = router + routed + shared
    return dict(router=router, routed=routed, shared=shared, fwd=fwd, fwd_bwd=3 * fwd)


def make_inputs(layer, args, seed: int):
    """(input, grad_output) for the timed module; the MLP input is the pre-MLP layernorm output."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    shape = (args.seq_length, args.micro_batch_size, args.hidden_size)
    h = torch.randn(shape, generator=gen)
    if args.scope == "mlp":
        with torch.no_grad():
            h = layer.pre_mlp_layernorm(h)
    x = h.detach().clone().requires_grad_(True)
    grad = torch.randn(shape, generator=gen) * 1e-2
    return x, grad


def make_step(layer, x, grad, scope: str):
    """A closure running one timed forward+backward; returns seconds."""
    import torch

    module = layer.mlp if scope == "mlp" else layer
    params = [p for p in layer.parameters() if p.requires_grad]
    # Explicit causal mask [1, 1, s, s] (True = masked): with attention_mask=None Megatron 0.16.1
    # builds it with device="cuda" (transformer/utils.py get_default_causal_mask), not CPU-safe.
    s = x.shape[0]
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=x.device), diagonal=1)[None, None]

    def step() -> float:
        for p in params:
            p.grad = None
        x.grad = None
        t0 = time.perf_counter()
        if scope == "mlp":
            out, _ = module(x)
        else:
            out = module(hidden_states=x, attention_mask=mask)
            out = out[0] if isinstance(out, tuple) else out
        torch.autograd.backward(out, grad)
        return time.perf_counter() - t0

    return step


# ----------------------------------------------------------------------------- statistics
def pct(values, q: float) -> float:
    v = sorted(values)
    if len(v) == 1:
        return v[0]
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def summarize(times):
    ms = [t * 1e3 for t in times]
    return dict(median=statistics.median(ms), p10=pct(ms, 0.1), p90=pct(ms, 0.9), n=len(ms))


def paired_ratio(num, den):
    """Median of per-iteration ratios (num[i] / den[i]); robust to slow drifts of the machine."""
    return statistics.median(a / b for a, b in zip(num, den))


# ----------------------------------------------------------------------------- workers
def _init_compat(threads: int):
    import torch

    from megatron_coe.compat import install_cpu_compat

    install_cpu_compat()
    torch.set_num_threads(threads)


def coe_vs_moe_worker(rank, world_size, args):
    """One process: build CoE-2 and MoE layers, time them interleaved; raw times in seconds."""
    del rank, world_size
    _init_compat(args.threads)
    from megatron_coe.parallel import initialize_parallel

    pg = initialize_parallel(seed=args.seed)
    cfgs = {"moe": make_config(args, coe=False), "coe": make_config(args, coe=True)}
    layers = {k: build_layer(cfg, pg, args.experts) for k, cfg in cfgs.items()}
    steps = {}
    for k, layer in layers.items():
        x, grad = make_inputs(layer, args, seed=args.seed + 1)  # same tokens for both
        steps[k] = make_step(layer, x, grad, args.scope)
    times = {k: [] for k in steps}
    order = ["coe", "moe"]
    gc.collect()
    gc.disable()
    try:
        for i in range(args.warmup + args.iters):
            for k in (order if i % 2 == 0 else order[::-1]):  # A B B A A B ...
                t = steps[k]()
                if i >= args.warmup:
                    times[k].append(t)
            gc.collect()
    finally:
        gc.enable()
    result = dict(times=times, profile=None)
    if args.profile:
        result["profile"] = profile_coe_vs_moe(layers, steps, args)
    return result


def ep_worker(rank, world_size, args):
    """Two processes: CoE-2 layer at EP=1 (rank 0 alone) and at EP=2 (both ranks), interleaved."""
    import torch
    import torch.distributed as dist

    _init_compat(args.threads)
    from megatron_coe.parallel import destroy_parallel, initialize_parallel

    # EP=1 first (its groups stay alive after destroy_parallel; the layer keeps its own handles).
    pg1 = initialize_parallel(expert_model_parallel_size=1, seed=args.seed)
    layer1 = build_layer(make_config(args, coe=True, ep=1), pg1, args.experts)
    destroy_parallel()
    pg2 = initialize_parallel(expert_model_parallel_size=world_size, seed=args.seed)
    layer2 = build_layer(make_config(args, coe=True, ep=world_size), pg2, args.experts)
    assert len(layer2.mlp.experts.local_experts) == args.num_experts // world_size

    x1, g1 = make_inputs(layer1, args, seed=args.seed + 1 + rank)  # each rank: its own batch
    x2, g2 = make_inputs(layer2, args, seed=args.seed + 1 + rank)
    step1 = make_step(layer1, x1, g1, args.scope)
    step2 = make_step(layer2, x2, g2, args.scope)
    times = {"ep1": [], "ep2": []}
    gc.collect()
    gc.disable()
    dist.barrier()
    try:
        for i in range(args.warmup + args.iters):
            for k in (("ep1", "ep2") if i % 2 == 0 else ("ep2", "ep1")):
                if k == "ep1":
                    t = step1() if rank == 0 else float("nan")  # rank 1 idles in the barrier
                    dist.barrier()
                else:
                    dist.barrier()  # start together
                    t = step2()
                    dist.barrier()
                if i >= args.warmup:
                    times[k].append(t)
                gc.collect()
    finally:
        gc.enable()
    return dict(times=times)


# ----------------------------------------------------------------------------- profiling
_STAGES = ("shared_experts_compute", "route", "preprocess", "dispatch", "routed_experts_compute",
           "combine", "postprocess")


def profile_coe_vs_moe(layers, steps, args):
    """Noise-robust breakdown of both variants, interleaved like the timing loop.

    * Forward stage wall times of ``layer.mlp`` (the MoELayer stages that ``coe_pass`` calls,
      summed over the passes), one forward per variant per round, median over rounds.
    * torch.profiler self-CPU time per op for one forward+backward step: one short profiler
      session per variant per round, median over rounds per op (a preemption by another process
      lands in one round's op and is dropped by the median).
    """
    from torch.profiler import ProfilerActivity, profile

    rounds = args.profile_iters
    stage_rec = {k: {s: [] for s in _STAGES + ("inner residual / glue", "forward total")}
                 for k in layers}
    op_rec = {k: {} for k in layers}
    calls_rec = {k: [] for k in layers}
    inputs = {k: make_inputs(layer, args, seed=args.seed + 1)[0] for k, layer in layers.items()}
    order = list(layers)
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            mlp = layers[k].mlp
            acc = {s: 0.0 for s in _STAGES}

            def wrap(name, fn, acc=acc):
                def timed(*a, **kw):
                    t0 = time.perf_counter()
                    out = fn(*a, **kw)
                    acc[name] += time.perf_counter() - t0
                    return out
                return timed

            for s in _STAGES:  # instance attributes shadow the methods that coe_pass calls
                setattr(mlp, s, wrap(s, getattr(mlp, s)))
            try:
                t0 = time.perf_counter()
                out, _ = mlp(inputs[k])
                total = time.perf_counter() - t0
            finally:
                for s in _STAGES:
                    delattr(mlp, s)
            del out
            for s in _STAGES:
                stage_rec[k][s].append(acc[s] * 1e3)
            stage_rec[k]["inner residual / glue"].append((total - sum(acc.values())) * 1e3)
            stage_rec[k]["forward total"].append(total * 1e3)

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                steps[k]()
            n_calls = 0
            for e in prof.key_averages():
                op_rec[k].setdefault(e.key, []).append((e.self_cpu_time_total / 1e3, e.count))
                n_calls += e.count
            calls_rec[k].append(n_calls)
            gc.collect()
    result = {}
    for k in layers:
        ops = {}
        for key, vals in op_rec[k].items():
            times = [v[0] for v in vals] + [0.0] * (rounds - len(vals))
            ops[key] = (statistics.median(times), statistics.median(v[1] for v in vals))
        result[k] = dict(stages={s: statistics.median(v) for s, v in stage_rec[k].items()},
                         ops=ops, op_calls_per_step=statistics.median(calls_rec[k]))
    return result


def print_profile(prof, top: int = 18):
    coe, moe = prof["coe"], prof["moe"]
    print("\n== Profile (CoE vs MoE): layer.mlp forward stage wall time, ms, median over rounds "
          "(summed over passes)")
    print(f"{'stage':<28}{'MoE':>10}{'CoE':>10}{'CoE-MoE':>10}")
    for s in list(_STAGES) + ["inner residual / glue", "forward total"]:
        a, b = moe["stages"][s], coe["stages"][s]
        print(f"{s:<28}{a:>10.2f}{b:>10.2f}{b - a:>+10.2f}")
    print(f"\n== torch.profiler: self CPU ms per fwd+bwd step, median over rounds "
          f"(top {top} by |CoE - MoE|); "
          f"aten/autograd op calls per step: MoE {moe['op_calls_per_step']:.0f}, "
          f"CoE {coe['op_calls_per_step']:.0f}")
    keys = set(coe["ops"]) | set(moe["ops"])
    rows = []
    for key in keys:
        a, ca = moe["ops"].get(key, (0.0, 0.0))
        b, cb = coe["ops"].get(key, (0.0, 0.0))
        rows.append((b - a, key, a, ca, b, cb))
    rows.sort(key=lambda r: -abs(r[0]))
    print(f"{'op':<58}{'MoE ms':>8}{'calls':>7}{'CoE ms':>8}{'calls':>7}{'diff':>8}")
    for d, key, a, ca, b, cb in rows[:top]:
        print(f"{key[:57]:<58}{a:>8.2f}{ca:>7.0f}{b:>8.2f}{cb:>7.0f}{d:>+8.2f}")
    tot_a = sum(v[0] for v in moe["ops"].values())
    tot_b = sum(v[0] for v in coe["ops"].values())
    print(f"{'(sum of per-op medians)':<58}{tot_a:>8.2f}{'':>7}{tot_b:>8.2f}{'':>7}"
          f"{tot_b - tot_a:>+8.2f}")


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import torch

    _init_compat(args.threads)
    from megatron_coe.local_launch import run_distributed

    c, k = args.coe_iterations, args.coe_topk
    tokens = args.seq_length * args.micro_batch_size
    moe_name = f"MoE({c * k}/{args.num_experts})"
    coe_name = f"CoE-{c}({k}/{args.num_experts})"
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads/process "
          f"{args.threads}; dispatcher {args.dispatcher}; timed: "
          + ("layer.mlp (ChainOfExpertsLayer) fwd+bwd on the pre-MLP-layernormed input"
             if args.scope == "mlp" else "whole CoETransformerLayer (attention + MLP) fwd+bwd"))
    moe_shared = args.shared_expert_size * (c if args.shared_expert_baseline == "matched" else 1)
    print(f"hidden {args.hidden_size}, {args.num_experts} routed experts x ffn "
          f"{args.moe_ffn_hidden_size} ({args.experts} experts), shared expert: "
          f"{args.shared_expert_size or 'none'} per CoE pass, {moe_shared or 'none'} in MoE, "
          f"{'SwiGLU' if args.swiglu else 'GELU'}, aux-loss coeff {args.aux_loss_coeff}; "
          f"tokens/rank {tokens} (seq {args.seq_length} x mbs {args.micro_batch_size}); "
          f"warmup {args.warmup}, iters {args.iters}, variants interleaved")
    print(f"average tokens per routed expert per pass: {moe_name} {tokens * c * k / args.num_experts:.0f}, "
          f"{coe_name} {tokens * k / args.num_experts:.0f}")

    rows = []  # (variant, stats)
    profile_result = None
    ratios = []  # (label, ratio of medians, paired ratio, ratio of p10s, note)
    if not args.skip_coe_moe:
        f_moe = flops_per_step(make_config(args, coe=False), tokens)
        f_coe = flops_per_step(make_config(args, coe=True), tokens)
        print(f"\nMLP FLOPs per fwd+bwd step (matmuls, 3 x forward; attention not included):")
        print(f"{'':<16}{'router':>10}{'routed':>10}{'shared':>10}{'total':>10}  (MFLOP)")
        for name, f in ((moe_name, f_moe), (coe_name, f_coe)):
            print(f"{name:<16}" + "".join(f"{3 * f[p] / 1e6:>10.1f}"
                                         for p in ("router", "routed", "shared", "fwd")))
        flop_ratio = f_coe["fwd"] / f_moe["fwd"]
        print(f"CoE/MoE FLOPs = {flop_ratio:.3f} (routed and shared experts "
              + ("equal; " if args.shared_expert_baseline == "matched" or not args.shared_expert_size
                 else "equal, shared expert once per CoE pass; ")
              + "CoE runs one router per pass)")
        res = run_distributed(coe_vs_moe_worker, 1, timeout=args.timeout, args=args)[0]
        profile_result = res["profile"]
        tm, tc = res["times"]["moe"], res["times"]["coe"]
        rows += [(f"{moe_name}  EP=1", summarize(tm)), (f"{coe_name} EP=1", summarize(tc))]
        r_med = statistics.median(tc) / statistics.median(tm)
        r_pair = paired_ratio(tc, tm)
        r_p10 = pct(tc, 0.1) / pct(tm, 0.1)
        ratios.append((f"{coe_name} / {moe_name} time", r_med, r_pair, r_p10,
                       f"target <= {TARGET_COE_OVER_MOE:.2f}"))
        ratios.append((f"  ... per FLOP (time ratio / {flop_ratio:.3f})", r_med / flop_ratio,
                       r_pair / flop_ratio, r_p10 / flop_ratio, ""))
    if not args.skip_ep:
        res = run_distributed(ep_worker, 2, timeout=args.timeout, args=args)
        t1 = res[0]["times"]["ep1"]
        t2 = [max(a, b) for a, b in zip(res[0]["times"]["ep2"], res[1]["times"]["ep2"])]
        rows += [(f"{coe_name} EP=1, 1 proc", summarize(t1)),
                 (f"{coe_name} EP=2, 2 procs", summarize(t2))]
        ratios.append((f"{coe_name} EP=2 / EP=1 time (weak scaling)", statistics.median(t2)
                       / statistics.median(t1), paired_ratio(t2, t1),
                       pct(t2, 0.1) / pct(t1, 0.1), "ideal 1.00"))

    print(f"\n{'variant':<34}{'median ms':>10}{'p10':>9}{'p90':>9}{'n':>5}")
    for name, s in rows:
        print(f"{name:<34}{s['median']:>10.2f}{s['p10']:>9.2f}{s['p90']:>9.2f}{s['n']:>5}")
    if not args.skip_ep:
        print("(EP=2: step time = slower rank; each rank runs its own batch of "
              f"{tokens} tokens; EP=1 runs on rank 0 while rank 1 waits)")
    print(f"\n{'ratio':<50}{'of medians':>11}{'paired':>8}{'of p10s':>9}")
    for label, a, b, c10, note in ratios:
        print(f"{label:<50}{a:>11.3f}{b:>8.3f}{c10:>9.3f}  {note}")
    print("(paired = median of per-iteration ratios of adjacent A/B steps; of p10s = least "
          "disturbed by other load, since noise only adds time)")
    if not args.skip_coe_moe:
        verdict = "PASS" if r_med <= TARGET_COE_OVER_MOE else "ABOVE TARGET"
        print(f"CoE/MoE target <= {TARGET_COE_OVER_MOE}: {verdict} (ratio of medians)")
        if flop_ratio > TARGET_COE_OVER_MOE:
            print(f"note: the FLOP ratio alone is {flop_ratio:.3f} > {TARGET_COE_OVER_MOE}: the "
                  "target is stated at equal FLOPs (--shared-expert-baseline matched)")
    if profile_result is not None:
        print_profile(profile_result)
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
