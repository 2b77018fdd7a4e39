"""Numerics and GPU kernels of a run, as options -> model-config fields (pure, CPU-testable).

Every GPU-only choice of the trainer is a pure function of the parsed options and a *probe* of
the machine (``DeviceProbe``, ``KernelProbe``: replaceable in tests), so each can be checked on a
CPU; nothing here builds a model:

* ``resolve_transformer_impl(args, probe)``: the layer implementation. On a CUDA machine the
  Transformer Engine (TE) spec, and a TE that does not import is refused in one line quoting the
  import error (never a silent fall back to the local spec) unless ``--transformer-impl local``
  is given; without CUDA the local spec (``transformer_engine`` refused).
* ``plan_precision(args, te_available)``: dtypes, FP8, grouped GEMM and the layer-spec choice
  (Megatron-Core ``TransformerConfig`` fields).
* ``plan_fusions(args, cuda, impl, kernels)``: Megatron-LM's fused kernels, on by default on a GPU
  where they import, off on CPU (``FusionPlan``: the config fields and, for the start-up line,
  why each one that is off is off).
* ``check_fp8_device`` / ``check_flex_dispatcher`` / ``check_cuda_max_connections``: refusals, each
  one line naming what is missing, before any process group exists.
* ``startup_line(...)``: the line every run prints: transformer impl, experts class, dispatcher,
  precision/recipe, router dtype, fusions in force.

Grouped GEMM (``--moe-grouped-gemm`` / ``--no-moe-grouped-gemm``): on by default whenever the TE
spec is used (routed experts are ``TEGroupedMLP``: one grouped GEMM over all local experts per
CoE pass, instead of ``SequentialMLP``'s Python loop over experts x C passes); Megatron-LM's flag
defaults to off. The local spec (CPU) always builds ``GroupedSequentialMLP`` (torch grouped GEMM,
``SequentialMLP``'s weights) and refuses ``--moe-grouped-gemm``.

FP8 (``--fp8-format e4m3|hybrid``, ``--fp8-recipe``), as Megatron-LM runs it:

* ``fp8=<format>``, ``fp8_recipe=<recipe>``: Transformer Engine's ``fp8_autocast`` around every
  layer (``TransformerBlock`` does it from the config). ``hybrid`` = E4M3 forward, E5M2 gradients.
* bf16 everywhere else: parameters, the pipeline, ``Float16Module``, the optimizer's fp32 main
  params (FP8 is a GEMM input format; TE keeps weights in the params dtype and casts per GEMM),
  so ``--fp8-format`` implies ``--bf16``.
* the Transformer Engine layer spec (``transformer_impl="transformer_engine"``).
* ``moe_router_padding_for_quantization=True`` (0.16.1's name; ``moe_router_padding_for_fp8`` is
  its deprecated alias, which only warns and sets this one): the dispatcher pads each expert's
  token count to the FP8 GEMM alignment (16; 32 for mxfp8) in the routing map, with zero
  probabilities, so ``TEGroupedMLP`` needs no explicit pad/unpad copies. Megatron refuses it
  with the ``allgather`` dispatcher; there ``TEGroupedMLP`` pads itself and the flag stays off.

Default recipe ``tensorwise`` (current scaling), not Megatron-LM's ``delayed``: a CoE layer calls
the same TE modules (experts, and the router with a shared router) C times inside one
``fp8_autocast``. With delayed scaling each module's scale comes from an amax *history* that TE
records per module and reduces once per autocast; TE's ``fp8_autocast`` docstring calls calling
one module several times inside one autocast unsupported with amax reduction, and whether the
recorded amax is the max over the C passes has never been checked on hardware. Current scaling
computes each GEMM input's scale from that tensor itself, every call, so a module called C times
needs no shared state between the calls: the question does not arise. ``--fp8-recipe delayed``
stays selectable; with C > 1 the run prints one warning line (``precision_warnings``).

Parameters stay bf16 (no ``fp8_param``: the distributed optimizer's fp8-param gather and its
checkpoint format are not wired up here).

Router dtype: ``--moe-router-dtype fp32|fp64`` (Megatron-LM's flag and default: unset = the params
dtype) computes router logits, routing probabilities and the weighted sum of expert outputs in
that dtype. CPU runs are fp32 throughout, so the router is fp32 there; a bf16 GPU run routes in
bf16 unless the flag is given (the paper presets give ``fp32``, as Megatron's MoE guide
recommends for many experts).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron_coe.training.errors import SetupError
from megatron_coe.training.options import TrainArgs, flag_name

# Lowest compute capability per recipe (Transformer Engine 2.x): FP8 tensor cores arrived with
# Ada (8.9) and Hopper (9.0); block scaling is Hopper-class; MXFP8 is Blackwell (10.0) only.
FP8_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0),
                      "mxfp8": (10, 0)}
MIN_TE_VERSION_FP8 = "2.1.0"  # FP8 grouped GEMM
PADDING_DISPATCHERS = ("alltoall", "flex")
TE = "transformer_engine"


class PrecisionError(SetupError):
    """FP8/bf16/TE/kernels requested where they cannot run; the message says what is missing."""


@dataclass(frozen=True)
class PrecisionPlan:
    """What the options mean for the model config and the layer spec."""

    transformer_impl: str            # "local" | "transformer_engine"
    bf16: bool                       # bf16 params / Float16Module / optimizer
    config: dict = field(default_factory=dict)  # TransformerConfig kwargs

    @property
    def use_transformer_engine(self) -> bool:
        return self.transformer_impl == TE

    @property
    def experts(self) -> str:
        """The routed-experts class the layer spec builds (``models/specs.py``)."""
        return experts_class(self.transformer_impl, self.config.get("moe_grouped_gemm", False))


def experts_class(transformer_impl: str, grouped_gemm: bool) -> str:
    """``TEGroupedMLP`` (TE spec, grouped GEMM), ``SequentialMLP`` (TE spec without it: TE
    linears, a loop over experts) or ``GroupedSequentialMLP`` (the local spec, always)."""
    if transformer_impl == TE:
        return "TEGroupedMLP" if grouped_gemm else "SequentialMLP"
    return "GroupedSequentialMLP"


def uses_bf16(args: TrainArgs) -> bool:
    """--bf16, or implied by --fp8-format (FP8 training keeps bf16 parameters)."""
    return bool(args.bf16 or args.fp8_format)


def plan_precision(args: TrainArgs, te_available: bool) -> PrecisionPlan:
    """Pure mapping of the precision options (``te_available``: the TE spec is this machine's
    default, i.e. a CUDA machine, whose TE ``resolve_transformer_impl`` has checked).

    Whether FP8 can actually run here is ``check_fp8_device``'s job.
    """
    import torch

    impl = args.transformer_impl or (TE if te_available else "local")
    bf16 = uses_bf16(args)
    dtype = torch.bfloat16 if bf16 else torch.float32
    if args.fp8_format:
        if args.transformer_impl == "local":
            raise PrecisionError(
                "--fp8-format needs the Transformer Engine layers (FP8 GEMMs are TE modules): "
                "drop --transformer-impl local or use --transformer-impl transformer_engine.")
        impl = TE
    grouped = impl == TE if args.moe_grouped_gemm is None else bool(args.moe_grouped_gemm)
    if grouped and impl != TE:
        raise PrecisionError(
            "--moe-grouped-gemm needs the Transformer Engine layers (TEGroupedMLP); the local "
            "layers always use GroupedSequentialMLP (torch grouped GEMM): drop "
            "--moe-grouped-gemm or use --transformer-impl transformer_engine on a GPU.")
    config = dict(bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype, transformer_impl=impl,
                  moe_grouped_gemm=grouped)
    if args.fp8_format:
        config.update(
            fp8=args.fp8_format, fp8_recipe=args.fp8_recipe,
            moe_router_padding_for_quantization=args.moe_token_dispatcher_type
            in PADDING_DISPATCHERS)
    return PrecisionPlan(transformer_impl=impl, bf16=bf16, config=config)


def precision_warnings(args: TrainArgs) -> list:
    """Lines to print once at start-up (rank 0): choices that run but are unverified."""
    out = []
    if args.fp8_format and args.fp8_recipe == "delayed" and args.coe_iterations > 1:
        out.append(
            f"warning: --fp8-recipe delayed with --coe-iterations {args.coe_iterations}: the "
            "same TE modules run once per CoE pass inside one fp8_autocast, which Transformer "
            "Engine documents as unsupported with amax reduction and is unverified on hardware; "
            "--fp8-recipe tensorwise (the default) avoids it.")
    return out


# --------------------------------------------------------------------------- transformer impl
def resolve_transformer_impl(args: TrainArgs, probe: Optional["DeviceProbe"] = None) -> str:
    """``local`` or ``transformer_engine`` for this machine, or ``PrecisionError`` (one line).

    CUDA: TE unless ``--transformer-impl local``; a TE that does not import is refused with the
    import error's text (it never falls back to the local spec silently). No CUDA: local;
    ``--transformer-impl transformer_engine`` is refused.
    """
    probe = probe or DeviceProbe.this_machine()
    if args.transformer_impl == "local":
        return "local"
    if not probe.cuda():
        if args.transformer_impl == TE:
            raise PrecisionError("--transformer-impl transformer_engine needs a CUDA GPU; use "
                                 "--transformer-impl local on CPU.")
        return "local"
    error = probe.te_error()
    if error is not None:
        raise PrecisionError(
            f"Transformer Engine does not import on this CUDA machine ({error}): fix the "
            "install (a TE built for this torch: the NVIDIA PyTorch container's own, see "
            "docs/parallelism-and-gpu.md, GPU install) or run without it with "
            "--transformer-impl local.")
    return TE


def check_context_parallel(args: TrainArgs, impl: str, cuda: bool) -> None:
    """``--context-parallel-size`` > 1 only with Transformer Engine's attention (``impl``, as
    ``resolve_transformer_impl`` chose it): Megatron-Core's local ``DotProductAttention`` has no
    context parallelism (it asserts CP == 1). Refused in one line, never run with CP silently
    dropped."""
    cp = args.context_parallel_size
    if cp == 1 or impl == TE:
        return
    fix = ("drop --transformer-impl local" if cuda else
           "this machine has no CUDA GPU; use --context-parallel-size 1 on CPU")
    raise PrecisionError(f"--context-parallel-size {cp} needs Transformer Engine's attention "
                         "(Megatron-Core's local attention has no context parallelism): "
                         f"{fix}.")


# --------------------------------------------------------------------------- fusions
# (config field, command-line option that turns it off or on, short name in the start-up line)
FUSIONS = (
    ("bias_activation_fusion", "bias_swiglu_fusion", "bias_swiglu"),
    ("masked_softmax_fusion", "masked_softmax_fusion", "masked_softmax"),
    ("bias_dropout_fusion", "bias_dropout_fusion", "bias_dropout"),
    ("apply_rope_fusion", "apply_rope_fusion", "rope"),
    ("gradient_accumulation_fusion", "gradient_accumulation_fusion", "grad_accum"),
    ("moe_permute_fusion", "moe_permute_fusion", "moe_permute"),
    ("moe_router_fusion", "moe_router_fusion", "moe_router"),
)
# off unless asked for (Megatron-LM's store_true flags)
OPT_IN = ("moe_router_fusion",)
# an explicit request (True, not the default) that cannot run here is refused in one line
REQUESTABLE = ("moe_permute_fusion", "moe_router_fusion")


def _import_error(module: str, *names: str) -> Optional[str]:
    """None when ``module`` imports and has every one of ``names`` not None; else why not."""
    try:
        mod = importlib.import_module(module)
    except Exception as e:
        return f"{type(e).__name__}: {' '.join(str(e).split())}"
    missing = [n for n in names if getattr(mod, n, None) is None]
    return f"{module} has no {', '.join(missing)}" if missing else None


@dataclass
class KernelProbe:
    """Whether each fused kernel can be used here: one callable per fusion, returning None (it
    imports) or why not. ``this_machine()`` tries the imports Megatron-Core itself does;
    tests pass stand-ins."""

    bias_activation: Callable[[], Optional[str]]
    masked_softmax: Callable[[], Optional[str]]
    bias_dropout: Callable[[], Optional[str]]
    rope: Callable[[bool], Optional[str]]              # argument: multi-latent attention
    gradient_accumulation: Callable[[], Optional[str]]
    moe_permute: Callable[[], Optional[str]]
    moe_router: Callable[[], Optional[str]]

    @classmethod
    def this_machine(cls) -> "KernelProbe":
        def rope(mla: bool) -> Optional[str]:
            if mla:  # Megatron-Core's triton kernels for MLA with YaRN
                return _import_error("megatron.core.fusions.fused_mla_yarn_rope_apply",
                                     "fused_apply_mla_rope_for_q", "fused_apply_mla_rope_for_kv")
            return _import_error("megatron.core.models.common.embeddings.rope_utils",
                                 "fused_apply_rotary_pos_emb")  # TE >= 1.4

        def softmax() -> Optional[str]:
            return (_import_error("scaled_upper_triang_masked_softmax_cuda")
                    or _import_error("scaled_masked_softmax_cuda"))

        moe_utils = "megatron.core.transformer.moe.moe_utils"
        return cls(
            bias_activation=lambda: _import_error("megatron.core.fusions.fused_bias_swiglu",
                                                  "bias_swiglu_impl"),
            masked_softmax=softmax,
            bias_dropout=lambda: _import_error("megatron.core.fusions.fused_bias_dropout",
                                               "get_bias_dropout_add"),
            rope=rope,
            gradient_accumulation=lambda: _import_error("fused_weight_gradient_mlp_cuda"),
            moe_permute=lambda: _import_error(  # TE >= 2.1
                moe_utils, "fused_permute", "fused_permute_with_probs", "fused_unpermute",
                "fused_sort_chunks_by_index", "fused_sort_chunks_by_index_with_probs"),
            moe_router=lambda: _import_error(moe_utils, "fused_topk_with_score_function"),
        )


@dataclass(frozen=True)
class FusionPlan:
    """The fusion fields of the model config, and why each one that is off is off."""

    config: dict
    off: dict  # short name -> reason

    def describe(self) -> str:
        on = [short for f, _, short in FUSIONS if self.config.get(f)]
        if not on and len(set(self.off.values())) == 1:
            return f"none ({next(iter(self.off.values()))})"
        text = ", ".join(on) if on else "none"
        if self.off:
            text += " (off: " + ", ".join(f"{short}: {self.off[short]}" for _, _, short
                                          in FUSIONS if short in self.off) + ")"
        return text


def plan_fusions(args: TrainArgs, cuda: bool, impl: str,
                 kernels: Optional[KernelProbe] = None) -> FusionPlan:
    """Megatron-LM's fused kernels for this run (pure given ``kernels``).

    CPU: all off (Megatron-Core's fused kernels are CUDA-only). GPU: each one on unless its flag
    turns it off (``--no-bias-swiglu-fusion``, ``--no-masked-softmax-fusion``,
    ``--no-bias-dropout-fusion``, ``--no-rope-fusion``, ``--no-gradient-accumulation-fusion``,
    ``--no-moe-permute-fusion``), the model has nothing for it to fuse, or its kernel does not
    import (``kernels``); ``--moe-router-fusion`` is opt-in (as in Megatron-LM) and refused
    where its kernel is missing.
    """
    config = {f: False for f, _, _ in FUSIONS}
    off = {}
    for f, option, short in FUSIONS:
        wanted = getattr(args, option)
        if not cuda:
            if wanted is True and f in REQUESTABLE:
                raise PrecisionError(f"{flag_name(option)} needs a CUDA GPU with Transformer "
                                     "Engine; drop it on CPU.")
            off[short] = "CPU"
        elif wanted is False:
            off[short] = "opt-in" if f in OPT_IN else "--no-" + flag_name(option)[2:]
    if not cuda:
        return FusionPlan(config, off)
    kernels = kernels or KernelProbe.this_machine()
    mla = bool(args.multi_latent_attention)
    checks = {  # field -> (why the model has nothing to fuse, or None; kernel probe)
        "bias_activation_fusion": (None if args.swiglu else "GeLU without bias",
                                   kernels.bias_activation),
        "masked_softmax_fusion": ("TE attention" if impl == TE else None, kernels.masked_softmax),
        "bias_dropout_fusion": (None, kernels.bias_dropout),
        "apply_rope_fusion": ("MLA fuses only YaRN RoPE" if mla and
                              args.position_embedding_type != "yarn" else None,
                              lambda: kernels.rope(mla)),
        "gradient_accumulation_fusion": (None, kernels.gradient_accumulation),
        "moe_permute_fusion": (None, kernels.moe_permute),
        "moe_router_fusion": (None, kernels.moe_router),
    }
    for f, option, short in FUSIONS:
        if short in off:
            continue
        wanted = getattr(args, option)
        not_applicable, probe = checks[f]
        if not_applicable:
            off[short] = not_applicable
            continue
        missing = probe()
        if missing:
            if wanted is True and f in REQUESTABLE:
                raise PrecisionError(f"{flag_name(option)}: its kernel does not import here "
                                     f"({missing}); drop the flag or install a Transformer "
                                     "Engine that has it.")
            off[short] = f"no kernel: {missing}"
            continue
        config[f] = True
    return FusionPlan(config, off)


# --------------------------------------------------------------------------- start-up line
def precision_name(args: TrainArgs) -> str:
    if args.fp8_format:
        return f"bf16 + fp8 {args.fp8_format} (recipe {args.fp8_recipe})"
    return "bf16" if uses_bf16(args) else "fp32"


def startup_line(args: TrainArgs, plan: PrecisionPlan, fusions: FusionPlan,
                 experts: Optional[str] = None) -> str:
    """``start-up: transformer-impl I | experts E | dispatcher D | precision P | router dtype R
    | fusions F`` (``experts``: the class actually built; default: the plan's)."""
    router = args.moe_router_dtype or f"{'bf16' if plan.bf16 else 'fp32'} (params dtype)"
    return (f"start-up: transformer-impl {plan.transformer_impl} | experts "
            f"{experts or plan.experts} | dispatcher {args.moe_token_dispatcher_type} | "
            f"precision {precision_name(args)} | router dtype {router} | fusions "
            f"{fusions.describe()}")


# --------------------------------------------------------------------------- device check
def local_device_index(local_rank: int, device_count: int) -> int:
    """The GPU of local rank ``local_rank`` among ``device_count`` visible ones (``LOCAL_RANK``
    modulo the count: a launcher that starts more ranks per node than ``CUDA_VISIBLE_DEVICES``
    lists, or one visible device per rank, still gets a valid device)."""
    if device_count < 1:
        raise PrecisionError("no CUDA device is visible (CUDA_VISIBLE_DEVICES?)")
    return local_rank % device_count


def _device_index() -> int:
    import torch

    return local_device_index(int(os.environ.get("LOCAL_RANK", "0")),
                              max(torch.cuda.device_count(), 1))


def _deep_ep_error(backend: str) -> Optional[str]:
    """Why the flex dispatcher's backend does not import (Megatron-Core's own imports)."""
    if backend == "hybridep":
        return _import_error("deep_ep", "HybridEPBuffer")
    return _import_error("deep_ep", "Buffer")


def _te_support(recipe: str) -> Optional[tuple[bool, str]]:
    """Transformer Engine's own verdict for ``recipe`` on this GPU, when it offers one."""
    names = {"mxfp8": "check_mxfp8_support", "blockwise": "check_fp8_block_scaling_support"}
    name = names.get(recipe, "check_fp8_support")
    import importlib

    for module in ("transformer_engine.pytorch.quantization", "transformer_engine.pytorch.fp8"):
        try:
            check = getattr(importlib.import_module(module), name, None)
        except Exception:
            continue
        if check is not None:
            try:
                ok, reason = check()
            except Exception:
                return None
            return bool(ok), str(reason)
    return None


def _te_version() -> Optional[str]:
    try:
        from importlib.metadata import version

        return version("transformer-engine")
    except Exception:
        try:
            import transformer_engine

            return str(transformer_engine.__version__)
        except Exception:
            return None


def _version_tuple(v: str) -> tuple:
    out = []
    for part in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


@dataclass
class DeviceProbe:
    """How ``check_fp8_device`` looks at the machine (replaceable in tests)."""

    cuda: Callable[[], bool]
    have_te: Callable[[], bool]
    capability: Callable[[], tuple]
    device_name: Callable[[], str]
    te_version: Callable[[], Optional[str]] = _te_version
    te_support: Callable[[str], Optional[tuple]] = _te_support
    # the import error of transformer_engine.pytorch, or None (default: from have_te)
    te_import_error: Optional[Callable[[], Optional[str]]] = None
    # why DeepEP backend ``deepep`` / ``hybridep`` does not import, or None
    deep_ep: Callable[[str], Optional[str]] = lambda backend: _deep_ep_error(backend)

    def te_error(self) -> Optional[str]:
        if self.te_import_error is not None:
            return self.te_import_error()
        return None if self.have_te() else "transformer_engine.pytorch is not importable"

    @classmethod
    def this_machine(cls) -> "DeviceProbe":
        import torch

        from megatron_coe.compat.te_absent import transformer_engine_import_error

        return cls(cuda=torch.cuda.is_available,
                   have_te=lambda: transformer_engine_import_error() is None,
                   te_import_error=transformer_engine_import_error,
                   capability=lambda: torch.cuda.get_device_capability(_device_index()),
                   device_name=lambda: torch.cuda.get_device_name(_device_index()))


def check_fp8_device(args: TrainArgs, probe: Optional[DeviceProbe] = None) -> None:
    """Refuse ``--fp8-format`` unless a CUDA GPU of the recipe's class and TE are present."""
    if not args.fp8_format:
        return
    probe = probe or DeviceProbe.this_machine()
    what = f"--fp8-format {args.fp8_format} (recipe {args.fp8_recipe})"
    if not probe.cuda():
        raise PrecisionError(
            f"{what} needs a CUDA GPU with Transformer Engine; this machine has no CUDA device. "
            "Drop --fp8-format for CPU runs.")
    if probe.te_error() is not None:
        raise PrecisionError(
            f"{what} needs Transformer Engine, which is not importable here "
            f"({probe.te_error()}): install it (the NVIDIA PyTorch container's own; see "
            "docs/parallelism-and-gpu.md, GPU install) or drop --fp8-format.")
    need = FP8_MIN_CAPABILITY[args.fp8_recipe]
    have = tuple(probe.capability())
    if have < need:
        gpu_class = {(8, 9): "Ada/Hopper (compute capability >= 8.9)",
                     (9, 0): "Hopper (compute capability >= 9.0)",
                     (10, 0): "Blackwell (compute capability >= 10.0)"}[need]
        hint = (" Use --fp8-recipe delayed or tensorwise on Hopper." if args.fp8_recipe == "mxfp8"
                else " Train in bf16 (--bf16, no --fp8-format) on this GPU.")
        raise PrecisionError(
            f"{what} needs a {gpu_class} GPU; this one is {probe.device_name()} with compute "
            f"capability {have[0]}.{have[1]}.{hint}")
    version = probe.te_version()
    if version and _version_tuple(version) < _version_tuple(MIN_TE_VERSION_FP8):
        raise PrecisionError(
            f"{what} with MoE/CoE layers needs Transformer Engine >= {MIN_TE_VERSION_FP8} "
            f"(FP8 grouped GEMM, fused token permutation); found {version}.")
    verdict = probe.te_support(args.fp8_recipe)
    if verdict is not None and not verdict[0]:
        raise PrecisionError(f"{what}: Transformer Engine reports it unsupported on "
                             f"{probe.device_name()}: {verdict[1]}")


# --------------------------------------------------------------------------- launch checks
FLEX_INSTALL = ("install DeepEP (https://github.com/deepseek-ai/DeepEP, built against this "
                "torch and CUDA with NVSHMEM; HybridEP is DeepEP's hybrid-ep branch)")


def check_flex_dispatcher(args: TrainArgs, probe: Optional[DeviceProbe] = None) -> None:
    """``--moe-token-dispatcher-type flex`` runs on DeepEP or HybridEP (``deep_ep``): refused in
    one line, on every machine, unless the chosen backend imports."""
    if args.moe_token_dispatcher_type != "flex":
        return
    probe = probe or DeviceProbe.this_machine()
    backend = args.moe_flex_dispatcher_backend
    error = probe.deep_ep(backend)
    if error is not None:
        name = "HybridEP" if backend == "hybridep" else "DeepEP"
        raise PrecisionError(
            f"--moe-token-dispatcher-type flex (--moe-flex-dispatcher-backend {backend}) needs "
            f"{name}, which does not import here ({error}): {FLEX_INSTALL}, or use "
            "--moe-token-dispatcher-type alltoall.")


def check_cuda_max_connections(args: TrainArgs, env_value: Optional[str],
                               capability: tuple) -> None:
    """Megatron-LM's rule: before Blackwell (compute capability < 10), tensor parallelism needs
    ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (one hardware queue, so the TP communication kernels are
    scheduled in issue order and overlap with compute). The trainer sets it to 1 before torch
    is imported unless the environment already has a value; a different value with TP > 1 is
    refused here (before any process group or CUDA context)."""
    if args.tensor_model_parallel_size > 1 and tuple(capability) < (10, 0) and env_value != "1":
        raise PrecisionError(
            f"--tensor-model-parallel-size {args.tensor_model_parallel_size} on a GPU of "
            f"compute capability {capability[0]}.{capability[1]} needs "
            f"CUDA_DEVICE_MAX_CONNECTIONS=1 (found {env_value!r}): unset it (the trainer sets "
            "1) or export CUDA_DEVICE_MAX_CONNECTIONS=1.")
