"""Chain-of-Experts configuration: Megatron-Core's ``TransformerConfig`` plus the CoE fields.

This module owns every CoE option and its validation. The fields follow Megatron's style
(one documented dataclass field each); ``__post_init__`` checks the CoE-specific rules once,
with messages that name the field to change, and then defers to Megatron-Core's own checks.

Two concrete classes exist because Megatron-Core keeps MLA options in a subclass:
``CoETransformerConfig`` (standard attention) and ``CoEMLATransformerConfig`` (DeepSeek-V2 MLA).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_coe.arch import default_of, moe_layer_pattern, parse_moe_layer_freq
from megatron_coe.compat import require_transformer_engine
from megatron_coe.compat.transformer_config import cuda_graph_capture_modules, cuda_graph_field


# Megatron-Core's fusion switches (all off by default there, on by default in Megatron-LM except
# the two MoE ones): on a GPU the trainer turns on those whose kernels import
# (``training/precision.plan_fusions``, one command-line switch each).
FUSION_FIELDS = ("bias_activation_fusion", "masked_softmax_fusion", "bias_dropout_fusion",
                 "apply_rope_fusion", "gradient_accumulation_fusion", "moe_permute_fusion",
                 "moe_router_fusion")

# Megatron-Core's fused kernels (and its default GPU initialisation) are CUDA-only: the config
# fields that keep a model on its unfused CPU paths (the trainer without CUDA; every import).
# gradient_accumulation_fusion (a ModelParallelConfig field) is set beside it by each user.
CPU_UNFUSED = dict(use_cpu_initialization=True, persist_layer_norm=False,
                   **{name: False for name in FUSION_FIELDS
                      if name != "gradient_accumulation_fusion"})


class CoEConfigError(ValueError):
    """A CoE configuration that cannot run; the message says which field to change."""


@dataclass
class CoEConfigMixin:
    """CoE fields, mixed into a Megatron-Core ``TransformerConfig``.

    With ``x0 = LN(h)``, a CoE layer computes, for t in 1..C::

        x_t = I_inner * x_{t-1} + sum_i g_{t,i} E_i(x_{t-1}) + S(x_{t-1})
        y   = x_C + I_outer * h

    ``moe_router_topk`` is the top-k of each pass (C * topk experts per token in all).
    Megatron's ``moe_layer_freq`` (``--moe-layer-freq``: an int N or a 0/1 list) chooses which
    layers are CoE layers; the others are dense MLPs of ``ffn_hidden_size`` (DeepSeek's
    ``first_k_dense_replace``), checked by ``_validate_moe_layer_freq``.

    The fields' defaults are the architecture record's (``megatron_coe.arch.ModelArch``), where
    each architecture field is declared once.
    """

    coe_iterations: int = default_of("coe_iterations")
    """C: number of chained routing passes inside one CoE layer (>= 1)."""

    coe_inner_residual: bool = default_of("coe_inner_residual")
    """Add x_{t-1} to the output of pass t (the paper's default: on)."""

    coe_outer_residual: bool = default_of("coe_outer_residual")
    """Add the layer's residual stream h to x_C (paper default: off; Megatron's standard MoE: on)."""

    coe_shared_router: bool = default_of("coe_shared_router")
    """Ablation: one router module shared by all passes instead of one independent router per pass."""

    coe_router_init_method: str = "normal"
    """Initialisation of the routers' weights: ``normal`` (Megatron's ``init_method``, N(0,
    ``init_method_std``)) or ``kaiming_uniform`` (``torch.nn.Linear``'s default, U(+-1/sqrt(hidden)):
    the paper's published HF code). Initialisation only: the function and the checkpoint keys are
    the same."""

    def __post_init__(self):
        validate_coe_config(self)
        super().__post_init__()  # Megatron-Core's own checks


# Megatron features that assume a single route/dispatch/combine per layer. Each entry:
# (predicate on the config, field to change, why).
_SINGLE_PASS_FEATURES = (
    (
        lambda c: bool(getattr(c, "overlap_moe_expert_parallel_comm", False)),
        "overlap_moe_expert_parallel_comm",
        "its schedule splits one MoE forward into single dispatch/combine stages",
    ),
    (
        lambda c: bool(getattr(c, "delay_wgrad_compute", False)),
        "delay_wgrad_compute",
        "expert weight gradients are delayed per layer, but CoE reuses the experts in every pass",
    ),
    (
        lambda c: bool(getattr(c, "moe_enable_routing_replay", False)),
        "moe_enable_routing_replay",
        "routing replay records one routing decision per layer",
    ),
)

_PARTIAL_CUDA_GRAPH_MODULES = {"moe", "moe_router", "moe_preprocess"}


def _partial_moe_cuda_graph_modules(config) -> list[str]:
    """MoE parts that per-layer CUDA graphs would capture separately (``cuda_graph_scope`` before
    Megatron-Core 0.18, ``cuda_graph_modules`` from 0.18: ``compat.transformer_config``)."""
    if getattr(config, "cuda_graph_impl", "none") in (None, "none"):
        return []
    return [n for n in cuda_graph_capture_modules(config) if n in _PARTIAL_CUDA_GRAPH_MODULES]


def validate_coe_config(config) -> None:
    """Check the CoE rules; raise ``CoEConfigError`` naming the field to change."""
    c = config
    if not isinstance(c.coe_iterations, int) or c.coe_iterations < 1:
        raise CoEConfigError(
            f"coe_iterations (--coe-iterations) must be an integer >= 1, got {c.coe_iterations!r}. "
            "Use 1 for a standard MoE layer, 2 for the paper's CoE-2."
        )
    if not c.num_moe_experts:
        raise CoEConfigError(
            "num_moe_experts (--num-experts) must be set: a CoE layer routes over routed experts."
        )
    if c.moe_router_topk < 1 or c.moe_router_topk > c.num_moe_experts:
        raise CoEConfigError(
            f"moe_router_topk (--moe-router-topk) is the top-k of each CoE pass and must be in "
            f"[1, num_moe_experts={c.num_moe_experts}], got {c.moe_router_topk}."
        )
    ep = c.expert_model_parallel_size
    if c.num_moe_experts % ep != 0:
        raise CoEConfigError(
            f"num_moe_experts={c.num_moe_experts} is not divisible by expert_model_parallel_size="
            f"{ep} (--expert-model-parallel-size): choose an EP size that divides the expert count."
        )
    _validate_moe_layer_freq(c)
    if not c.coe_inner_residual and not c.coe_outer_residual:
        raise CoEConfigError(
            "coe_inner_residual and coe_outer_residual are both off: the layer would drop the "
            "residual stream. Enable --coe-inner-residual (paper default) or --coe-outer-residual."
        )
    if c.coe_iterations > 1:
        for predicate, field_name, why in _SINGLE_PASS_FEATURES:
            if predicate(c):
                raise CoEConfigError(
                    f"{field_name} is not supported with coe_iterations={c.coe_iterations}: {why}. "
                    f"Disable {field_name} or set coe_iterations=1."
                )
        modules = _partial_moe_cuda_graph_modules(c)
        if modules:
            field_name = cuda_graph_field()
            raise CoEConfigError(
                f"{field_name}={modules} captures part of a MoE layer, which assumes one routing "
                f"pass; with coe_iterations={c.coe_iterations} capture whole layers ({field_name} "
                "'attn' or empty) or disable CUDA graphs (cuda_graph_impl='none')."
            )
    if c.fp8 or c.fp4:
        require_transformer_engine(f"{'FP8' if c.fp8 else 'FP4'} training (--fp8-format)")
    if c.coe_shared_router and c.coe_iterations == 1:
        raise CoEConfigError(
            "coe_shared_router only makes sense with coe_iterations > 1 (there is one pass)."
        )


def _validate_moe_layer_freq(c) -> None:
    """``moe_layer_freq`` (Megatron's field; ``--moe-layer-freq``): which layers are CoE layers,
    the others dense MLPs of ``ffn_hidden_size``. An int N >= 1 or a 0/1 list of ``num_layers``
    entries with at least one CoE layer; a list is normalised to a list of ints."""
    freq = getattr(c, "moe_layer_freq", 1)
    try:
        freq = parse_moe_layer_freq(freq)
    except ValueError as e:
        raise CoEConfigError(f"moe_layer_freq (--moe-layer-freq): {e}.") from None
    if isinstance(freq, list) and len(freq) != c.num_layers:
        raise CoEConfigError(
            f"moe_layer_freq (--moe-layer-freq) has {len(freq)} entries for num_layers="
            f"{c.num_layers}: give one entry per layer (0 dense MLP, 1 CoE layer).")
    if 1 not in moe_layer_pattern(freq, c.num_layers):
        raise CoEConfigError(
            f"moe_layer_freq (--moe-layer-freq) {freq} makes no layer a CoE layer: mark at least "
            "one layer 1.")
    c.moe_layer_freq = freq


def is_moe_layer(config, layer_index: int) -> bool:
    """Whether global layer ``layer_index`` (0-based) of ``config`` is a CoE/MoE layer."""
    return bool(moe_layer_pattern(getattr(config, "moe_layer_freq", 1),
                                  config.num_layers)[layer_index])


@dataclass
class CoETransformerConfig(CoEConfigMixin, TransformerConfig):
    """``TransformerConfig`` with Chain-of-Experts fields (standard multi-head attention)."""


@dataclass
class CoEMLATransformerConfig(CoEConfigMixin, MLATransformerConfig):
    """``MLATransformerConfig`` with Chain-of-Experts fields (DeepSeek-V2 multi-latent attention).

    ``kv_channels`` defaults to ``v_head_dim``: MLA's own projections use the MLA head dims, and
    the core attention's output width is ``kv_channels`` per head.
    """

    mla_latent_norm_epsilon: float = default_of("mla_latent_norm_epsilon")
    """Eps of the q/kv latent norms (with ``qk_layernorm``); DeepSeek-V2 hard-codes 1e-6 there,
    while ``layernorm_epsilon`` is the other norms' (``models/specs.with_latent_norm_eps``)."""

    def __post_init__(self):
        if self.kv_channels is None:
            self.kv_channels = self.v_head_dim
        super().__post_init__()


def is_coe_config(config) -> bool:
    return isinstance(config, CoEConfigMixin)
