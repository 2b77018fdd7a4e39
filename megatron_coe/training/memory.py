"""Memory per rank, estimated from the options alone (no process group, no data, no model).

One owner of the estimate: the trainer's start-up line (``trainer.py``) and
``tools/estimate_memory.py`` both call ``estimate(args, world_size)``.

Exact parts (what the trainer builds: ``setup.build_model`` / ``build_optimizer``):

* **parameters**: the tensors of ``ModelArch.parameter_tensors`` split as the layers split them
  (column/row-parallel linears over TP, norms and routers replicated, routed experts over EP
  (experts / EP per rank) and expert-TP, the MLA down projections split over TP in the local
  layers and duplicated in Transformer Engine's), layers of this pipeline stage, the embedding
  on the first stage, the final norm and the output layer (untied, or the tied copy with PP > 1)
  on the last. They live in Megatron-Core DDP's parameter buffers (the distributed optimizer
  maps every parameter into one), which pad each parameter's start to 64 elements and each
  bucket's end to a multiple of lcm(DP x CP, 128); routed experts have their own buffer (expert
  data-parallel group) when EP > 1 or the expert-TP size differs from the TP size, and the
  embedding tied across pipeline stages its own bucket. bf16/fp16: 2 bytes, fp32: 4.
* **gradients**: the same buffers' fp32 main-grad storage (``grad_reduce_in_fp32``): 4 bytes
  per element.
* **optimizer**: Adam's two fp32 moments, plus the fp32 main parameters with bf16/fp16 (fp32
  parameters are their own main copy), sharded by the distributed optimizer: the dense buffer
  over the data-parallel group with the context-parallel ranks (DP x CP), the expert buffer
  over the expert data-parallel group. The shards hold the real parameter elements (not the
  padding): the number is the group's total divided by its size; one rank's shard differs
  from it by at most the padding.

Estimated part:

* **activations**: the bytes autograd keeps for backward per micro-batch, per layer, by module
  (norms, attention, each of the C CoE passes: pass input, routing, dispatched tokens, routed
  and shared experts; dense MLP layers; the loss's fp32 logits on the last stage), as
  Megatron-Core's local layers save them: checked against the peak of the tensors saved for
  backward on CPU (``tests/test_memory_estimate.py``: C=1, C=2, bf16, dropout, MLA with a shared
  expert, LayerNorm/GeLU/GQA with a dense layer, TP=2 with SP, selective and full recompute,
  all within a few percent). The seq^2 attention probabilities (fp32 softmax, its bf16 copy,
  the dropout mask) only with the local (unfused) attention; Transformer Engine's fused
  attention keeps the softmax statistics only (the Transformer Engine terms are not measured
  here: no GPU in the tests). Divided by TP where the layers split the tensors (the residual
  stream under sequence parallelism), and by CP (``--context-parallel-size``: a rank holds
  seq / CP tokens of each sequence; the keys and values Transformer Engine's context-parallel
  attention receives from the other ranks are not counted). Times the micro-batches in flight
  on the pipeline stage (1F1B: PP - stage; interleaved: Megatron-LM's 1 + (PP - 1) / (PP x VPP)
  factor), plus what
  exists only for a moment: the loss's tensors (released first in backward) or one recomputed
  unit. Selective recompute drops the recomputed modules' tensors (core_attn, moe, moe_act,
  layernorm, shared_experts, mla_up_proj); full recompute keeps each unit's input. Not counted:
  communication buffers, the allocator's fragmentation and the CUDA/NCCL contexts (a few GiB on
  a GPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_coe.arch import ModelArch

GiB = 2 ** 30


@dataclass
class Parallel:
    """The parallel sizes the estimate needs (from the options and the world size)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1
    vpp: int = 1
    sequence_parallel: bool = False
    cp: int = 1

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp * self.cp)

    @property
    def dp_cp(self) -> int:
        """The data-parallel-with-CP group (DDP's dense buffers, the distributed optimizer)."""
        return self.world_size // (self.tp * self.pp)

    @property
    def expert_dp(self) -> int:
        return self.world_size // (self.pp * self.ep * self.etp)

    @property
    def experts_apart(self) -> bool:
        """Routed experts in their own buffers / optimizer (``setup.mark_routed_experts``)."""
        return self.ep > 1 or self.etp != self.tp


@dataclass
class RankMemory:
    """Bytes of one rank of pipeline stage ``stage`` (all TP/EP/DP ranks of a stage alike)."""

    stage: int
    layers: list
    params: int = 0            # parameter elements this rank holds (unpadded)
    expert_params: int = 0     # ... of them routed experts
    buffer_numel: int = 0      # DDP buffer elements (padded), dense + expert
    dense_sharded: int = 0     # real elements sharded over the data-parallel group
    expert_sharded: int = 0    # ... over the expert data-parallel group
    param_bytes: int = 0
    grad_bytes: int = 0
    optimizer_bytes: int = 0
    activation_bytes: int = 0  # estimate, all micro-batches in flight
    activation_per_microbatch: int = 0  # estimate, the peak of one micro-batch
    in_flight: int = 1
    notes: list = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


# --------------------------------------------------------------------------- layout
def parallel_of(args, world_size: int) -> Parallel:
    tp = args.tensor_model_parallel_size
    vpp = 1
    per_vstage = args.num_layers_per_virtual_pipeline_stage
    if per_vstage:
        vpp = max(1, args.num_layers // (args.pipeline_model_parallel_size * per_vstage))
    elif args.num_virtual_stages_per_pipeline_rank:
        vpp = args.num_virtual_stages_per_pipeline_rank
    return Parallel(world_size=world_size, tp=tp, pp=args.pipeline_model_parallel_size,
                    ep=args.expert_model_parallel_size,
                    etp=args.expert_tensor_parallel_size or tp, vpp=vpp,
                    sequence_parallel=bool(args.sequence_parallel),
                    cp=getattr(args, "context_parallel_size", 1))


def stage_layers(args, par: Parallel) -> list:
    """``[[layer indices] per pipeline rank]``: even stages, Megatron-Core's uneven first/last
    (``--decoder-first/last-pipeline-num-layers``) and the virtual stages (a rank holds virtual
    stages rank, rank + PP, ...)."""
    n, pp, vpp = args.num_layers, par.pp, par.vpp
    first, last = args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
    middle_ranks = pp - (first is not None) - (last is not None)
    middle = (n - (first or 0) - (last or 0)) // middle_ranks if middle_ranks else 0
    per_rank = [middle] * pp  # layers of each pipeline rank, all its virtual stages together
    if first is not None:
        per_rank[0] = first
    if last is not None:
        per_rank[-1] = last
    out, start = [[] for _ in range(pp)], 0
    for _ in range(vpp):  # virtual stage v of rank 0, 1, ..., then v + 1
        for rank in range(pp):
            size = per_rank[rank] // vpp
            out[rank] += list(range(start, start + size))
            start += size
    return out


def _rank_numel(numel: int, split: str, par: Parallel, impl: str) -> int:
    if split == "tp" or (split == "mla_down" and impl == "local"):
        return numel // par.tp
    if split == "expert":
        return numel // par.etp
    return numel


def rank_tensors(arch: ModelArch, vocab: int, par: Parallel, stage: int, layers: list,
                 impl: str) -> tuple:
    """``(dense numels, expert numels, shared-embedding numels)`` of one rank of ``stage``."""
    t = arch.parameter_tensors(vocab)
    pattern = arch.moe_layer_pattern()
    dense, experts, shared_emb = [], [], []
    for i in layers:
        tensors = t["moe_layer" if pattern[i] else "dense_layer"]
        dense += [_rank_numel(numel, split, par, impl) for _, numel, split in tensors
                  if split != "expert"]
        if pattern[i]:  # the experts / EP local experts of this rank, each fc1 + fc2
            one = [_rank_numel(numel, split, par, impl) for _, numel, split in tensors
                   if split == "expert"][:2]
            experts += one * (arch.num_moe_experts // par.ep)
    emb = t["embedding"] // par.tp
    tied_across = par.pp > 1 and not arch.untie_embeddings_and_output_weights
    if stage == 0:
        (shared_emb if tied_across else dense).append(emb)
    if stage == par.pp - 1:
        dense += [numel for _, numel, _ in t["final_norm"]]
        if arch.untie_embeddings_and_output_weights:
            dense.append(emb)
        elif tied_across:
            shared_emb.append(emb)
    if not par.experts_apart:
        dense, experts = dense + experts, []
    return dense, experts, shared_emb


def buffer_numel(numels: list, dp: int) -> int:
    """Elements of one Megatron-Core DDP bucket holding tensors of ``numels`` with the
    distributed optimizer: each tensor's start padded to 64, the end to lcm(dp, 128)."""
    if not numels:
        return 0
    raw = sum(-(-n // 64) * 64 for n in numels)
    div = math.lcm(dp, 128)
    return -(-raw // div) * div


# --------------------------------------------------------------------------- activations
def _recompute(args) -> tuple:
    """``(granularity, method, num_layers, modules)`` from the options."""
    gran = getattr(args, "recompute_granularity", None)
    modules = list(getattr(args, "recompute_modules", None) or [])
    if gran is None and (modules or getattr(args, "recompute_activations", False)):
        gran = "selective"
    if gran == "selective" and not modules:
        modules = ["core_attn"]  # Megatron-LM's default
    return gran, getattr(args, "recompute_method", None), getattr(args, "recompute_num_layers",
                                                                   None), modules


def layer_activations(arch: ModelArch, args, par: Parallel, impl: str, moe: bool,
                      modules: tuple = ()) -> dict:
    """Bytes one layer saves for backward for one micro-batch: ``{"attention", "mlp",
    "mlp_input"}`` (``mlp_input``: what the MLP keeps when the MoE chain is recomputed).
    ``modules``: the selectively recomputed modules. With context parallelism a rank holds
    seq / CP tokens of each sequence (its queries attend to all seq keys)."""
    s, b = args.seq_length, args.micro_batch_size
    sq = s // par.cp  # this rank's tokens (queries) of each sequence
    T = sq * b
    bf16 = bool(getattr(args, "bf16", False) or getattr(args, "fp16", False)
                or getattr(args, "fp8_format", None))
    e = 2 if bf16 else 4
    tp = par.tp
    sp = tp if par.sequence_parallel else 1  # the residual stream is split over TP with SP
    h, n = arch.hidden_size, arch.num_attention_heads
    hd, ad = args.hidden_dropout, args.attention_dropout

    # RMSNorm keeps its input, the normalized input and fp32 statistics; LayerNorm its input
    # and mean / rstd (its output is kept by the next linear); --recompute-modules layernorm:
    # the input only
    rms = arch.normalization == "RMSNorm"
    keep_out = 0 if "layernorm" in modules else (1 if rms else 0)
    # (the local RMSNorm computes in fp32: its tensors are fp32 under bf16 too)
    ne = 4 if rms and impl == "local" else e
    norm = (T * h * ne * (1 + keep_out) + T * (4 if rms else 8)) // sp
    # dropout masks: the local layers keep a mask in the activations' dtype (torch's unfused
    # dropout), Megatron-Core's fused bias-dropout-add a bool mask
    mask_e = e if impl == "local" else 1
    dropout = (T * h * mask_e // sp) if hd > 0 else 0
    if arch.multi_latent_attention:
        dq, dr, dv = arch.qk_head_dim, arch.qk_pos_emb_head_dim, arch.v_head_dim
        r, rq = arch.kv_lora_rank, arch.q_lora_rank or 0
        latent = T * e * (3 * rq + 3 * r + dr + h) + 2 * T * 4  # down projections + latent norms
        heads = T * e * (2 * n * (dq + dr) + 2 * n * dv + 2 * dr) // tp
        if "mla_up_proj" in modules:
            heads = T * e * n * dv // tp
        attn = latent + heads
        nh = n
    else:
        d = arch.kv_channels or h // n
        g = arch.num_query_groups or n
        attn = T * e * (2 * (n + 2 * g) * d + n * d + 2 * d) // tp
        nh = n
    if impl == "local":  # unfused softmax: the probabilities [b, n/tp, s, s] (+ dropout mask)
        # softmax in fp32 (Megatron-Core's attention_softmax_in_fp32 under bf16), cast back
        per = (4 + (e if e != 4 else 0)) + (2 * e if ad > 0 else 0)  # + mask, dropped
        probs = b * (nh // tp) * sq * s * per
    else:  # flash/fused attention: no seq^2 tensor, the softmax statistics only
        probs = b * (nh // tp) * sq * 4
    if "core_attn" in modules:
        probs = 0
    attention = norm + attn + probs + dropout
    if not moe:
        ffn = arch.resolved("ffn_hidden_size")
        gated = 2 if arch.gated_linear_unit else 1
        # fc1 input, its output (kept by the activation) and the activation's output
        mlp = norm + dropout + T * e * (h // sp + (5 if gated == 2 else 2) * ffn // tp)
        return dict(attention=attention, mlp=mlp, mlp_input=mlp)
    E, k = arch.num_moe_experts, arch.moe_router_topk
    f = arch.resolved("moe_ffn_hidden_size")
    fs = arch.moe_shared_expert_intermediate_size or 0
    gated = arch.gated_linear_unit
    tokens = T // sp  # tokens of this rank entering each pass
    routed_tokens = tokens * k * par.etp  # after the dispatch (gathered over expert-TP)
    fc1 = (2 if gated else 1) * f // par.etp  # one routed expert's fc1 output per rank
    act = 0 if "moe_act" in modules else fc1
    per_pass = (tokens * h * e  # the pass input
                + tokens * (E + 4 * k * 8 + 8)  # routing map, top-k indices, permutation
                # the expert input, fc1's output, the activation's input and output
                + routed_tokens * e * (h + 2 * fc1 + act)
                + routed_tokens * 4)  # routing probabilities
    if fs:
        shared = T * e * (h // sp + (5 if gated else 2) * fs // tp)
        if "shared_experts" in modules:
            shared = T * e * h // tp
        per_pass += shared
    chain = arch.coe_iterations * per_pass
    if "moe" in modules:
        chain_kept = tokens * h * e  # the chain's input, the rest recomputed in backward
    else:
        chain_kept = chain
    return dict(attention=attention, mlp=norm + dropout + chain_kept,
                mlp_recomputed=chain - chain_kept, mlp_input=norm + dropout + tokens * h * e)


def stage_activations(arch: ModelArch, args, par: Parallel, impl: str, stage: int,
                      layers: list, vocab: int) -> tuple:
    """``(kept, transient, notes)``: the bytes one micro-batch keeps on this stage from its
    forward to its backward, and the bytes held only for a moment on top (the loss's tensors,
    released first in backward; one recomputed unit while it is recomputed). The peak of one
    micro-batch is ``kept + transient``."""
    gran, method, num, modules = _recompute(args)
    sel = tuple(modules) if gran == "selective" else ()
    pattern = arch.moe_layer_pattern()
    s, b = args.seq_length, args.micro_batch_size
    T = s // par.cp * b  # this rank's tokens (context parallelism: seq / CP of each sequence)
    bf16 = bool(getattr(args, "bf16", False) or getattr(args, "fp16", False)
                or getattr(args, "fp8_format", None))
    e = 2 if bf16 else 4
    sp = par.tp if par.sequence_parallel else 1
    per_layer = []
    for i in layers:
        a = layer_activations(arch, args, par, impl, bool(pattern[i]), sel)
        per_layer.append(a["attention"] + a["mlp"])
    extra_backward = 0  # recomputed in backward, held while one unit is recomputed
    if sel and "moe" in sel:
        extra_backward = max((layer_activations(arch, args, par, impl, bool(pattern[i]), sel)
                              .get("mlp_recomputed", 0) for i in layers), default=0)
    unit_input = T * arch.hidden_size * e // sp
    if gran == "full" and per_layer:
        if method == "uniform":
            units = [per_layer[j:j + num] for j in range(0, len(per_layer), num)]
            kept = unit_input * len(units)
            extra_backward = max(sum(u) for u in units)
        else:  # block: the first num layers of the stage recomputed one by one
            recomputed = per_layer[:num]
            kept = unit_input * len(recomputed) + sum(per_layer[num:])
            extra_backward = max(recomputed, default=0)
        total = kept
    else:
        total = sum(per_layer)
    if impl == "local" and stage == 0:
        total += s * s  # the causal mask (bool), built once
    if stage == 0:
        mask_e = (e if impl == "local" else 1) if args.hidden_dropout > 0 else 0
        total += T * 8 + T * arch.hidden_size * mask_e // sp  # token ids, embedding dropout
    head = 0
    if stage == par.pp - 1:  # final norm, output-layer input, fp32 logits of the loss
        rms = arch.normalization == "RMSNorm"
        ne = 4 if rms and impl == "local" else e
        head = (T * arch.hidden_size * ne * (2 if rms else 1) + T * (4 if rms else 8)) // sp \
            + T * arch.hidden_size * e + T * vocab // par.tp * 4 + T * 9
    # the loss's tensors (head) are released at the start of backward, before any layer is
    # recomputed: the peak is at the end of forward or while a unit is recomputed
    transient = max(head, extra_backward)
    notes = []
    if gran == "full":
        notes.append(f"full recompute (uniform, {num} layer(s) per unit)" if method == "uniform"
                     else f"full recompute (block, the first {num} layer(s) of the stage)")
    elif gran == "selective":
        notes.append("selective recompute (" + " ".join(modules) + ")")
    else:
        notes.append("no recompute")
    return total, transient, notes


def in_flight(par: Parallel, stage: int, num_microbatches: int) -> float:
    """Micro-batches whose activations a stage holds at once (1F1B: PP - stage; interleaved:
    Megatron-LM's factor 1 + (PP - 1) / (PP x VPP) on the first stage)."""
    if par.pp == 1:
        return 1
    held = min(par.pp - stage, num_microbatches)
    if par.vpp > 1:
        held = held * (1 + (par.pp - 1) / (par.pp * par.vpp))
    return held


# --------------------------------------------------------------------------- estimate
def estimate(args, world_size: int, vocab_size: int, impl: Optional[str] = None) -> list:
    """``[RankMemory]`` per pipeline stage for the parsed options ``args`` on ``world_size``
    processes, ``vocab_size`` the padded vocabulary. ``impl``: ``"local"`` or
    ``"transformer_engine"`` (default: ``args.transformer_impl``, else Transformer Engine, the
    GPU default)."""
    impl = impl or getattr(args, "transformer_impl", None) or "transformer_engine"
    arch = ModelArch.from_args(args).resolve_defaults()
    par = parallel_of(args, world_size)
    if arch.num_moe_experts % par.ep:
        raise ValueError(f"--num-experts {arch.num_moe_experts} is not divisible by "
                         f"--expert-model-parallel-size {par.ep}: choose an EP size that "
                         "divides the number of experts.")
    if world_size % (par.tp * par.pp * par.cp) or (world_size // par.pp) % (par.ep * par.etp):
        raise ValueError(f"world size {world_size} does not fit TP {par.tp} x PP {par.pp} x CP "
                         f"{par.cp} with EP {par.ep} x expert-TP {par.etp}: change the sizes or "
                         "the world size.")
    bf16 = bool(getattr(args, "bf16", False) or getattr(args, "fp16", False)
                or getattr(args, "fp8_format", None))
    p_bytes = 2 if bf16 else 4
    opt_per_elem = 4 * (3 if bf16 else 2)  # (fp32 main copy +) exp_avg + exp_avg_sq
    mbs = args.micro_batch_size
    gbs = args.global_batch_size or mbs * par.dp
    num_mb = max(1, gbs // (mbs * par.dp))
    out = []
    for stage, layers in enumerate(stage_layers(args, par)):
        dense, experts, shared_emb = rank_tensors(arch, vocab_size, par, stage, layers, impl)
        dense_buf = buffer_numel(dense, par.dp_cp) + sum(buffer_numel([n], par.dp_cp)
                                                         for n in shared_emb)
        expert_buf = buffer_numel(experts, par.expert_dp)
        r = RankMemory(stage=stage, layers=layers)
        r.params = sum(dense) + sum(experts) + sum(shared_emb)
        r.expert_params = sum(experts) if par.experts_apart else 0
        r.buffer_numel = dense_buf + expert_buf
        r.param_bytes = r.buffer_numel * p_bytes
        r.grad_bytes = r.buffer_numel * 4
        r.dense_sharded, r.expert_sharded = sum(dense) + sum(shared_emb), sum(experts)
        r.optimizer_bytes = int(round(opt_per_elem * (r.dense_sharded / par.dp_cp
                                                      + r.expert_sharded / par.expert_dp)))
        kept, transient, r.notes = stage_activations(arch, args, par, impl, stage, layers,
                                                     vocab_size)
        r.activation_per_microbatch = kept + transient
        r.in_flight = in_flight(par, stage, num_mb)
        # every micro-batch in flight keeps its tensors; one at a time is recomputed
        r.activation_bytes = int(kept * r.in_flight + transient)
        out.append(r)
    return out


def gib(n: float) -> str:
    v = n / GiB
    return f"{v:.2f}" if v >= 0.1 or v == 0 else f"{v:.2g}"


def startup_line(ranks: list, args) -> str:
    """The trainer's start-up line: the stage with the largest total."""
    r = max(ranks, key=lambda x: x.total_bytes)
    where = f" (pipeline stage {r.stage}, the largest)" if len(ranks) > 1 else ""
    return (f"memory per rank (estimate){where}: params {gib(r.param_bytes)} GiB, grads "
            f"{gib(r.grad_bytes)}, optimizer {gib(r.optimizer_bytes)}, activations "
            f"~{gib(r.activation_bytes)} (C={args.coe_iterations} passes, "
            f"{r.in_flight:g} micro-batch(es) in flight, {', '.join(r.notes)}); total "
            f"~{gib(r.total_bytes)} GiB")


def table(ranks: list, args, world_size: int) -> str:
    """Markdown table, one row per pipeline stage."""
    par = parallel_of(args, world_size)
    cp = f" x CP {par.cp}" if par.cp > 1 else ""
    head = (f"layout: {world_size} ranks = TP {par.tp} x PP {par.pp}{cp} x DP {par.dp} "
            f"(EP {par.ep}, expert-TP {par.etp}, expert-DP {par.expert_dp}); "
            f"C={args.coe_iterations}; micro-batch {args.micro_batch_size} x seq "
            f"{args.seq_length}; {', '.join(ranks[0].notes)}\n\n")
    rows = ["| stage | layers | params (count) | params GiB | grads GiB | optimizer GiB | "
            "activations GiB (in flight) | total GiB |",
            "|---|---|---|---|---|---|---|---|"]
    for r in ranks:
        lay = f"{r.layers[0]}-{r.layers[-1]}" if r.layers else "-"
        rows.append(f"| {r.stage} | {lay} | {r.params:,} | {gib(r.param_bytes)} | "
                    f"{gib(r.grad_bytes)} | {gib(r.optimizer_bytes)} | "
                    f"~{gib(r.activation_bytes)} ({r.in_flight:g}) | ~{gib(r.total_bytes)} |")
    return head + "\n".join(rows)
