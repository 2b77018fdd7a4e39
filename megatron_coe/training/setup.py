"""Everything built once before the loop: process groups, model config, model, DDP, optimizer, LR.

Each builder takes the parsed ``TrainArgs``. Checks that belong to the trainer (batch arithmetic,
parallel layout, GPU-only features on a CPU) are here; the model config validates itself.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch

from megatron_coe.arch import ModelArch
from megatron_coe.compat import cuda_device_redirect, have_transformer_engine, install_cpu_compat
from megatron_coe.compat.collective_timeout import default_group_timeout
from megatron_coe.config import CPU_UNFUSED, CoEMLATransformerConfig, CoETransformerConfig
from megatron_coe.training import precision
from megatron_coe.training.errors import SetupError
from megatron_coe.training.options import OPTIONS, TrainArgs

__all__ = ["SetupError"]  # re-exported: defined in errors.py (precision.PrecisionError derives)


# --------------------------------------------------------------------------- runtime / layout
def use_cuda() -> bool:
    return torch.cuda.is_available()


def check_runtime(args: TrainArgs) -> None:
    """GPU-only features refused on a CPU machine, with the option to change.

    FP8: a CUDA device, Transformer Engine and a GPU of the recipe's class
    (``precision.check_fp8_device``; ``PrecisionError`` is a ``SetupError``). Context
    parallelism: Transformer Engine's attention (``precision.check_context_parallel``).
    """
    precision.check_fp8_device(args)
    # a CUDA machine whose Transformer Engine does not import: refused unless --transformer-impl
    # local (never a silent fall back to the local layers)
    impl = precision.resolve_transformer_impl(args)
    precision.check_context_parallel(args, impl, use_cuda())  # TE attention only
    precision.check_flex_dispatcher(args)  # DeepEP / HybridEP, on every machine
    if use_cuda():
        precision.check_cuda_max_connections(
            args, os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"),
            torch.cuda.get_device_capability(precision.local_device_index(
                int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())))
        return
    if args.transformer_impl == "transformer_engine":
        raise SetupError("--transformer-impl transformer_engine needs a CUDA GPU; use "
                         "--transformer-impl local on CPU.")
    if args.distributed_backend == "nccl":
        raise SetupError("--distributed-backend nccl needs CUDA; use gloo on CPU.")


def precision_plan(args: TrainArgs) -> precision.PrecisionPlan:
    """``precision.plan_precision`` for this machine: the TE layers are the default on a CUDA
    machine (``check_runtime`` has refused one whose TE does not import, unless
    ``--transformer-impl local``), the local layers elsewhere."""
    return precision.plan_precision(args, te_available=use_cuda())


def fusion_plan(args: TrainArgs) -> precision.FusionPlan:
    """``precision.plan_fusions`` for this machine (GPU: Megatron-LM's fusions whose kernels
    import; CPU: none)."""
    return precision.plan_fusions(args, cuda=use_cuda(),
                                  impl=precision_plan(args).transformer_impl)


def transformer_impl(args: TrainArgs) -> str:
    return precision_plan(args).transformer_impl


@dataclass
class Layout:
    """Parallel layout of this job (sizes only; Megatron's parallel_state holds the groups).
    world_size = tp x pp x cp x dp; ``cp`` last, so that the layouts recorded by checkpoints
    saved before it existed read as cp 1 (``checkpoint.load_checkpoint``)."""

    world_size: int
    tp: int
    pp: int
    ep: int
    dp: int
    num_microbatches: int
    cp: int = 1
    vpp: int = 1  # model chunks (virtual pipeline stages) per pipeline rank; 1: not interleaved


def stage_layers(args: TrainArgs, pp: int) -> list:
    """Number of decoder layers of each pipeline stage: even, or with
    ``--decoder-first/last-pipeline-num-layers`` the given first/last stages and the rest shared
    evenly by the others (Megatron-Core's uneven split); errors say what to change."""
    first, last = args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers
    if first is None and last is None:
        if args.num_layers % pp:
            raise SetupError(f"--num-layers {args.num_layers} is not divisible by "
                             f"--pipeline-model-parallel-size {pp}: change one of them, or split "
                             "unevenly with --decoder-first-pipeline-num-layers / "
                             "--decoder-last-pipeline-num-layers.")
        return [args.num_layers // pp] * pp
    what = " ".join(f"--decoder-{k}-pipeline-num-layers {v}" for k, v in
                    (("first", first), ("last", last)) if v is not None)
    if pp == 1:
        raise SetupError(f"{what}: needs --pipeline-model-parallel-size > 1.")
    fixed = [n for n in (first, last) if n is not None]
    middle_stages = pp - len(fixed)
    rest = args.num_layers - sum(fixed)
    if rest < 0 or (middle_stages == 0 and rest != 0) or (middle_stages and (
            rest % middle_stages or rest == 0)):
        raise SetupError(
            f"{what} with --num-layers {args.num_layers} and --pipeline-model-parallel-size {pp}: "
            f"the other {middle_stages} stage(s) would share {rest} layers, which must be "
            + ("0 (first + last = all layers)" if middle_stages == 0 else
               f"a positive multiple of {middle_stages}") + "; change the stage sizes.")
    even = rest // middle_stages if middle_stages else 0
    return [first if first is not None else even] + [even] * (pp - 2) + \
        [last if last is not None else even]


VPP_FLAGS = ("--num-layers-per-virtual-pipeline-stage", "--num-virtual-stages-per-pipeline-rank")


def virtual_stages(args: TrainArgs, pp: int) -> int:
    """Model chunks (virtual pipeline stages) per pipeline rank, 1 without interleaving, from
    ``--num-layers-per-virtual-pipeline-stage`` or ``--num-virtual-stages-per-pipeline-rank``
    by Megatron-LM's rules (at most one of them; layers per virtual stage only with even stages;
    one chunk per rank is no interleaving; a pipeline of at least 2 ranks; every stage's layers
    a multiple of the chunks); errors say what to change."""
    per_stage, chunks = (args.num_layers_per_virtual_pipeline_stage,
                         args.num_virtual_stages_per_pipeline_rank)
    if per_stage is None and chunks is None:
        return 1
    if per_stage is not None and chunks is not None:
        raise SetupError(f"{VPP_FLAGS[0]} and {VPP_FLAGS[1]} exclude each other (as in "
                         "Megatron-LM): give one of them.")
    sizes = stage_layers(args, pp)
    if per_stage is not None:
        what = f"{VPP_FLAGS[0]} {per_stage}"
        if len(set(sizes)) > 1 or args.decoder_first_pipeline_num_layers is not None \
                or args.decoder_last_pipeline_num_layers is not None:
            raise SetupError(f"{what} with uneven stages (--decoder-first/last-pipeline-num-layers)"
                             f": give the chunks per rank with {VPP_FLAGS[1]} instead (as in "
                             "Megatron-LM).")
        if sizes[0] % per_stage:
            raise SetupError(f"{what}: the {sizes[0]} layers of each pipeline rank (--num-layers "
                             f"{args.num_layers} / --pipeline-model-parallel-size {pp}) are not a "
                             "multiple of it; change one of the three.")
        vpp = sizes[0] // per_stage
    else:
        what, vpp = f"{VPP_FLAGS[1]} {chunks}", chunks
    if vpp == 1:  # Megatron-LM: one virtual stage per rank is the plain schedule
        return 1
    if pp == 1:
        raise SetupError(f"{what}: the interleaved pipeline needs --pipeline-model-parallel-size "
                         "> 1; raise it or drop the flag.")
    for stage, size in enumerate(sizes):
        if size % vpp:
            raise SetupError(f"{what}: pipeline stage {stage} has {size} layers, not a multiple "
                             f"of {vpp} virtual stages; change --num-layers, the stage sizes "
                             "(--decoder-first/last-pipeline-num-layers) or the virtual stages.")
    return vpp


def _check_stages_have_coe_layers(args: TrainArgs, sizes: list, vpp: int = 1) -> None:
    """Every pipeline stage (with ``vpp`` > 1: every model chunk, virtual stage v of rank r
    holding the v-th share of that rank's layers after all ranks' shares of virtual stages
    before it) must hold a CoE layer: a stage of only dense layers has no expert parameters, so
    its distributed optimizer (and checkpoint save) differs from its peers' and the ranks'
    collectives no longer match. Refused here rather than failing at the first save."""
    if (len(sizes) == 1 and vpp == 1) or args.moe_layer_freq == 1:
        return
    from megatron_coe.arch import moe_layer_pattern

    pattern = moe_layer_pattern(args.moe_layer_freq, args.num_layers)
    start = 0
    for chunk in range(vpp):
        for stage, stage_size in enumerate(sizes):
            size = stage_size // vpp
            if not any(pattern[start:start + size]):
                where = f"pipeline stage {stage}" + (f", virtual stage {chunk}" if vpp > 1 else "")
                raise SetupError(
                    f"--moe-layer-freq {args.moe_layer_freq} with --pipeline-model-parallel-size "
                    f"{len(sizes)}: {where} (layers {start + 1}-{start + size}) has no CoE layer, "
                    "which is not supported; change --moe-layer-freq, the pipeline size or the "
                    "stage sizes (--decoder-first/last-pipeline-num-layers"
                    + (", the virtual stages" if vpp > 1 else "")
                    + ") so that every stage holds at least one.")
            start += size


def check_layout(args: TrainArgs, world_size: int) -> Layout:
    """Parallel sizes and batch arithmetic; errors say what to change.

    world = TP x PP x CP x DP (Megatron-Core's order tp-cp-ep-dp-pp); the experts' layout
    (EP x expert-TP x expert-DP per pipeline stage) folds CP into the expert data-parallel size.
    """
    tp, pp, ep, cp = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                      args.expert_model_parallel_size, args.context_parallel_size)
    etp = args.expert_tensor_parallel_size or tp
    if world_size % (tp * pp * cp):
        raise SetupError(f"world size {world_size} is not divisible by tensor-parallel {tp} x "
                         f"pipeline-parallel {pp} x context-parallel {cp}: change "
                         "--tensor-model-parallel-size / --pipeline-model-parallel-size / "
                         "--context-parallel-size or the number of processes.")
    if (world_size // pp) % (ep * etp):
        raise SetupError(f"world size {world_size} / pipeline-parallel {pp} is not divisible by "
                         f"expert-parallel {ep} x expert-tensor-parallel {etp}: change "
                         "--expert-model-parallel-size or the number of processes.")
    sizes = stage_layers(args, pp)
    vpp = virtual_stages(args, pp)
    if tp > 1 and not args.sequence_parallel:
        raise SetupError("MoE/CoE layers with tensor parallelism need --sequence-parallel.")
    _check_stages_have_coe_layers(args, sizes, vpp)
    dp = world_size // (tp * pp * cp)
    per_step = args.micro_batch_size * dp
    if args.global_batch_size % per_step:
        lower = max(per_step, args.global_batch_size // per_step * per_step)
        raise SetupError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp} = {per_step}: use a multiple of "
            f"{per_step} (e.g. {lower} or {lower + per_step}) or change --micro-batch-size "
            "(data-parallel size = processes / (tensor-parallel x pipeline-parallel x "
            "context-parallel)).")
    check_batch_ramp(args, dp, pp if vpp > 1 else 1)
    if args.train_samples is not None and train_iters_and_samples(args)[0] == 0:
        raise SetupError(f"--train-samples {args.train_samples} is less than one global batch "
                         f"(--global-batch-size {args.global_batch_size}): nothing to train; "
                         "raise --train-samples.")
    layout = Layout(world_size, tp, pp, ep, dp, args.global_batch_size // per_step, cp, vpp)
    if vpp > 1 and layout.num_microbatches % pp:
        # Megatron-Core's interleaved schedule runs groups of PP micro-batches per model chunk
        # (microbatch_group_size_per_vp_stage, default PP)
        multiple = per_step * pp
        raise SetupError(
            f"the interleaved pipeline needs a multiple of --pipeline-model-parallel-size {pp} "
            f"micro-batches per step, but --global-batch-size {args.global_batch_size} gives "
            f"{layout.num_microbatches} (micro-batch {args.micro_batch_size} x data-parallel "
            f"{dp} each): use a multiple of {multiple}, e.g. "
            f"{max(multiple, args.global_batch_size // multiple * multiple)}.")
    check_attention_memory(args, layout)
    return layout


# --------------------------------------------------------------------------- batch ramp
def check_batch_ramp(args: TrainArgs, dp: int, groups: int = 1) -> None:
    """--rampup-batch-size START INCR SAMPLES against the global batch and the layout: START
    below it, INCR dividing the difference, and every global batch the run takes on the ramp
    a multiple of --micro-batch-size x the data-parallel size x ``groups`` (the interleaved
    pipeline's PP micro-batches per group; else 1), in one line naming the flag."""
    if not args.rampup_batch_size:
        return
    start, increment, _ = args.rampup_batch_size
    gbs, flag = args.global_batch_size, "option rampup_batch_size (--rampup-batch-size)"
    if start >= gbs:
        raise SetupError(f"{flag}: START {start} is not below --global-batch-size {gbs}, the "
                         "batch the ramp ends at; valid: START < --global-batch-size")
    if (gbs - start) % increment:
        raise SetupError(f"{flag}: INCR {increment} does not divide --global-batch-size {gbs} - "
                         f"START {start} = {gbs - start}; valid: a divisor of {gbs - start}")
    per_step = args.micro_batch_size * dp * groups
    interleaved = (f" x --pipeline-model-parallel-size {groups} (the interleaved pipeline's "
                   "micro-batch groups)" if groups > 1 else "")
    consumed = 0
    for batch in ramp_steps(args):
        if batch % per_step:
            raise SetupError(f"{flag}: the global batch {batch} of the step at sample "
                             f"{consumed} is not divisible by --micro-batch-size "
                             f"{args.micro_batch_size} x data-parallel size {dp}{interleaved} = "
                             f"{per_step}; valid: START and INCR multiples of {per_step}")
        consumed += batch


def batch_calculator(args: TrainArgs, dp: int, rank: int = 0):
    """Megatron-Core's number-of-micro-batches calculator of this run (constant, or the
    --rampup-batch-size ramp): ``update(consumed_samples, consistency_check)``, then ``get()``
    (micro-batches per rank) and ``get_current_global_batch_size()``."""
    from megatron_coe.compat.batch_rampup import num_microbatches_calculator

    return num_microbatches_calculator(args.global_batch_size, args.micro_batch_size, dp,
                                       args.rampup_batch_size or None, rank)


def ramp_steps(args: TrainArgs) -> list:
    """The global batch of each step the run takes on the --rampup-batch-size ramp, walked as
    Megatron-LM's ``update_train_iters`` walks it: a step starts while the consumed samples are
    at most SAMPLES and at most --train-samples."""
    calculator = batch_calculator(args, dp=1)  # the batch sizes do not depend on the layout
    steps, consumed = [], 0
    while consumed <= args.rampup_batch_size[2] and consumed <= args.train_samples:
        calculator.update(consumed, consistency_check=False)
        steps.append(calculator.get_current_global_batch_size())
        consumed += steps[-1]
    return steps


def train_iters_and_samples(args: TrainArgs) -> tuple:
    """(steps, samples they consume) of a --train-samples run. The steps are Megatron-LM's
    (``update_train_iters``): the ramp's, then whole global batches (a partial last one is
    dropped), so a run that ends on the ramp can take a few samples more than --train-samples."""
    gbs = args.global_batch_size
    if not args.rampup_batch_size:
        return args.train_samples // gbs, args.train_samples // gbs * gbs
    steps = ramp_steps(args)
    rest = max(0, args.train_samples - sum(steps)) // gbs
    return len(steps) + rest, sum(steps) + rest * gbs


def _memory_bytes() -> tuple[int, str]:
    """(bytes, what) of the memory one rank's attention lives in: the GPU's, or the machine's RAM
    shared by the ranks of this node."""
    if use_cuda():
        return torch.cuda.get_device_properties(0).total_memory, "GPU memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return ram // local, f"RAM per process ({local} on this machine)"


def check_attention_memory(args: TrainArgs, layout: Layout) -> None:
    """Refuse a ``--seq-length`` whose attention cannot fit (one line, before anything is built).

    The trainer builds a causal mask of seq^2 bytes; the local attention (CPU, or
    ``--transformer-impl local``) also materializes fp32 scores of micro-batch x heads/TP x seq^2
    and keeps about three such tensors (scores, probabilities, their gradient). Flash attention
    (Transformer Engine) needs only the mask.
    """
    s = args.seq_length
    need = s * s
    if precision_plan(args).transformer_impl == "local":
        heads = -(-args.num_attention_heads // layout.tp)
        need += 3 * 4 * args.micro_batch_size * heads * s * s
    have, what = _memory_bytes()
    if need > have:
        raise SetupError(f"--seq-length {s} needs about {need / 2**30:.0f} GiB for the attention "
                         f"of one micro-batch (--micro-batch-size {args.micro_batch_size}, "
                         f"{args.num_attention_heads} heads, seq^2 scores) but the {what} is "
                         f"{have / 2**30:.0f} GiB: lower --seq-length or --micro-batch-size.")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(args: TrainArgs) -> None:
    """``torch.distributed`` from torchrun's environment (or a single local process).

    The default group's collectives (and the rendezvous) time out after
    ``--distributed-timeout-minutes``, as do the TP/PP/EP/DP groups (``parallel.py``).
    """
    if "RANK" not in os.environ:  # plain `python -m megatron_coe.train`: one process
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = args.distributed_backend or ("nccl" if use_cuda() else "gloo")
    if use_cuda():  # LOCAL_RANK modulo the visible devices
        torch.cuda.set_device(precision.local_device_index(
            int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()))
    torch.distributed.init_process_group(
        backend=backend, timeout=datetime.timedelta(minutes=args.distributed_timeout_minutes))


# Rank 0 builds the dataset index caches while the other ranks wait in Megatron-Core's builder
# (a barrier on the default group): on a first run over a large corpus that can take longer
# than --distributed-timeout-minutes (10, as in Megatron-LM).
DATASET_BUILD_TIMEOUT_MINUTES = 120.0


def dataset_build_timeout(args: TrainArgs):
    """The dataset-building phase's timeout: ``DATASET_BUILD_TIMEOUT_MINUTES`` (or
    --distributed-timeout-minutes if longer) for the default group's barrier that the other
    ranks wait in while rank 0 builds the index caches; every other collective keeps
    --distributed-timeout-minutes (``compat.collective_timeout``)."""
    normal = args.distributed_timeout_minutes
    return default_group_timeout(max(normal, DATASET_BUILD_TIMEOUT_MINUTES), normal)


# --------------------------------------------------------------------------- model
def padded_vocab_size(vocab_size: int, args: TrainArgs) -> int:
    multiple = args.make_vocab_size_divisible_by
    if multiple % args.tensor_model_parallel_size:
        raise SetupError(f"--make-vocab-size-divisible-by {multiple} must be a multiple of "
                         f"--tensor-model-parallel-size {args.tensor_model_parallel_size}.")
    return -(-vocab_size // multiple) * multiple


def build_model_config(args: TrainArgs):
    """The CoE ``TransformerConfig`` (MLA subclass with --multi-latent-attention).

    CoE rules raise ``CoEConfigError``; Megatron-Core's own checks (ValueError/AssertionError)
    become ``SetupError`` so that they too reach the user as one line.
    """
    from megatron_coe.config import CoEConfigError

    try:
        return _build_model_config(args)
    except (CoEConfigError, SetupError):
        raise
    except (ValueError, AssertionError) as e:
        raise SetupError(f"invalid model configuration: {e}") from e


def _build_model_config(args: TrainArgs):
    """Architecture from the record (``ModelArch.from_args``), then the non-architecture model
    options (``model=`` in the option table), then the machine's settings."""
    record = ModelArch.from_args(args)
    problems = record.check()
    if problems:
        raise SetupError(problems[0])
    kw = record.to_config_kwargs()
    for name, f in OPTIONS.items():
        target = f.metadata["model"]
        if target:
            kw[name if target is True else target] = getattr(args, name)
    if kw["expert_tensor_parallel_size"] is None:
        kw.pop("expert_tensor_parallel_size")
    kw.update(add_bias_linear=False, variable_seq_lengths=False)
    vpp = virtual_stages(args, args.pipeline_model_parallel_size)
    if vpp > 1:  # Megatron-LM's interleaved defaults: overlapped, unbatched p2p
        kw.update(virtual_pipeline_model_parallel_size=vpp, overlap_p2p_comm=True,
                  batch_p2p_comm=False)
    if args.recompute_modules:  # (options.validate made the granularity selective)
        kw.update(recompute_modules=list(args.recompute_modules))
    # as Megatron-LM: one value for every layer is a string, several are the per-layer list
    types = list(args.cp_comm_type)
    kw.update(cp_comm_type=types[0] if len(types) == 1 else types)
    # dtypes, transformer_impl, grouped GEMM and, for FP8, the recipe + router padding
    kw.update(precision_plan(args).config)
    kw.update(fusion_plan(args).config)  # GPU: Megatron-LM's fusions whose kernels import
    if not use_cuda():  # Megatron-Core's fused kernels and GPU initialisation are CUDA-only
        kw.update(CPU_UNFUSED)
    if args.multi_latent_attention:
        return CoEMLATransformerConfig(**kw)
    return CoETransformerConfig(**kw)


def build_model(args: TrainArgs, config, vocab_size: int, pg_collection) -> list:
    """``[DistributedDataParallel(GPTModel)]``: one chunk, or with an interleaved pipeline one
    per virtual stage (``vp_stage=i``), each in its own DDP (buckets for the first only, as
    Megatron-LM does), all in one optimizer.

    ``pg_collection``: the ``ProcessGroupCollection`` from ``parallel.initialize_parallel``
    (which also seeded the RNGs); the model and all its layers use these groups."""
    from megatron.core.distributed import DistributedDataParallelConfig

    from megatron_coe.models.gpt import build_coe_gpt_model

    install_cpu_compat()
    plan = precision_plan(args)
    vpp = config.virtual_pipeline_model_parallel_size
    chunks = [build_coe_gpt_model(
        config, pg_collection=pg_collection, vocab_size=vocab_size,
        max_sequence_length=args.seq_length, use_transformer_engine=plan.use_transformer_engine,
        vp_stage=stage, **ModelArch.from_args(args).gpt_model_kwargs())
        for stage in (range(vpp) if vpp else [None])]
    if torch.distributed.get_rank() == 0:
        for line in precision.precision_warnings(args):
            print(line, flush=True)
        print(precision.startup_line(args, plan, fusion_plan(args),
                                     built_experts_class(chunks[0])), flush=True)
    # --overlap-grad-reduce: bucketed async reduce-scatter launched during backward (Megatron-Core
    # DDP); --overlap-param-gather: the distributed optimizer's all-gather of updated parameters
    # is dispatched after the step and waited for by forward pre-hooks (the trainer disables the
    # hooks, forcing the gather, around validation and checkpoint saves, as Megatron-LM does);
    # with an interleaved pipeline the schedule dispatches each chunk's gather
    # (align_param_gather, Megatron-LM's default there).
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather, use_distributed_optimizer=True,
        align_param_gather=bool(vpp) and args.overlap_param_gather)
    return [_wrap_chunk(args, config, chunk, ddp_config, plan.bf16, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)]


def _wrap_chunk(args: TrainArgs, config, model, ddp_config, bf16: bool, disable_bucketing: bool):
    """One model chunk on its device, in Float16Module (bf16) and DistributedDataParallel."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    if use_cuda():
        model.cuda(torch.cuda.current_device())
    if bf16:
        model = Float16Module(config, model)
    mark_routed_experts(model)
    with cuda_device_redirect():
        model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model,
                                        disable_bucketing=disable_bucketing)
    if args.overlap_param_gather:
        wait_for_params_of_grouped_experts(model)
    return model


def built_experts_class(model) -> str | None:
    """The class name of the routed experts the model was built with (its first CoE layer's
    ``mlp.experts``), or None without one on this pipeline stage."""
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            return type(module).__name__
    return None


def wait_for_params_of_grouped_experts(ddp) -> None:
    """--overlap-param-gather: DDP's forward pre-hook on each module waits for the all-gather of
    that module's own parameters. ``GroupedSequentialMLP`` reads its experts' weights without
    calling the expert modules, so their hooks never run and a forward could use stale expert
    weights; one pre-hook on the ``GroupedSequentialMLP`` runs DDP's hook for every module below
    it (only while DDP's hooks are enabled: validation and saves disable them after a forced
    gather)."""
    from megatron_coe.transformer.grouped_experts import GroupedSequentialMLP

    ddp_hook = ddp._make_forward_pre_hook()

    def hook(module, *unused):
        if ddp.remove_forward_pre_hook_handles:  # DDP's own hooks are on
            for sub in module.modules():
                ddp_hook(sub)

    for module in ddp.module.modules():
        if isinstance(module, GroupedSequentialMLP):
            module.register_forward_pre_hook(hook)


def mark_routed_experts(model) -> None:
    """Routed-expert parameters: in the optimizer layout Megatron-LM builds.

    Megatron-Core marks them ``param.allreduce = False`` (their own buffers and their own
    distributed optimizer, chained after the dense one) when EP > 1; at EP = 1 they stay with the
    dense parameters, one optimizer, exactly as in Megatron-LM, so the optimizer state of a
    checkpoint crosses between the two trainers. (A checkpoint saved under another EP size, or
    by this trainer before, which kept them apart at EP = 1 too, is regrouped on load:
    ``megatron_lm.regroup_optimizer_state``.) Marked here only where the expert data-parallel
    group is not the data-parallel group although EP = 1 (``--expert-tensor-parallel-size``
    other than the TP size), so that their gradients are reduced over the right group.
    """
    config = unwrap(model).config
    etp = getattr(config, "expert_tensor_parallel_size", None)
    if config.expert_model_parallel_size > 1 or etp in (None, config.tensor_model_parallel_size):
        return
    for name, param in model.named_parameters():
        if _is_routed_expert(name):
            param.allreduce = False


def _is_routed_expert(name: str) -> bool:
    return ".experts." in f".{name}"  # mlp.experts.* (routed), not mlp.shared_experts.*


def count_parameters(model: list) -> dict:
    """Parameters of the whole model, each counted once over all ranks: ``{"total", "routed_experts",
    "local"}``. Collective (every rank calls it).

    A rank counts a parameter unless it is a replica held by another rank too: not
    tensor-parallel and not on (expert-)tensor-parallel rank 0, or the tied output-layer copy of
    the last pipeline stage (``shared``). Dense sums go over the tensor x pipeline group; routed
    experts (by name: ``mlp.experts.*``) over expert-TP x EP x pipeline.
    Data-parallel replicas are in neither group.
    """
    from megatron.core import parallel_state as ps

    dense = experts = local = 0
    for chunk in model:
        for name, p in unwrap(chunk).named_parameters():
            local += p.numel()
            if getattr(p, "shared", False):
                continue
            is_expert = _is_routed_expert(name)
            tp_rank = (ps.get_expert_tensor_parallel_rank() if is_expert
                       else ps.get_tensor_model_parallel_rank())
            if tp_rank and not getattr(p, "tensor_model_parallel", False):
                continue
            if is_expert:
                experts += p.numel()
            else:
                dense += p.numel()
    device = torch.cuda.current_device() if use_cuda() else "cpu"
    sums = torch.tensor([dense, experts], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(sums[:1], group=ps.get_model_parallel_group())
    torch.distributed.all_reduce(sums[1:], group=ps.get_expert_tensor_model_pipeline_parallel_group())
    dense, experts = (int(v) for v in sums.tolist())
    return {"total": dense + experts, "routed_experts": experts, "local": local}


def unwrap(model_chunk):
    """The ``GPTModel`` inside DDP / Float16Module wrappers."""
    while hasattr(model_chunk, "module"):
        model_chunk = model_chunk.module
    return model_chunk


# --------------------------------------------------------------------------- optimizer / LR
def build_optimizer(args: TrainArgs, model: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=precision.uses_bf16(args),
        params_dtype=torch.bfloat16 if precision.uses_bf16(args) else torch.float32,
        use_distributed_optimizer=True)
    with cuda_device_redirect():
        return get_megatron_optimizer(config, model)


def build_scheduler(args: TrainArgs, optimizer):
    """Megatron-Core's scheduler as Megatron-LM builds it
    (``megatron.training.training.get_optimizer_param_scheduler``): in samples, a linear warmup
    from 0, then decay. With --train-iters every length is the iterations times
    --global-batch-size (the trainer steps it by each step's global batch); with --train-samples
    the lengths are the --lr-*-samples options (decay default: --train-samples). A checkpoint's
    ``opt_param_scheduler`` is then the state Megatron-LM's own scheduler keeps, and loads there
    without its mismatch assertions."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_coe.training.options import lr_lengths

    warmup, decay, unit, _, _ = lr_lengths(args)
    if warmup >= decay:
        raise SetupError(f"warmup ({warmup} {unit}) must be shorter than the LR decay ({decay} "
                         f"{unit}): lower --lr-warmup-iters/--lr-warmup-samples/"
                         "--lr-warmup-fraction.")
    if args.train_samples is not None:
        decay_samples, total = decay, args.train_samples
        wsd = args.lr_wsd_decay_samples
        warmup_samples = args.lr_warmup_samples
    else:
        gbs = args.global_batch_size
        decay_samples, total = decay * gbs, args.train_iters * gbs
        wsd = args.lr_wsd_decay_iters * gbs if args.lr_wsd_decay_iters is not None else None
        warmup_samples = args.lr_warmup_iters * gbs
    if args.lr_warmup_fraction is not None:
        warmup_samples = args.lr_warmup_fraction * decay_samples
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=warmup_samples, lr_decay_steps=decay_samples,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=total, wd_incr_style="constant", wsd_decay_steps=wsd,
        lr_wsd_decay_style=args.lr_wsd_decay_style)
