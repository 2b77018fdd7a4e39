"""Numerics of a run: fp32 / bf16 / FP8 (Transformer Engine), as options -> model-config fields.

``plan_precision(args, te_available)`` is a pure function: it maps the parsed options onto the
Megatron-Core 0.16.1 ``TransformerConfig`` fields and the layer-spec choice, and builds nothing,
so the FP8 mapping can be checked on a CPU. ``check_fp8_device(args)`` runs before any process
group or model exists and refuses FP8 with a message naming what is missing (a CUDA device,
Transformer Engine, or a GPU new enough for the recipe).

FP8 (``--fp8-format e4m3|hybrid``, ``--fp8-recipe``), as Megatron-LM runs it:

* ``fp8=<format>``, ``fp8_recipe=<recipe>``: Transformer Engine's ``fp8_autocast`` around every
  layer (``TransformerBlock`` does it from the config). ``hybrid`` = E4M3 forward, E5M2 gradients.
* bf16 everywhere else: parameters, the pipeline, ``Float16Module``, the optimizer's fp32 main
  params (FP8 is a GEMM input format; TE keeps weights in the params dtype and casts per GEMM),
  so ``--fp8-format`` implies ``--bf16``.
* the Transformer Engine layer spec (``transformer_impl="transformer_engine"``): TE linears and
  attention; routed experts as ``TEGroupedMLP`` (``moe_grouped_gemm=True``), one grouped FP8 GEMM
  over all local experts per CoE pass.
* ``moe_router_padding_for_quantization=True`` (0.16.1's name; ``moe_router_padding_for_fp8`` is
  its deprecated alias, which only warns and sets this one): the dispatcher pads each expert's
  token count to the FP8 GEMM alignment (16; 32 for mxfp8) in the routing map, with zero
  probabilities, so ``TEGroupedMLP`` needs no explicit pad/unpad copies. Megatron refuses it
  with the ``allgather`` dispatcher; there ``TEGroupedMLP`` pads itself and the flag stays off.
* ``moe_permute_fusion=True``: TE's fused token permutation (TE >= 2.1; requirements-gpu.txt
  pins 2.8).

Parameters stay bf16 (no ``fp8_param``: the distributed optimizer's fp8-param gather and its
checkpoint format are not wired up here).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron_coe.training.errors import SetupError
from megatron_coe.training.options import TrainArgs

# Lowest compute capability per recipe (Transformer Engine 2.x): FP8 tensor cores arrived with
# Ada (8.9) and Hopper (9.0); block scaling is Hopper-class; MXFP8 is Blackwell (10.0) only.
FP8_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0),
                      "mxfp8": (10, 0)}
MIN_TE_VERSION_FP8 = "2.1.0"  # fused permutation (moe_permute_fusion) and FP8 grouped GEMM
PADDING_DISPATCHERS = ("alltoall", "flex")


class PrecisionError(SetupError):
    """FP8/bf16 requested where it cannot run; the message says what is missing."""


@dataclass(frozen=True)
class PrecisionPlan:
    """What the options mean for the model config and the layer spec."""

    transformer_impl: str            # "local" | "transformer_engine"
    bf16: bool                       # bf16 params / Float16Module / optimizer
    config: dict = field(default_factory=dict)  # TransformerConfig kwargs

    @property
    def use_transformer_engine(self) -> bool:
        return self.transformer_impl == "transformer_engine"


def uses_bf16(args: TrainArgs) -> bool:
    """--bf16, or implied by --fp8-format (FP8 training keeps bf16 parameters)."""
    return bool(args.bf16 or args.fp8_format)


def plan_precision(args: TrainArgs, te_available: bool) -> PrecisionPlan:
    """Pure mapping of the precision options (``te_available``: CUDA and TE importable).

    ``te_available`` only picks the default implementation (TE on a GPU with TE, else local);
    whether FP8 can actually run here is ``check_fp8_device``'s job.
    """
    import torch

    impl = args.transformer_impl or ("transformer_engine" if te_available else "local")
    bf16 = uses_bf16(args)
    dtype = torch.bfloat16 if bf16 else torch.float32
    config = dict(bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype, transformer_impl=impl)
    if args.fp8_format:
        if args.transformer_impl == "local":
            raise PrecisionError(
                "--fp8-format needs the Transformer Engine layers (FP8 GEMMs are TE modules): "
                "drop --transformer-impl local or use --transformer-impl transformer_engine.")
        impl = "transformer_engine"
        config.update(
            transformer_impl=impl, fp8=args.fp8_format, fp8_recipe=args.fp8_recipe,
            moe_grouped_gemm=True, moe_permute_fusion=True,
            moe_router_padding_for_quantization=args.moe_token_dispatcher_type
            in PADDING_DISPATCHERS)
    return PrecisionPlan(transformer_impl=impl, bf16=bf16, config=config)


# --------------------------------------------------------------------------- device check
def _device_index() -> int:
    import torch

    count = torch.cuda.device_count()
    return int(os.environ.get("LOCAL_RANK", "0")) % max(count, 1)


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

    @classmethod
    def this_machine(cls) -> "DeviceProbe":
        import torch

        from megatron_coe.compat import have_transformer_engine

        return cls(cuda=torch.cuda.is_available, have_te=have_transformer_engine,
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
    if not probe.have_te():
        raise PrecisionError(
            f"{what} needs Transformer Engine, which is not importable here: install it "
            "(requirements-gpu.txt, or use an NVIDIA PyTorch container) or drop --fp8-format.")
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
