"""Layer specs for CoE models, derived from Megatron-Core's own GPT layer specs.

``get_coe_layer_spec(config, use_transformer_engine)`` starts from
``get_gpt_layer_with_transformer_engine_spec`` (GPU: TE linears/attention/norms, grouped-GEMM
experts ``TEGroupedMLP``) or ``get_gpt_layer_local_spec`` (CPU: Megatron-Core modules only) and
swaps in the CoE pieces (in every MoE layer of ``config.moe_layer_freq``; the other layers are
Megatron's dense ``TransformerLayer`` with the same attention and norms, ``get_coe_block_spec``):

* the layer module: ``CoETransformerLayer`` (outer residual as configured);
* the MLP: ``ChainOfExpertsLayer`` with ``CoETopKRouter``, keeping Megatron's experts and
  shared-expert specs;
* local spec only: ``GroupedSequentialMLP`` experts (``SequentialMLP``'s parameters and
  checkpoint layout, one grouped GEMM per linear instead of a Python loop over experts; see
  ``transformer/grouped_experts.py``), ``TorchNorm`` (sequence-parallel capable) and, for MLA,
  ``MLADotProductAttention``.

Attention is standard multi-head attention or DeepSeek-V2 multi-latent attention, chosen by the
config class (``CoEMLATransformerConfig`` sets ``multi_latent_attention``). With MLA and
``qk_layernorm`` the q/kv latent norms use ``config.mla_latent_norm_epsilon`` (DeepSeek-V2: 1e-6)
instead of ``layernorm_epsilon`` (``with_latent_norm_eps``), and without query compression there
is no q norm on any Megatron-Core release (``DeepSeekV2MLASelfAttention``, ``compat.mla_q_norm``):
the attention is DeepSeek-V2's.
"""

from __future__ import annotations

import copy
import dataclasses

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
    get_transformer_layer_offset,
)

from megatron_coe.arch import moe_layer_pattern
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_coe.compat import TransformerEngineUnavailable, require_transformer_engine  # noqa: F401
from megatron_coe.compat.mla_q_norm import DeepSeekV2MLASelfAttention, MLASelfAttention
from megatron_coe.compat.moe_specs_and_signatures import as_module_spec, spec_module, spec_submodules
from megatron_coe.transformer.coe_layer import ChainOfExpertsLayer
from megatron_coe.transformer.coe_router import CoETopKRouter
from megatron_coe.transformer.coe_transformer_layer import CoETransformerLayer
from megatron_coe.transformer.grouped_experts import GroupedSequentialMLP
from megatron_coe.transformer.local_modules import MLADotProductAttention, TorchNorm


def _coe_mlp_spec(mlp_spec, local: bool) -> ModuleSpec:
    """Megatron's MoE module spec with the CoE layer and per-pass router swapped in (and, for
    the local spec, ``SequentialMLP`` experts replaced by ``GroupedSequentialMLP``).

    ``mlp_spec`` is upstream's MoE builder in the installed release's form (``ModuleSpec`` or
    ``functools.partial``, see ``compat.moe_specs_and_signatures``); the result is a
    ``ModuleSpec`` on every release, its routed experts too."""
    submodules = spec_submodules(mlp_spec)
    replace = dict(router=CoETopKRouter)
    experts = submodules.experts
    if local and spec_module(experts) is SequentialMLP:
        replace["experts"] = as_module_spec(experts, module=GroupedSequentialMLP)
    submodules = dataclasses.replace(submodules, **replace)
    return as_module_spec(mlp_spec, module=ChainOfExpertsLayer, submodules=submodules)


def _localize(layer_submodules, multi_latent_attention: bool):
    """Local-spec replacements: SP-capable torch norms and the MLA-compatible core attention."""
    replace = {}
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(layer_submodules, name) is not IdentityOp:
            replace[name] = TorchNorm
    attention = layer_submodules.self_attention
    attn_sub = attention.submodules
    attn_replace = {}
    for name in ("q_layernorm", "k_layernorm", "kv_layernorm"):
        if hasattr(attn_sub, name) and getattr(attn_sub, name) is not IdentityOp:
            attn_replace[name] = TorchNorm
    if multi_latent_attention:
        attn_replace["core_attention"] = MLADotProductAttention
    if attn_replace:
        replace["self_attention"] = dataclasses.replace(
            attention, submodules=dataclasses.replace(attn_sub, **attn_replace)
        )
    return dataclasses.replace(layer_submodules, **replace)


def with_latent_norm_eps(module):
    """``module`` (a norm, or Transformer Engine's linear with a fused input norm) built with the
    config's ``mla_latent_norm_epsilon`` as its eps instead of ``layernorm_epsilon``.

    Megatron-Core's ``MLASelfAttention`` builds the q/kv latent norms with
    ``eps=config.layernorm_epsilon``, the eps of every other norm; DeepSeek-V2 hard-codes 1e-6
    for the latent norms only. The returned class builds ``module`` with a copy of the config
    whose ``layernorm_epsilon`` is the latent eps (the fused TE linears read it from the config).
    """
    if module is IdentityOp:
        return module

    def build(cls, *args, config, **kwargs):
        latent = copy.copy(config)
        latent.layernorm_epsilon = config.mla_latent_norm_epsilon
        if "eps" in kwargs:
            kwargs["eps"] = latent.layernorm_epsilon
        return module(*args, config=latent, **kwargs)

    name = f"LatentEps{getattr(module, '__name__', 'Module')}"
    # latent_eps_of: what Megatron-Core >= 0.19's q/kv norm resolver must see this class as
    # (it compares classes by identity; compat.mla_latent_eps puts the wrapper back)
    return type(name, (), {"__new__": build, "latent_eps_of": module,
                           "__doc__": f"{name}: see with_latent_norm_eps."})


def _deepseek_v2_attention(layer_submodules):
    """MLA only: ``DeepSeekV2MLASelfAttention`` (``compat.mla_q_norm``) in place of
    ``MLASelfAttention``, so that latent norms without query compression never add a q norm
    (Megatron-Core >= 0.19 would fuse one into ``linear_q_proj``; DeepSeek-V2 has none)."""
    attention = layer_submodules.self_attention
    if attention.module is not MLASelfAttention:
        return layer_submodules
    return dataclasses.replace(layer_submodules, self_attention=dataclasses.replace(
        attention, module=DeepSeekV2MLASelfAttention))


def _latent_eps(layer_submodules, config):
    """MLA only: the latent norms (or the TE linears they are fused into) get their own eps.
    Without query compression (``q_lora_rank`` None) there is no q latent, so no q norm
    (Megatron-Core 0.19 refuses a q norm it would not use)."""
    attention = layer_submodules.self_attention
    attn_sub = attention.submodules
    replace = {}
    if config.q_lora_rank is None and getattr(attn_sub, "q_layernorm", IdentityOp) is not IdentityOp:
        replace["q_layernorm"] = IdentityOp
    for name in ("q_layernorm", "kv_layernorm"):
        if name in replace:
            continue
        if getattr(attn_sub, name, IdentityOp) is not IdentityOp:
            replace[name] = with_latent_norm_eps(getattr(attn_sub, name))
    for name in ("linear_q_up_proj", "linear_kv_up_proj"):
        module = getattr(attn_sub, name, None)
        if module is not None and "LayerNorm" in getattr(module, "__name__", ""):
            replace[name] = with_latent_norm_eps(module)
    if not replace:
        return layer_submodules
    return dataclasses.replace(layer_submodules, self_attention=dataclasses.replace(
        attention, submodules=dataclasses.replace(attn_sub, **replace)))


def get_coe_layer_spec(config, use_transformer_engine: bool = False, moe: bool = True) -> ModuleSpec:
    """Transformer-layer spec of a CoE model for ``config`` (a ``CoE*TransformerConfig``).

    Args:
        config: the model config; MLA, normalization, qk-layernorm and grouped GEMM come from it.
        use_transformer_engine: GPU spec (TE modules, ``TEGroupedMLP`` experts when
            ``config.moe_grouped_gemm``); raises ``TransformerEngineUnavailable`` without TE/CUDA.
        moe: False for a dense layer of ``config.moe_layer_freq``: Megatron's own
            ``TransformerLayer`` with its dense MLP (``ffn_hidden_size``) and residual, the same
            attention and norms as the CoE layers.
    """
    mla = bool(getattr(config, "multi_latent_attention", False))
    num_experts = config.num_moe_experts if moe else None
    if use_transformer_engine:
        require_transformer_engine("The Transformer Engine layer spec")
        base = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts,
            moe_grouped_gemm=config.moe_grouped_gemm,
            qk_layernorm=config.qk_layernorm,
            multi_latent_attention=mla,
        )
        submodules = base.submodules
    else:
        if config.moe_grouped_gemm:
            raise ValueError(
                "moe_grouped_gemm (--moe-grouped-gemm) needs the Transformer Engine spec "
                "(--transformer-impl transformer_engine) on a GPU; the local spec's experts are "
                "GroupedSequentialMLP (SequentialMLP weights, torch grouped GEMM on CPU)."
            )
        if config.fp8:
            require_transformer_engine("FP8 training")
            raise ValueError("FP8 needs the Transformer Engine spec (--transformer-impl transformer_engine).")
        base = get_gpt_layer_local_spec(
            num_experts=num_experts,
            qk_layernorm=config.qk_layernorm,
            multi_latent_attention=mla,
            normalization=config.normalization,
        )
        submodules = _localize(base.submodules, mla)
    if mla:
        submodules = _deepseek_v2_attention(submodules)
    if mla and config.qk_layernorm:
        submodules = _latent_eps(submodules, config)
    if not moe:
        return ModuleSpec(module=base.module, params=dict(base.params or {}), submodules=submodules)
    mlp = _coe_mlp_spec(submodules.mlp, local=not use_transformer_engine)
    submodules = dataclasses.replace(submodules, mlp=mlp)
    return ModuleSpec(module=CoETransformerLayer, params=dict(base.params or {}),
                      submodules=submodules)


def get_coe_block_spec(config, use_transformer_engine: bool = False, vp_stage=None, pp_rank=None):
    """Decoder-block spec: this pipeline stage's CoE layers plus the final norm.

    On the local spec the final norm is ``TorchNorm`` (Megatron's default, ``WrappedTorchNorm``,
    refuses sequence parallelism, which MoE with TP > 1 requires); the TE spec keeps Megatron's
    default final norm (``TENorm``).
    """
    layer_spec = get_coe_layer_spec(config, use_transformer_engine)
    pattern = moe_layer_pattern(getattr(config, "moe_layer_freq", 1), config.num_layers)
    if use_transformer_engine and all(pattern):
        return layer_spec
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    dense_spec = None if all(pattern) else get_coe_layer_spec(config, use_transformer_engine, moe=False)
    specs = [layer_spec if pattern[offset + i] else dense_spec for i in range(num_layers)]
    if use_transformer_engine:
        from megatron.core.extensions.transformer_engine import TENorm

        return TransformerBlockSubmodules(layer_specs=specs, layer_norm=TENorm)
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=TorchNorm)
