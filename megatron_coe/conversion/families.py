"""Stock Hugging Face MoE families <-> ``ModelArch``: DeepSeek-V2, DeepSeek-V3, Qwen3-MoE, Mixtral.

This module owns everything family-specific of the conversion: which ``config.json`` of each
family the importer accepts and the architecture record (``megatron_coe.arch.ModelArch``, so
the Megatron model) it becomes, the family's
tensor names where they differ from the DeepSeek-style names of ``mapping`` (Mixtral's
``block_sparse_moe.*.w1/w2/w3``), and the ``config.json`` written when a model is exported back
to its stock class. A feature Megatron-Core cannot compute exactly is refused with the field
named (``ConversionError``); nothing is approximated.

=============  ===================================================================================
family         imported exactly                       refused (field named)
=============  ===================================================================================
deepseek_v2    MLA (q_lora_rank or none), YaRN,       moe_layer_freq != 1, rope types other than
               shared experts, first_k_dense_replace, yarn, group routing where a group's best
               softmax top-k without renorm,          expert is not its score
               group_limited_greedy, routed scaling   (num_experts_per_tok // topk_group != 1)
deepseek_v3    MLA, YaRN, shared experts, dense first rope_interleave false,
               layers, sigmoid scores + renorm,       norm_topk_prob false with top-k > 1, group
               e_score_correction_bias (Megatron's    routing unless num_experts_per_tok //
               expert bias), group-limited top-k      topk_group == 2; multi-token prediction
               (top-2 sum per group), routed scaling  (num_nextn_predict_layers) is dropped with a
                                                      line (transformers' class has no MTP either)
qwen3_moe      GQA, per-head q/k RMSNorm, top-k with  sliding window, attention bias, rope
               or without renorm (norm_topk_prob),    scaling
               dense layers (mlp_only_layers,
               decoder_sparse_step)
mixtral        GQA, top-k renormalised                sliding window, router jitter, rope scaling
=============  ===================================================================================
"""

from __future__ import annotations

import re
from typing import Dict, Optional

from megatron_coe.arch import (DEEPSEEK_V2_LATENT_EPS, ModelArch, compact_moe_layer_freq,
                               first_k_dense, hf_moe_layer_pattern)
from megatron_coe.conversion import hf_config
from megatron_coe.conversion.hf_config import MODEL_TYPE_STOCK, ConversionError

FAMILIES = ("deepseek_v2", "deepseek_v3", "qwen3_moe", "mixtral")
HF_CLASSES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
              "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}

# config.json fields that must be positive integers, per family (one line naming the field)
_REQUIRED = {
    "deepseek_v3": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size",
                    "intermediate_size", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim"),
    "qwen3_moe": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
                  "intermediate_size"),
    "mixtral": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_local_experts", "num_experts_per_tok", "intermediate_size"),
}


# Every model_type the importer reads: this project's CoE exports (hf_config) and the families.
IMPORTABLE_MODEL_TYPES = hf_config.COE_MODEL_TYPES + FAMILIES


def is_family(model_type) -> bool:
    return model_type in FAMILIES


def check_importable(cfg: dict, cfg_path: str) -> None:
    """``ConversionError`` (one line) for a ``config.json`` whose ``model_type`` the importer does
    not read; the list it gives is ``IMPORTABLE_MODEL_TYPES``."""
    mtype = cfg.get("model_type")
    if mtype not in IMPORTABLE_MODEL_TYPES:
        raise ConversionError(
            f"{cfg_path}: unsupported Hugging Face model_type {mtype!r}: supported are "
            f"{', '.join(IMPORTABLE_MODEL_TYPES)} (the CoE exports of this project and the stock "
            f"MoE families {', '.join(FAMILIES)})")


def _yarn(cfg: dict, problems: list) -> Optional[dict]:
    """MLA families: YaRN ``rope_parameters`` as a ``rope_scaling`` dict (Megatron-Core's MLA
    YaRN: the same frequencies, cos/sin scale and softmax scale), None for plain RoPE."""
    rope = dict(cfg.get("rope_parameters") or {}, **(cfg.get("rope_scaling") or {}))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type in ("default", None):
        return None
    if rope_type != "yarn":
        problems.append(f"rope_parameters.rope_type {rope_type!r} is not imported: plain RoPE and "
                        "yarn are")
        return None
    if rope.get("truncate", True) is not True:
        problems.append("rope_parameters.truncate false (YaRN without rounding the correction "
                        "range) has no Megatron-Core counterpart")
    if "original_max_position_embeddings" not in rope:
        problems.append("rope_parameters.original_max_position_embeddings is missing (YaRN)")
        return None
    return dict(type="yarn", factor=float(rope.get("factor", 1.0)),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                mscale=float(rope.get("mscale") or 1.0), mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0))


def _rope(cfg: dict, problems: list, family: str) -> float:
    rope = cfg.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if family in ("deepseek_v2", "deepseek_v3"):
        pass  # YaRN: _yarn
    elif rope_type not in ("default", None) or cfg.get("rope_scaling"):
        problems.append(f"rope_parameters.rope_type {rope_type!r} (rope scaling) is not imported "
                        f"for {family}: only plain RoPE is")
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    return float(theta)


def _check_fields(cfg: dict, cfg_path: str, family: str) -> None:
    for key in _REQUIRED[family]:
        if key == "num_local_experts" and family == "qwen3_moe" and "num_experts" in cfg:
            key = "num_experts"  # transformers < 5 writes num_experts
        v = cfg.get(key)
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise ConversionError(f"{key} must be a positive integer, got {v!r}; fix config.json "
                                  "(or use the config.json the weights came with)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{cfg_path}: hidden_act {cfg.get('hidden_act')!r} is not supported for "
                              f"{family} (its experts are SwiGLU: silu)")


def arch_from_family_config(cfg: dict, cfg_path: str = "config.json") -> ModelArch:
    """The record of a stock family ``config.json``; ``ConversionError`` naming the field
    of anything Megatron-Core would compute differently."""
    family = cfg.get("model_type")
    if family == MODEL_TYPE_STOCK:
        return _deepseek_v2(cfg)
    if family not in _REQUIRED:
        raise ConversionError(f"unsupported model_type {family!r}; supported families: {list(FAMILIES)}")
    _check_fields(cfg, cfg_path, family)
    p = []
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        p.append("attention_bias / mlp_bias (linear biases) are not imported")
    theta = _rope(cfg, p, family)
    common = dict(num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
                  num_attention_heads=cfg["num_attention_heads"], vocab_size=cfg["vocab_size"],
                  max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
                  rotary_base=theta, normalization="RMSNorm",
                  layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)), gated_linear_unit=True,
                  ffn_hidden_size=cfg["intermediate_size"],
                  untie_embeddings_and_output_weights=not cfg.get("tie_word_embeddings", False),
                  moe_router_topk=cfg["num_experts_per_tok"],
                  coe_iterations=1, coe_inner_residual=False, coe_outer_residual=True)
    L = cfg["num_hidden_layers"]
    if family in ("qwen3_moe", "mixtral"):
        if cfg.get("use_sliding_window") or (family == "mixtral" and cfg.get("sliding_window")):
            p.append("sliding_window (sliding-window attention) is not imported: Megatron's local "
                     "attention here is full causal; set it to null only if no input exceeds it")
        if family == "mixtral" and cfg.get("router_jitter_noise"):
            p.append("router_jitter_noise (multiplicative router input noise in training) has no "
                     "Megatron-Core counterpart")
        heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        if heads % kv:
            p.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        experts = cfg.get("num_experts") or cfg["num_local_experts"]
        if family == "qwen3_moe":
            step = cfg.get("decoder_sparse_step", 1)
            only = cfg.get("mlp_only_layers") or []
            if not (isinstance(step, int) and step >= 1):
                p.append(f"decoder_sparse_step must be a positive integer, got {step!r}")
                step = 1
            pattern = [0 if (i in only or (i + 1) % step) else 1 for i in range(L)]
            pre_softmax = not bool(cfg.get("norm_topk_prob", False))
            moe_size, qk_norm = cfg["moe_intermediate_size"], True
        else:
            pattern, pre_softmax, moe_size, qk_norm = [1] * L, False, cfg["intermediate_size"], False
        if 1 not in pattern:
            p.append("mlp_only_layers / decoder_sparse_step leave no MoE layer")
        if p:
            raise ConversionError(f"cannot import this {family} model exactly:\n  - " + "\n  - ".join(p))
        return hf_config.check_convertible(ModelArch(
            **common, num_query_groups=kv, kv_channels=cfg.get("head_dim"),
            qk_layernorm=qk_norm, num_moe_experts=experts, moe_ffn_hidden_size=moe_size,
            moe_router_score_function="softmax", moe_router_pre_softmax=pre_softmax,
            moe_layer_freq=compact_moe_layer_freq(pattern)))
    # deepseek_v3
    topk, E = cfg["num_experts_per_tok"], cfg["n_routed_experts"]
    if cfg.get("rope_interleave", True) is not True:
        p.append("rope_interleave false: Megatron-Core's MLA applies RoPE to de-interleaved pairs "
                 "(DeepSeek-V3's rope_interleave true)")
    if topk > 1 and not cfg.get("norm_topk_prob", True):
        p.append("norm_topk_prob false with sigmoid scores: Megatron-Core always renormalises "
                 "sigmoid top-k weights")
    n_group, topk_group = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    groups = None
    if E % n_group:
        p.append(f"n_group {n_group} does not divide n_routed_experts {E}")
    elif topk_group < n_group:
        if topk // topk_group != 2 or topk % topk_group:
            p.append(f"topk_group {topk_group} with num_experts_per_tok {topk}: DeepSeek-V3 scores a "
                     "group by its top-2 experts, Megatron-Core by its top "
                     "num_experts_per_tok // topk_group; they agree only when that is 2")
        groups = (n_group, topk_group)
    if cfg.get("moe_layer_freq", 1) != 1:
        p.append("moe_layer_freq != 1 (transformers' DeepSeek-V3 ignores it)")
    if cfg.get("q_lora_rank") is not None and not (isinstance(cfg["q_lora_rank"], int) and cfg["q_lora_rank"] >= 1):
        p.append(f"q_lora_rank must be a positive integer or null, got {cfg['q_lora_rank']!r}")
    if cfg.get("num_key_value_heads") not in (None, cfg["num_attention_heads"]):
        p.append("num_key_value_heads != num_attention_heads (multi-latent attention has no GQA)")
    if p:
        raise ConversionError(f"cannot import this {family} model exactly:\n  - " + "\n  - ".join(p))
    pattern = hf_moe_layer_pattern(L, cfg.get("first_k_dense_replace", 0), 1)
    shared = (cfg.get("n_shared_experts") or 0) * cfg["moe_intermediate_size"]
    scaling = cfg.get("routed_scaling_factor", 1.0)
    yarn = _yarn(cfg, p)
    if p:
        raise ConversionError(f"cannot import this {family} model exactly:\n  - " + "\n  - ".join(p))
    return hf_config.check_convertible(ModelArch(
        **common, multi_latent_attention=True, qk_layernorm=True,
        mla_latent_norm_epsilon=DEEPSEEK_V2_LATENT_EPS, **hf_config.yarn_fields(yarn),
        q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=cfg["kv_lora_rank"],
        qk_head_dim=cfg["qk_nope_head_dim"], qk_pos_emb_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"], num_moe_experts=E,
        moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        moe_shared_expert_intermediate_size=shared or None,
        moe_router_score_function="sigmoid", moe_router_pre_softmax=False,
        moe_router_enable_expert_bias=True,
        moe_router_topk_scaling_factor=None if scaling in (None, 1, 1.0) else float(scaling),
        moe_router_num_groups=groups[0] if groups else None,
        moe_router_group_topk=groups[1] if groups else None,
        moe_layer_freq=compact_moe_layer_freq(pattern)))


def _deepseek_v2(cfg: dict) -> ModelArch:
    """Stock DeepSeek-V2 (``hf_config.from_hf_config``) plus the group-routing exactness rule."""
    if cfg.get("topk_method") == "group_limited_greedy":
        topk, tg = cfg.get("num_experts_per_tok"), cfg.get("topk_group")
        n_group, E = cfg.get("n_group"), cfg.get("n_routed_experts")
        if not (isinstance(tg, int) and isinstance(n_group, int) and tg >= 1 and n_group >= 1):
            raise ConversionError("group_limited_greedy needs positive integers n_group and topk_group, "
                                  f"got n_group={n_group!r}, topk_group={tg!r}")
        if topk // tg != 1:
            raise ConversionError(
                f"cannot import this deepseek_v2 model exactly: topk_group {tg} with "
                f"num_experts_per_tok {topk}: DeepSeek-V2 scores a group by its best expert, "
                "Megatron-Core by its top num_experts_per_tok // topk_group experts; they agree "
                "only when that is 1")
        if topk > tg * (E // n_group):
            raise ConversionError(f"num_experts_per_tok {topk} exceeds the experts of topk_group "
                                  f"{tg} groups")
    p = []
    yarn = _yarn(cfg, p)
    if p:
        raise ConversionError("cannot import this deepseek_v2 model exactly:\n  - " + "\n  - ".join(p))
    rope = dict(cfg.get("rope_parameters") or {})
    plain = dict(cfg, rope_parameters=dict(rope_type="default",
                                           rope_theta=cfg.get("rope_theta", rope.get("rope_theta", 10000.0))))
    plain.pop("rope_scaling", None)
    arch = hf_config.from_hf_config(plain).replace(**hf_config.yarn_fields(yarn))
    if (arch.moe_router_num_groups and arch.moe_router_group_topk
            and arch.moe_router_group_topk >= arch.moe_router_num_groups):
        # every group selected: no limit
        arch = arch.replace(moe_router_num_groups=None, moe_router_group_topk=None)
    return hf_config.check_convertible(arch)


# --------------------------------------------------------------------------- tensor names
_MIXTRAL = (("block_sparse_moe.gate.", "mlp.gate."),
            ("block_sparse_moe.experts.", "mlp.experts."))
_MIXTRAL_W = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MIXTRAL_RE = re.compile(r"^(model\.layers\.\d+\.)block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")
_DS_RE = re.compile(r"^(model\.layers\.\d+\.)mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def from_family_names(family: Optional[str], tensors: Dict) -> Dict:
    """A family's HF tensor names -> the DeepSeek-style names ``mapping`` reads."""
    if family != "mixtral":
        return tensors
    out = {}
    for name, t in tensors.items():
        m = _MIXTRAL_RE.match(name)
        if m:
            name = f"{m.group(1)}mlp.experts.{m.group(2)}.{_MIXTRAL_W[m.group(3)]}.weight"
        else:
            name = name.replace("block_sparse_moe.gate.", "mlp.gate.")
        out[name] = t
    return out


def to_family_names(family: Optional[str], tensors: Dict) -> Dict:
    """The DeepSeek-style names ``mapping`` writes -> a family's HF tensor names."""
    if family != "mixtral":
        return tensors
    inverse = {v: k for k, v in _MIXTRAL_W.items()}
    out = {}
    for name, t in tensors.items():
        m = _DS_RE.match(name)
        if m:
            name = f"{m.group(1)}block_sparse_moe.experts.{m.group(2)}.{inverse[m.group(3)]}.weight"
        else:
            name = re.sub(r"\.mlp\.gate\.", ".block_sparse_moe.gate.", name)
        out[name] = t
    return out


def family_layer_prefix(family: Optional[str], layer_idx: int) -> str:
    """The name prefix of layer ``layer_idx``'s tensors in the family's files."""
    return f"model.layers.{layer_idx}."


# --------------------------------------------------------------------------- export
def family_problems(arch: ModelArch, family: str) -> list:
    """Why stock ``family`` cannot compute ``arch`` exactly ([] if it can)."""
    a = arch
    if family == MODEL_TYPE_STOCK:  # YaRN is written as rope_parameters (family_hf_config)
        return [x for x in hf_config.stock_deepseek_v2_problems(a) if not x.startswith("YaRN")]
    p = []
    if not a.is_standard_moe():
        p.append(f"stock {family} is a standard MoE: needs coe_iterations=1, inner residual off, "
                 "outer residual on")
    if not a.gated_linear_unit or a.normalization != "RMSNorm":
        p.append(f"stock {family} has SwiGLU experts and RMSNorm")
    if not a.untie_embeddings_and_output_weights and family == "deepseek_v3":
        p.append("stock deepseek_v3 unties embeddings")
    shared = a.moe_shared_expert_intermediate_size
    grouped = a.moe_router_num_groups and a.moe_router_group_topk
    if family in ("qwen3_moe", "mixtral"):
        if a.multi_latent_attention or a.rotary_percent != 1.0:
            p.append(f"stock {family} has standard attention with full, non-interleaved RoPE")
        if shared:
            p.append(f"stock {family} has no shared expert")
        if (a.moe_router_score_function != "softmax" or a.moe_router_num_groups
                or a.moe_router_enable_expert_bias or a.moe_router_topk_scaling_factor):
            p.append(f"stock {family} routes with a plain softmax top-k (no groups, bias or scaling)")
        if family == "qwen3_moe" and not a.qk_layernorm_on:
            p.append("stock qwen3_moe normalises q and k per head (qk_layernorm)")
        if family == "mixtral":
            if a.qk_layernorm_on:
                p.append("stock mixtral has no q/k norm")
            if a.moe_router_pre_softmax:
                p.append("stock mixtral renormalises the top-k weights (pre_softmax off)")
            if 0 in a.moe_layer_pattern():
                p.append("stock mixtral has no dense layers")
            if a.resolved("ffn_hidden_size") != a.resolved("moe_ffn_hidden_size"):
                p.append("stock mixtral's expert size is intermediate_size (ffn_hidden_size)")
    else:  # deepseek_v3
        if (not a.multi_latent_attention or not a.qk_layernorm_on
                or a.mla_latent_norm_epsilon != DEEPSEEK_V2_LATENT_EPS):
            p.append("stock deepseek_v3 has MLA with latent norms (eps 1e-6)")
        if a.moe_router_score_function != "sigmoid" or not a.moe_router_enable_expert_bias:
            p.append("stock deepseek_v3 routes with sigmoid scores and e_score_correction_bias")
        if grouped and a.moe_router_topk // a.moe_router_group_topk != 2:
            p.append("stock deepseek_v3 scores a group by its top-2 experts")
        if not shared or shared % a.resolved("moe_ffn_hidden_size"):
            p.append("stock deepseek_v3 has shared experts in units of the expert size")
        if first_k_dense(a.moe_layer_pattern()) is None:
            p.append("stock deepseek_v3 has dense layers only before the MoE layers")
    return p


def family_hf_config(arch: ModelArch, family: str, token_ids: Optional[dict] = None,
                     dtype: str = "float32") -> dict:
    """``config.json`` of stock ``family`` for ``arch`` (``family_problems`` must be empty)."""
    a = arch
    token_ids = token_ids or {}
    rope = dict(rope_type="default", rope_theta=a.rotary_base)
    if a.yarn:
        rope = dict({k: v for k, v in a.yarn.items() if k != "type"}, rope_type="yarn",
                    rope_theta=a.rotary_base)
    if family == MODEL_TYPE_STOCK:
        return dict(hf_config.to_hf_config(a, stock=True, token_ids=token_ids, dtype=dtype),
                    rope_parameters=rope)
    moe_size = a.resolved("moe_ffn_hidden_size")
    cfg = dict(model_type=family, vocab_size=a.vocab_size, hidden_size=a.hidden_size,
               intermediate_size=a.resolved("ffn_hidden_size"),
               num_hidden_layers=a.num_layers, num_attention_heads=a.num_attention_heads,
               max_position_embeddings=a.max_position_embeddings, hidden_act="silu",
               rms_norm_eps=a.layernorm_epsilon,
               tie_word_embeddings=not a.untie_embeddings_and_output_weights,
               num_experts_per_tok=a.moe_router_topk, attention_dropout=0.0, initializer_range=0.02,
               use_cache=True, bos_token_id=token_ids.get("bos"), eos_token_id=token_ids.get("eos"),
               pad_token_id=token_ids.get("pad"), dtype=dtype,
               rope_parameters=rope)
    if family in ("qwen3_moe", "mixtral"):
        cfg.update(num_key_value_heads=a.resolved("num_query_groups"),
                   head_dim=a.resolved("kv_channels"), sliding_window=None)
    if family == "qwen3_moe":
        pattern = a.moe_layer_pattern()
        cfg.update(num_local_experts=a.num_moe_experts, moe_intermediate_size=moe_size,
                   norm_topk_prob=not a.moe_router_pre_softmax, decoder_sparse_step=1,
                   mlp_only_layers=[i for i, v in enumerate(pattern) if not v],
                   use_sliding_window=False, attention_bias=False)
    elif family == "mixtral":
        cfg.update(num_local_experts=a.num_moe_experts, router_jitter_noise=0.0)
    elif family == "deepseek_v3":
        cfg.update(num_key_value_heads=a.num_attention_heads, n_routed_experts=a.num_moe_experts,
                   moe_intermediate_size=moe_size,
                   n_shared_experts=a.moe_shared_expert_intermediate_size // moe_size,
                   q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank,
                   qk_nope_head_dim=a.qk_head_dim, qk_rope_head_dim=a.qk_pos_emb_head_dim,
                   v_head_dim=a.v_head_dim, n_group=a.moe_router_num_groups or 1,
                   topk_group=a.moe_router_group_topk or 1, norm_topk_prob=True,
                   routed_scaling_factor=float(a.moe_router_topk_scaling_factor or 1.0),
                   first_k_dense_replace=first_k_dense(a.moe_layer_pattern()), rope_interleave=True,
                   num_nextn_predict_layers=0, attention_bias=False)
    return cfg


def mtp_note(cfg: dict) -> Optional[str]:
    """The line printed when DeepSeek-V3 multi-token-prediction layers are dropped."""
    n = cfg.get("num_nextn_predict_layers") or 0
    if cfg.get("model_type") == "deepseek_v3" and n:
        return (f"note: dropping {n} multi-token-prediction layer(s) (num_nextn_predict_layers={n}): "
                "transformers' DeepseekV3ForCausalLM does not run them and Megatron's main model "
                "does not need them; the imported model computes the same next-token logits")
    return None


def without_mtp(cfg: dict, tensors: Dict) -> Dict:
    """``tensors`` without DeepSeek-V3's multi-token-prediction layers (``model.layers.{L..}``
    with L = num_hidden_layers, present in published checkpoints; see ``mtp_note``)."""
    n = cfg.get("num_nextn_predict_layers") or 0
    if cfg.get("model_type") != "deepseek_v3" or not n:
        return tensors
    L = cfg["num_hidden_layers"]
    mtp = re.compile(r"^model\.layers\.(\d+)\.")
    return {k: v for k, v in tensors.items()
            if not ((m := mtp.match(k)) and L <= int(m.group(1)) < L + n)}


def family_of(cfg: dict) -> Optional[str]:
    """The stock family of a ``config.json``, or None (this project's CoE exports)."""
    t = cfg.get("model_type")
    return t if t in FAMILIES else None


__all__ = ["FAMILIES", "HF_CLASSES", "IMPORTABLE_MODEL_TYPES", "check_importable", "is_family",
           "arch_from_family_config", "from_family_names", "to_family_names", "family_problems",
           "family_hf_config", "mtp_note", "family_of"]
