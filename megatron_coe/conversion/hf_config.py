"""The Hugging Face side of the architecture record: ``config.json`` <-> ``ModelArch``.

The architecture of a model is ``megatron_coe.arch.ModelArch`` (the one record, with
Megatron-Core's field names; trainer checkpoints store it). This module only translates it:

    ModelArch --to_hf_config--> config.json --from_hf_config--> ModelArch
    a built Megatron TransformerConfig --from_megatron_config--> ModelArch
    ModelArch --megatron_config--> the CoE TransformerConfig an import builds

and decides which ``model_type`` an export may claim. Everything a converter cannot express is
refused with a ``ConversionError`` that names the setting (biases, token dropping, sinkhorn
routing, an activation the trainer has no option for, ...). The weights' dtype is not
architecture: callers carry it beside the record (``hf_dtype``, ``megatron_dtype``).

Hugging Face ``model_type`` values:

* ``coe_deepseekv2``: CoE with DeepSeek-V2 multi-latent attention (the published CoE layout);
* ``coe_gpt``: CoE with standard multi-head / grouped-query attention and rotary embeddings
  (Megatron's ``GPTModel`` attention; Llama-style ``q_proj``/``k_proj``/``v_proj`` weights);
* ``deepseek_v2``: stock ``transformers`` DeepSeek-V2, written only for a standard MoE (C=1,
  inner residual off, outer residual on) that it can express exactly (see
  ``stock_deepseek_v2_problems``);
* ``coe_megatron``: this project's own type for an MLA model that the published
  ``coe_deepseekv2`` semantics would compute differently or cannot run (``published_problems``: no
  latent norms, latent eps other than DeepSeek-V2's 1e-6, LayerNorm, dense layers, ...). Its remote code computes exactly what
  Megatron computes; the borrowed names are never written for a model they do not describe.

This package never imports the trainer (``megatron_coe.training``).
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F

from megatron_coe.arch import (DEEPSEEK_V2_LATENT_EPS, ModelArch, compact_moe_layer_freq,
                               first_k_dense, hf_moe_layer_pattern)


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted; the message says why and what to change."""


MODEL_TYPE_MLA = "coe_deepseekv2"
MODEL_TYPE_GPT = "coe_gpt"
MODEL_TYPE_STOCK = "deepseek_v2"
MODEL_TYPE_OWN_MLA = "coe_megatron"
COE_MODEL_TYPES = (MODEL_TYPE_MLA, MODEL_TYPE_GPT, MODEL_TYPE_OWN_MLA)

_ACTIVATIONS = {F.silu: "silu", F.gelu: "gelu", F.relu: "relu"}


def _refuse(what: str, problems: list) -> None:
    if problems:
        raise ConversionError(f"cannot convert this {what}:\n  - " + "\n  - ".join(problems))


def yarn_fields(rope_scaling: Optional[dict]) -> dict:
    """``ModelArch`` fields of a Hugging Face YaRN ``rope_scaling`` dict ({} for plain RoPE)."""
    if not rope_scaling:
        return {}
    rs = rope_scaling
    return dict(position_embedding_type="yarn", rotary_scaling_factor=float(rs["factor"]),
                mscale=float(rs.get("mscale") or 1.0),
                mscale_all_dim=float(rs.get("mscale_all_dim") or 0.0),
                original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
                beta_fast=float(rs.get("beta_fast") or 32), beta_slow=float(rs.get("beta_slow") or 1))


# --------------------------------------------------------------------------- the record
def check_convertible(arch: ModelArch) -> ModelArch:
    """``arch`` in its one form (``normalized``), or ``ConversionError`` for what a converter
    (or the trainer) cannot express."""
    a = arch
    problems = list(a.check())
    if a.multi_latent_attention:
        if a.kv_channels not in (None, a.v_head_dim):
            problems.append("MLA with kv_channels != v_head_dim is not supported")
    if a.moe_router_score_function == "sigmoid" and a.moe_router_pre_softmax:
        problems.append("pre_softmax with sigmoid scores is not supported")
    if a.vocab_size is None:
        problems.append("the record has no vocab_size")
    _refuse("Megatron model", problems)
    return a.normalized()


def from_megatron_config(config, vocab_size: int, max_position_embeddings: int = 4096,
                         rotary_base: float = 10000.0, rotary_percent: float = 1.0,
                         tie_word_embeddings: bool = False) -> ModelArch:
    """The record of a model built by ``build_coe_gpt_model(config, ...)``; refuses what Hugging
    Face (or the record) cannot express. ``rotary_base`` / ``rotary_percent`` are ``GPTModel``
    arguments (standard attention); MLA uses ``config.rotary_base``."""
    c = config
    problems = []
    if getattr(c, "add_bias_linear", False) or getattr(c, "add_qkv_bias", False):
        problems.append("linear biases (add_bias_linear / add_qkv_bias) are not supported")
    if getattr(c, "moe_expert_capacity_factor", None) is not None:
        problems.append("token dropping (moe_expert_capacity_factor) changes inference results "
                        "and is not supported")
    if getattr(c, "moe_router_load_balancing_type", "aux_loss") == "sinkhorn":
        problems.append("sinkhorn routing is not supported")
    for name, default in dict(moe_shared_expert_gate=False, mtp_num_layers=None,
                              layernorm_zero_centered_gamma=False,
                              apply_residual_connection_post_layernorm=False, qk_l2_norm=False,
                              moe_apply_probs_on_input=False, moe_latent_size=None,
                              window_size=None, attention_output_gate=False,
                              experimental_attention_variant=None,
                              apply_query_key_layer_scaling=False, glu_linear_offset=0.0,
                              activation_func_clamp_value=None,
                              moe_router_force_load_balancing=False, rotary_interleaved=False,
                              softmax_type="vanilla").items():
        value = getattr(c, name, default)
        if value != default and not (default is False and not value):
            problems.append(f"{name}={value!r} is not supported")
    act = _ACTIVATIONS.get(c.activation_func)
    want = "silu" if c.gated_linear_unit else "gelu"
    if act != want:
        name = act or getattr(c, "activation_func", None).__name__
        problems.append(f"activation {name} {'with' if c.gated_linear_unit else 'without'} "
                        "gating is not supported (gated silu: --swiglu, or gelu)")
    mla = bool(getattr(c, "multi_latent_attention", False))
    if mla and c.rope_type not in ("rope", "yarn"):
        problems.append(f"rope_type {c.rope_type!r} is not supported")
    if mla and c.rope_type == "rope" and c.mscale_all_dim and c.rotary_scaling_factor > 1:
        problems.append("mscale_all_dim with rope_type='rope' (softmax scale mscale) is not "
                        "supported")
    _refuse("Megatron model", problems)
    arch = ModelArch.from_megatron_config(
        c, vocab_size=int(vocab_size), max_position_embeddings=int(max_position_embeddings),
        untie_embeddings_and_output_weights=not tie_word_embeddings,
        rotary_base=None if mla else float(rotary_base), rotary_percent=float(rotary_percent))
    return check_convertible(arch)


def megatron_dtype(config) -> str:
    """The parameter dtype of a Megatron config, as a name."""
    return {"torch.bfloat16": "bfloat16", "torch.float16": "float16"}.get(
        str(config.params_dtype), "float32")


def megatron_config(arch: ModelArch, dtype: str = "float32", **overrides):
    """The CoE ``TransformerConfig`` an import builds for ``arch`` (the trainer's own
    ``to_config_kwargs`` plus CPU-safe runtime settings; ``overrides`` win)."""
    import torch

    from megatron_coe.config import CPU_UNFUSED, CoEMLATransformerConfig, CoETransformerConfig

    kw = dict(arch.to_config_kwargs(), **CPU_UNFUSED,
              moe_token_dispatcher_type="alltoall", add_bias_linear=False,
              params_dtype=getattr(torch, dtype), gradient_accumulation_fusion=False,
              hidden_dropout=0.0, attention_dropout=0.0)
    kw.update(overrides)
    cls = CoEMLATransformerConfig if arch.multi_latent_attention else CoETransformerConfig
    return cls(**kw)


def trainer_options(arch: ModelArch) -> dict:
    """{trainer option: value} that build exactly this model (``megatron_coe.train``), and
    ``seq_length``: the context the model was trained at (YaRN: its original context, e.g.
    4096 for the paper's model declared for 163840 positions; else the declared length)."""
    values = arch.to_option_values()
    yarn = arch.yarn or {}
    values["seq_length"] = int(yarn.get("original_max_position_embeddings")
                               or arch.max_position_embeddings)
    return values


# --------------------------------------------------------------------------- export rules
def model_type(arch: ModelArch, stock: bool = False) -> str:
    """``deepseek_v2`` (``stock``), ``coe_deepseekv2`` where the published semantics compute
    this model exactly, else this project's own ``coe_megatron`` (MLA) / ``coe_gpt``."""
    if stock:
        return MODEL_TYPE_STOCK
    if not arch.multi_latent_attention:
        return MODEL_TYPE_GPT
    return MODEL_TYPE_OWN_MLA if published_problems(arch) else MODEL_TYPE_MLA


def _shared_not_multiple(a: ModelArch) -> bool:
    shared = a.moe_shared_expert_intermediate_size
    return bool(shared) and shared % a.resolved("moe_ffn_hidden_size") != 0


def _deepseek_routing(a: ModelArch) -> bool:
    return a.moe_router_score_function == "softmax" and a.moe_router_pre_softmax


def published_problems(arch: ModelArch) -> list:
    """Why code written for ``coe_deepseekv2`` (the published CoE model: DeepSeek-V2 attention
    and experts, CoE chain) would compute a different function than this model; [] if none."""
    a, p = arch, []
    if not a.multi_latent_attention:
        return ["coe_deepseekv2 is multi-latent attention; this model has standard attention"]
    if not a.qk_layernorm_on:
        p.append("DeepSeek-V2 attention always normalises the q/kv latents "
                 "(q_a_layernorm/kv_a_layernorm); this model has no latent norms "
                 "(trained with --no-qk-layernorm or before latent norms were the default)")
    elif a.mla_latent_norm_epsilon != DEEPSEEK_V2_LATENT_EPS:
        p.append(f"DeepSeek-V2 hard-codes eps {DEEPSEEK_V2_LATENT_EPS:g} for the latent norms; "
                 f"this model uses {a.mla_latent_norm_epsilon:g}")
    if a.normalization != "RMSNorm":
        p.append(f"DeepSeek-V2 uses RMSNorm; this model uses {a.normalization}")
    if not a.gated_linear_unit:
        p.append("DeepSeek-V2 experts are SwiGLU; this model's are not (--swiglu)")
    if not _deepseek_routing(a):
        p.append("DeepSeek-V2 routes with a softmax over all routed experts and no "
                 "renormalisation of the top-k weights (--moe-router-score-function softmax "
                 "--moe-router-pre-softmax); this model does not")
    if a.moe_router_num_groups or a.moe_router_group_topk:
        p.append("group-limited routing is not part of the published CoE model")
    if a.moe_router_enable_expert_bias:
        p.append("DeepSeek-V2 has no expert bias (--moe-router-enable-expert-bias)")
    dense = [i for i, moe in enumerate(a.moe_layer_pattern()) if not moe]
    if dense:
        # Its decoder layer calls self.mlp(h, _iter) for every layer, which the dense CoeMLP
        # (first_k_dense_replace) does not take: such a model loads there but cannot run.
        p.append(f"the published CoE code runs no dense layer (its decoder layer passes the CoE "
                 f"iteration to every MLP); this model has dense layer(s) {dense} "
                 f"(--moe-layer-freq)")
    if _shared_not_multiple(a):
        p.append(f"DeepSeek-V2 counts shared experts in units of the routed expert size "
                 f"({a.resolved('moe_ffn_hidden_size')}); the shared expert size "
                 f"{a.moe_shared_expert_intermediate_size} is not a multiple of it")
    return p


def stock_deepseek_v2_problems(arch: ModelArch) -> list:
    """Why stock ``transformers`` ``DeepseekV2ForCausalLM`` cannot run this model exactly."""
    a, p = arch, []
    if not a.multi_latent_attention:
        p.append("stock DeepSeek-V2 needs multi-latent attention (--multi-latent-attention)")
    if not a.is_standard_moe():
        p.append("stock DeepSeek-V2 is a standard MoE: needs coe_iterations=1, inner residual "
                 "off, outer residual on")
    if not _deepseek_routing(a):
        p.append("stock DeepSeek-V2 routes with softmax over all experts and no renormalisation "
                 "of the top-k weights: needs moe_router_score_function=softmax and "
                 "moe_router_pre_softmax=True")
    groups, group_topk = a.moe_router_num_groups, a.moe_router_group_topk
    if groups and group_topk and a.moe_router_topk // group_topk != 1:
        p.append("stock group-limited routing scores a group by its best expert: needs "
                 "moe_router_topk == moe_router_group_topk")
    if not a.gated_linear_unit:
        p.append("stock DeepSeek-V2 experts are SwiGLU: needs --swiglu")
    if a.normalization != "RMSNorm":
        p.append("stock DeepSeek-V2 uses RMSNorm")
    if not a.qk_layernorm_on:
        p.append("stock DeepSeek-V2 always normalises the q/kv latents: needs --qk-layernorm")
    elif a.multi_latent_attention and a.mla_latent_norm_epsilon != DEEPSEEK_V2_LATENT_EPS:
        p.append(f"stock DeepSeek-V2 hard-codes eps {DEEPSEEK_V2_LATENT_EPS:g} for the latent "
                 f"norms; this model uses {a.mla_latent_norm_epsilon:g}")
    if a.yarn is not None:
        p.append("YaRN export to stock DeepSeek-V2 is not supported (use the CoE remote-code "
                 "export)")
    if _shared_not_multiple(a):
        p.append("stock DeepSeek-V2 needs the shared-expert size to be a multiple of the expert "
                 "size")
    if not a.moe_shared_expert_intermediate_size:
        p.append("stock DeepSeek-V2 always has shared experts: needs "
                 "--moe-shared-expert-intermediate-size")
    if a.moe_router_enable_expert_bias:
        p.append("stock DeepSeek-V2 has no expert bias")
    if first_k_dense(a.moe_layer_pattern()) is None:
        p.append(f"stock DeepSeek-V2 has dense layers only before the MoE layers "
                 f"(first_k_dense_replace); this model's pattern is {a.moe_layer_pattern()}")
    return p


# --------------------------------------------------------------------------- config.json
def dense_layer_keys(arch: ModelArch) -> dict:
    """``first_k_dense_replace`` / ``moe_layer_freq`` of ``config.json`` (DeepSeek's rule:
    layer l is MoE iff ``l >= first_k_dense_replace and l % moe_layer_freq == 0``; any other
    pattern as a 0/1 list in ``moe_layer_freq``, read by this project's remote code only)."""
    pattern = arch.moe_layer_pattern()
    k = first_k_dense(pattern)
    if k is not None:
        return dict(first_k_dense_replace=k, moe_layer_freq=1)
    return dict(first_k_dense_replace=0, moe_layer_freq=compact_moe_layer_freq(pattern))


def to_hf_config(arch: ModelArch, stock: bool = False, token_ids: Optional[dict] = None,
                 dtype: str = "float32") -> dict:
    """``config.json`` content (without ``auto_map``/``architectures``, see ``export``)."""
    a = arch
    token_ids = token_ids or {}
    mla = a.multi_latent_attention
    moe_size = a.resolved("moe_ffn_hidden_size")
    shared = a.moe_shared_expert_intermediate_size
    n_shared = shared // moe_size if shared and shared % moe_size == 0 else None
    groups, group_topk = a.moe_router_num_groups, a.moe_router_group_topk
    softmax = a.moe_router_score_function == "softmax"
    cfg = dict(
        model_type=model_type(a, stock),
        vocab_size=a.vocab_size, hidden_size=a.hidden_size,
        intermediate_size=a.resolved("ffn_hidden_size"),
        num_hidden_layers=a.num_layers, num_attention_heads=a.num_attention_heads,
        num_key_value_heads=a.num_attention_heads if mla else a.resolved("num_query_groups"),
        max_position_embeddings=a.max_position_embeddings,
        hidden_act=a.activation, rms_norm_eps=a.layernorm_epsilon, rope_theta=a.rotary_base,
        attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        tie_word_embeddings=not a.untie_embeddings_and_output_weights, initializer_range=0.02,
        use_cache=True, n_routed_experts=a.num_moe_experts, num_experts_per_tok=a.moe_router_topk,
        moe_intermediate_size=moe_size, n_shared_experts=n_shared,
        scoring_func=a.moe_router_score_function,
        norm_topk_prob=(not a.moe_router_pre_softmax) if softmax else a.moe_router_topk > 1,
        routed_scaling_factor=float(a.moe_router_topk_scaling_factor or 1.0),
        topk_method="group_limited_greedy" if (groups and group_topk) else "greedy",
        n_group=groups, topk_group=group_topk, **dense_layer_keys(a),
        bos_token_id=token_ids.get("bos"), eos_token_id=token_ids.get("eos"),
        pad_token_id=token_ids.get("pad"), dtype=dtype,
    )
    if mla:
        cfg.update(q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank,
                   qk_nope_head_dim=a.qk_head_dim, qk_rope_head_dim=a.qk_pos_emb_head_dim,
                   v_head_dim=a.v_head_dim)
    if stock:
        cfg["rope_parameters"] = dict(rope_type="default", rope_theta=a.rotary_base)
        return cfg
    cfg.update(
        attention_type="mla" if mla else "mha", qk_layernorm=a.qk_layernorm_on,
        latent_norm_eps=a.mla_latent_norm_epsilon if mla else None, rope_scaling=a.yarn,
        norm_type=a.normalization.lower(), mlp_gated=a.gated_linear_unit,
        shared_expert_intermediate_size=shared, router_expert_bias=a.moe_router_enable_expert_bias,
        inner_iter=a.coe_iterations, use_igate=not a.coe_shared_router,
        inner_residual=a.coe_inner_residual, outer_residual=a.coe_outer_residual,
    )
    if not mla:
        cfg.update(head_dim=a.resolved("kv_channels"), rope_interleaved=False,
                   partial_rotary_factor=a.rotary_percent)
    return cfg


def hf_dtype(cfg: dict) -> str:
    """The weights' dtype a ``config.json`` declares (``dtype``, older ``torch_dtype``)."""
    return str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")


def from_hf_config(cfg: dict) -> ModelArch:
    """The record of an HF ``config.json`` of type ``coe_deepseekv2``, ``coe_megatron``,
    ``coe_gpt`` or ``deepseek_v2``."""
    mtype = cfg.get("model_type")
    if mtype not in COE_MODEL_TYPES + (MODEL_TYPE_STOCK,):
        raise ConversionError(
            f"unsupported Hugging Face model_type {mtype!r}: supported are "
            f"{list(COE_MODEL_TYPES) + [MODEL_TYPE_STOCK]} (the CoE exports of this project and "
            "stock DeepSeek-V2 MoE checkpoints)")
    stock = mtype == MODEL_TYPE_STOCK
    get = cfg.get
    problems = []
    if stock:
        if get("moe_layer_freq", 1) != 1:
            problems.append("moe_layer_freq != 1 is not supported (stock DeepSeek-V2 ignores it)")
        rope = get("rope_parameters") or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type not in ("default", None) or get("rope_scaling"):
            problems.append(f"rope type {rope_type!r} / rope_scaling is not supported for stock "
                            "DeepSeek-V2 import")
    if get("attention_bias") or get("mlp_bias"):
        problems.append("attention_bias / mlp_bias are not supported")
    attention = "mla" if stock else get("attention_type",
                                        "mha" if mtype == MODEL_TYPE_GPT else "mla")
    mla = attention == "mla"
    if get("num_key_value_heads") not in (None, get("num_attention_heads")) and mla:
        problems.append("MLA with num_key_value_heads != num_attention_heads is not supported")
    gated = True if stock else bool(get("mlp_gated", True))
    act = get("hidden_act", "silu")
    if act != ("silu" if gated else "gelu"):
        problems.append(f"hidden_act {act!r} {'with' if gated else 'without'} mlp_gated has no "
                        "trainer option (gated silu: --swiglu, or gelu)")
    if get("rope_interleaved"):
        problems.append("rope_interleaved (interleaved RoPE) has no trainer option")
    topk_method = get("topk_method", "greedy")
    if topk_method not in ("greedy", "group_limited_greedy"):
        problems.append(f"topk_method {topk_method!r} is not supported")
    scoring = get("scoring_func", "softmax")
    if stock and scoring != "softmax":
        problems.append("stock DeepSeek-V2 import supports scoring_func='softmax' only")
    _refuse("Hugging Face model", problems)

    rope_theta = get("rope_theta")
    if rope_theta is None:
        rope_theta = (get("rope_parameters") or {}).get("rope_theta", 10000.0)
    moe_size = get("moe_intermediate_size")
    shared = get("shared_expert_intermediate_size")
    if shared is None and get("n_shared_experts"):
        shared = get("n_shared_experts") * moe_size
    # transformers' DeepseekV2TopkRouter ignores norm_topk_prob: softmax, top-k, no renorm.
    pre_softmax = True if stock else (scoring == "softmax" and not get("norm_topk_prob", False))
    if stock:
        inner, outer = False, True
    elif get("residual") is not None and get("inner_residual") is None:
        inner = get("residual") in ("inner", "inner+outer")
        outer = get("residual") in ("outer", "inner+outer")
    else:
        inner, outer = get("inner_residual", True), get("outer_residual", False)
    scaling = get("routed_scaling_factor", 1.0)
    grouped = topk_method == "group_limited_greedy"
    kw = dict(
        num_layers=get("num_hidden_layers"), hidden_size=get("hidden_size"),
        num_attention_heads=get("num_attention_heads"), vocab_size=get("vocab_size"),
        max_position_embeddings=get("max_position_embeddings", 4096),
        multi_latent_attention=mla, qk_layernorm=True if stock else bool(get("qk_layernorm", True)),
        rotary_base=float(rope_theta),
        normalization="LayerNorm" if get("norm_type", "rmsnorm") == "layernorm" else "RMSNorm",
        layernorm_epsilon=float(get("rms_norm_eps", 1e-6)), gated_linear_unit=gated,
        ffn_hidden_size=get("intermediate_size"),
        untie_embeddings_and_output_weights=not get("tie_word_embeddings", False),
        num_moe_experts=get("n_routed_experts"), moe_router_topk=get("num_experts_per_tok"),
        moe_ffn_hidden_size=moe_size, moe_shared_expert_intermediate_size=shared or None,
        moe_router_score_function=scoring, moe_router_pre_softmax=pre_softmax,
        moe_router_topk_scaling_factor=None if scaling in (None, 1, 1.0) else float(scaling),
        moe_router_num_groups=get("n_group") if grouped else None,
        moe_router_group_topk=get("topk_group") if grouped else None,
        moe_router_enable_expert_bias=bool(get("router_expert_bias", False)),
        moe_layer_freq=compact_moe_layer_freq(hf_moe_layer_pattern(
            get("num_hidden_layers"), get("first_k_dense_replace", 0),
            1 if stock else get("moe_layer_freq", 1))),
        coe_iterations=1 if stock else int(get("inner_iter", 1)),
        coe_inner_residual=bool(inner), coe_outer_residual=bool(outer),
        coe_shared_router=False if stock else not get("use_igate", True),
    )
    if mla:
        kw.update(q_lora_rank=get("q_lora_rank"), kv_lora_rank=get("kv_lora_rank"),
                  qk_head_dim=get("qk_nope_head_dim"), qk_pos_emb_head_dim=get("qk_rope_head_dim"),
                  v_head_dim=get("v_head_dim"),
                  mla_latent_norm_epsilon=(DEEPSEEK_V2_LATENT_EPS if mtype != MODEL_TYPE_OWN_MLA
                                           else float(get("latent_norm_eps")
                                                      or DEEPSEEK_V2_LATENT_EPS)),
                  **({} if stock else yarn_fields(get("rope_scaling"))))
    else:
        kw.update(num_query_groups=get("num_key_value_heads"), kv_channels=get("head_dim"),
                  rotary_percent=float(get("partial_rotary_factor", 1.0)))
    return check_convertible(ModelArch(**kw))


# --------------------------------------------------------------------------- older checkpoints
# Field names of the record imports wrote as ``model_config`` before ``ModelArch`` (the
# importer's own dataclass); read, never written.
_LEGACY_NAMES = dict(
    num_layers="num_layers", hidden_size="hidden_size", num_attention_heads="num_attention_heads",
    vocab_size="vocab_size", max_position_embeddings="max_position_embeddings",
    num_query_groups="num_query_groups", head_dim="kv_channels", q_lora_rank="q_lora_rank",
    kv_lora_rank="kv_lora_rank", qk_nope_head_dim="qk_head_dim",
    qk_rope_head_dim="qk_pos_emb_head_dim", v_head_dim="v_head_dim", qk_layernorm="qk_layernorm",
    rope_theta="rotary_base", rotary_percent="rotary_percent", normalization="normalization",
    norm_eps="layernorm_epsilon", gated="gated_linear_unit", ffn_hidden_size="ffn_hidden_size",
    num_experts="num_moe_experts", topk="moe_router_topk",
    moe_ffn_hidden_size="moe_ffn_hidden_size",
    shared_expert_size="moe_shared_expert_intermediate_size",
    score_function="moe_router_score_function", pre_softmax="moe_router_pre_softmax",
    scaling_factor="moe_router_topk_scaling_factor", num_groups="moe_router_num_groups",
    group_topk="moe_router_group_topk", expert_bias="moe_router_enable_expert_bias",
    moe_layer_freq="moe_layer_freq", coe_iterations="coe_iterations",
    inner_residual="coe_inner_residual", outer_residual="coe_outer_residual",
    shared_router="coe_shared_router")


_MLA_ONLY = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
_MHA_ONLY = ("num_query_groups", "head_dim", "rotary_percent")


def from_legacy_model_config(d: dict) -> ModelArch:
    """The record of an older import's ``model_config`` (see ``_LEGACY_NAMES``)."""
    mla = d.get("attention") == "mla"
    skip = (_MHA_ONLY if mla else _MLA_ONLY)
    kw = {new: d[old] for old, new in _LEGACY_NAMES.items() if old in d and old not in skip}
    kw["multi_latent_attention"] = mla
    kw["untie_embeddings_and_output_weights"] = not d.get("tie_word_embeddings", False)
    if mla:
        kw["mla_latent_norm_epsilon"] = float(d.get("latent_norm_eps") or d.get("norm_eps", 1e-5))
        kw.update(yarn_fields(d.get("rope_scaling")))
    if d.get("rope_interleaved") or d.get("activation") != ("silu" if d.get("gated") else "gelu"):
        raise ConversionError("this older import's model (interleaved RoPE or an activation the "
                              "trainer has no option for) is no longer supported; import it "
                              "again from its Hugging Face directory")
    return check_convertible(ModelArch(**kw))
